"""Weighted data mixtures: the spec syntax, proportions, determinism, resume, host shards, errors, formats."""
import json

import grain
import numpy as np
import pytest

from internlm_jax import data
from internlm_jax import tokenizer as tk
from internlm_jax.data.packing import PackIterDataset
from internlm_jax.data.pipeline import _not_blank, _tokenize

WORDS = "the king queen crown sword night day love death heart blood time fair sweet lord lady".split()


def _texts(prefix, n, seed=0):
  """n documents whose first word is `prefix` + index, so a packed stream tells which component each came from."""
  rng = np.random.default_rng(seed)
  return [f"{prefix}{i} " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, 20)))) for i in range(n)]


def _jsonl(path, texts, field="text"):
  path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
  return str(path)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  prefix = tmp_path_factory.mktemp("tok") / "tiny"
  return tk.Tokenizer(tk.train_tokenizer(prefix, 320, texts=["\n".join(_texts("w", 200, seed=1))]))


@pytest.fixture
def two(tmp_path):
  """(web path, code path): 60 'web' and 40 'code' jsonl documents."""
  return _jsonl(tmp_path / "web.jsonl", _texts("web", 60)), _jsonl(tmp_path / "code.jsonl", _texts("code", 40, 1))


def _docs_of(batches, tok):
  """Documents in stream order, decoded from packed rows (cut after each EOS)."""
  stream = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches])
  ends = np.flatnonzero(stream == tok.eos_id) + 1
  return [tok.decode(d[1:-1]) for d in np.split(stream, ends)[:-1]]


def _take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def _make(source, tok, **kw):
  args = dict(seq_len=32, batch_size=4, seed=0, shard_index=0, shard_count=1)
  return data.make_pretrain_dataset(source, tok, **(args | kw))


def test_spec_parsing():
  assert data.parse_spec("a.jsonl,b.jsonl") is None and data.parse_spec("tfds:wiki:1.0.0") is None
  assert data.parse_spec("tfds:wiki:1.0.0:0.5") == [("tfds:wiki:1.0.0", "tfds", 0.5, None)]  # the weight is last
  assert data.parse_spec(" a.jsonl:1e-1:content , code.array_record:2: ,jsonl:c.txt:1,gs://b/x:1") == [
      ("a.jsonl", None, 0.1, "content"), ("code.array_record", None, 2.0, ""), ("c.txt", "jsonl", 1.0, None),
      ("gs://b/x", None, 1.0, None)]


def test_weighted_mixture_proportions_and_seeds(tok, two):
  web, code = two
  mix = data.open_spec(f"{web}:3,{code}:1")
  assert isinstance(mix, data.Mixture) and [c.weight for c in mix.components] == [0.75, 0.25]
  assert len(mix) == 100 and "60 docs, weight 0.75" in mix.describe() and "40 docs, weight 0.25" in mix.describe()
  docs = _docs_of(_take(_make(mix, tok, seed=3), 80), tok)
  kinds = [d.split()[0].rstrip("0123456789") for d in docs]
  assert len(docs) > 200 and set(kinds) == {"web", "code"}
  assert kinds.count("web") / len(kinds) == pytest.approx(0.75, abs=0.02)
  # Both components are repeated on their own: the web stream wrapped (60 documents) and keeps its share.
  assert kinds.count("web") > 60 and kinds.count("code") > 40
  again = _take(_make(mix, tok, seed=3), 40)
  other = _take(_make(mix, tok, seed=4), 40)
  assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(_take(_make(mix, tok, seed=3), 40), again))
  assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(other, again))


@pytest.mark.parametrize("num_threads", [0, 2])
def test_mixture_restores_mid_stream(tok, two, num_threads):
  mix = data.open_spec(",".join(f"{p}:{w}" for p, w in zip(two, (0.6, 0.4))))

  def make():
    return _make(mix, tok, seq_len=20, batch_size=2, seed=5, num_threads=num_threads)
  reference = _take(make(), 30)
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


def test_reweighted_resume_continues_each_component(tok, two):
  web, code = two
  first = iter(_make(data.open_spec(f"{web}:0.75,{code}:0.25"), tok, seed=1))
  before = _docs_of([next(first) for _ in range(8)], tok)  # the piece cut at the end is not counted
  state = json.loads(json.dumps(first.get_state()))
  second = iter(_make(data.open_spec(f"{web}:0.5,{code}:0.5"), tok, seed=1))
  second.set_state(state)
  after = _docs_of([next(second) for _ in range(20)], tok)[1:]  # the first may be a continuation piece
  web_docs = [d for d in before + after if d.startswith("web")]
  # Had the web component restarted, its first documents would come again well within its 60-document epoch.
  assert len(web_docs) > 45 and len(set(web_docs[:58])) == min(len(web_docs), 58)
  after_kinds = [d[:3] for d in after]
  assert after_kinds.count("web") / len(after_kinds) == pytest.approx(0.5, abs=0.05)


def test_switching_a_component_off_keeps_the_others_seeds_and_states(tok, two, tmp_path):
  """A zero weight drops a component from the mix; the components after it keep their spec position, so their
  shuffle seeds and saved states stay their own (they used to shift onto the switched-off component's)."""
  web, code = two
  wiki = _jsonl(tmp_path / "wiki.jsonl", _texts("wiki", 50, 2))
  wiki_docs = lambda docs: [d.split()[0] for d in docs if d.startswith("wiki")]
  on = wiki_docs(_docs_of(_take(_make(data.open_spec(f"{web}:0.5,{code}:0.0001,{wiki}:0.5"), tok, seed=3), 20), tok))
  off = wiki_docs(_docs_of(_take(_make(data.open_spec(f"{web}:0.5,{code}:0,{wiki}:0.5"), tok, seed=3), 20), tok))
  assert len(on) > 10 and off[:10] == on[:10]
  first = iter(_make(data.open_spec(f"{web}:0.4,{code}:0.2,{wiki}:0.4"), tok, seed=3))
  before = wiki_docs(_docs_of([next(first) for _ in range(10)], tok))
  state = json.loads(json.dumps(first.get_state()))
  second = iter(_make(data.open_spec(f"{web}:0.5,{code}:0,{wiki}:0.5"), tok, seed=3))
  second.set_state(state)
  after = wiki_docs(_docs_of([next(second) for _ in range(10)], tok))[1:]  # the first may be a continuation
  assert len(before) > 3 and len(after) > 3 and not set(before) & set(after)  # no restart, no other permutation
  third = iter(_make(data.open_spec(f"{web}:0.4,{code}:0.2,{wiki}:0.4"), tok, seed=3))
  third.set_state(json.loads(json.dumps(second.get_state())))  # switched back on: code starts afresh
  next(third)
  assert third.get_state()["parent"]["parents"][1]["next_index"] <= 2
  single = iter(_make(data.open_spec(f"{web}:1"), tok))
  next(single)
  with pytest.raises(data.DataError, match="single-source"):
    iter(_make(data.open_spec(f"{web}:0.5,{code}:0.5"), tok)).set_state(single.get_state())


def test_mixture_host_shards_are_disjoint(tok, two):
  mix = data.open_spec(f"{two[0]}:0.5,{two[1]}:0.5")
  seen = []
  for index in range(3):  # one epoch: each host's stream ends when one of its component shards runs out
    ds = _make(mix, tok, seed=7, num_epochs=1, shard_index=index, shard_count=3)
    seen.append(_docs_of(list(iter(ds)), tok))
  for docs in seen:
    assert len(docs) == len(set(docs)) and {d[:3] for d in docs} == {"web", "cod"}
  for a in range(3):
    for b in range(a + 1, 3):
      assert not set(seen[a]) & set(seen[b])
  # Every host drew the code component (40 documents: shards of 14, 13, 13) to its end.
  assert sorted(sum(([d for d in s if d.startswith("code")] for s in seen), [])) == sorted(_texts("code", 40, 1))


def test_unweighted_spec_is_the_old_single_source(tok, two):
  spec = ",".join(two)
  source = data.open_spec(spec)
  assert isinstance(source, data.JsonlSource) and len(source) == 100
  # The pipeline as it was before mixtures, written out with grain: batches must match bit for bit.
  legacy = grain.MapDataset.source(data.make_source(two))[1::2].shuffle(seed=9).repeat(None)
  legacy = legacy.filter(_not_blank).map(lambda t: _tokenize(t, tok))
  legacy = PackIterDataset(legacy.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=64)),
                           seq_len=24, pad_id=tok.pad_id).batch(3)
  new = _make(source, tok, seq_len=24, batch_size=3, seed=9, shard_index=1, shard_count=2)
  one = data.open_spec(f"{two[0]}:0.3")  # a weighted spec of one component is that source, batch for batch
  assert isinstance(one, data.Mixture) and len(one.components) == 1
  for got, want, single, plain in zip(_take(new, 12), _take(legacy, 12), _take(_make(one, tok, seed=2), 12),
                                      _take(_make(data.make_source(two[0]), tok, seed=2), 12)):
    for key in data.ROW_FIELDS:
      np.testing.assert_array_equal(got[key], want[key])
      np.testing.assert_array_equal(single[key], plain[key])


def test_bad_specs_name_the_component(tok, two, tmp_path):
  web, code = two
  missing = str(tmp_path / "nowhere.jsonl")
  (tmp_path / "empty.jsonl").write_text("")
  (tmp_path / "blank").mkdir()
  (tmp_path / "blank" / "a.txt").write_text(" \n\n ")
  cases = [
      (f"{web}:0.5,{code}:-0.5", f"'{code}:-0.5': weight must be >= 0"),
      (f"{web}:0.5,parquet:{code}:0.5", f"'parquet:{code}:0.5': unknown format 'parquet'"),
      (f"{web}:0.5,{missing}:0.5", f"'{missing}:0.5': corpus path '{missing}' does not exist"),
      (f"{web}:0,{code}:0", "sum to 0"),
      (f"{web}:0.5,{code}", f"component '{code}' has no weight"),
      (f"{web}:1,{tmp_path / 'empty.jsonl'}:1", "empty.jsonl:1' has weight 1.0 but holds no documents"),
      (f"{web},tfds:{tmp_path}", "a tfds dataset must be the only path"),  # used to drop the second path silently
  ]
  for spec, message in cases:
    with pytest.raises(data.DataError) as e:
      data.open_spec(spec)
    assert message in str(e.value) and "\n" not in str(e.value), (spec, str(e.value))
  # All-blank or too-small components fail when the pipeline is built, naming the component.
  with pytest.raises(data.DataError, match=r"component '.*blank': data shard 0 of 1: all 1 documents are empty"):
    _make(data.open_spec(f"{web}:1,{tmp_path / 'blank'}:1"), tok)
  with pytest.raises(data.DataError, match=r"component '.*code.jsonl': data shard 40 of 41 is empty"):
    _make(data.Mixture([("web", data.make_source(web), 1.0), (code, data.make_source(code), 1.0)]), tok,
          shard_index=40, shard_count=41)
  # A zero weight switches a component off without opening it.
  off = data.open_spec(f"{web}:1,{missing}:0")
  assert [c.name for c in off.components] == [web] and off.off == (missing,) and "off (weight 0)" in off.describe()


def test_jsonl_text_array_record_mixture_with_own_fields(tok, tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  web = _jsonl(tmp_path / "web.jsonl", _texts("web", 10), field="content")
  (tmp_path / "books").mkdir()
  for i, text in enumerate(_texts("book", 6, 2)):
    (tmp_path / "books" / f"{i}.txt").write_text(text)
  code = str(tmp_path / "code.array_record")
  writer = ArrayRecordWriter(code, "group_size:1")
  for text in _texts("code", 8, 3):
    writer.write(text.encode())  # raw text records: the empty FIELD below asks for no JSON
  writer.close()
  # "jsonl:" is a format prefix (kept in the component's name for the log).
  mix = data.open_spec(f"jsonl:{web}:0.5:content, {tmp_path / 'books'}:0.25, {code}:0.25:", field="text")
  assert [type(c.source).__name__ for c in mix.components] == ["JsonlSource", "TextSource", "ArrayRecordSource"]
  assert mix.components[0].name == f"jsonl:{web}"
  docs = _docs_of(_take(_make(mix, tok, seq_len=48), 10), tok)
  assert set(docs) <= set(_texts("web", 10) + _texts("book", 6, 2) + _texts("code", 8, 3))
  assert {d[:3] for d in docs} == {"web", "boo", "cod"}


def _tfds_dir(tfds, root, prefix):
  # Unregistered: the class is defined once per call, and test_data.py registers its own `TinyText`.
  class TinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(prefix, 5), "validation": self._generate_examples(f"val{prefix}", 3)}

    def _generate_examples(self, name, n):
      for i in range(n):
        yield i, {"text": f"{name}{i} the king"}

  builder = TinyText(data_dir=str(root), file_format="array_record")
  builder.download_and_prepare()
  return builder.data_dir


def test_two_tfds_datasets_through_the_training_config(tok, tmp_path, caplog):
  tfds = pytest.importorskip("tensorflow_datasets")
  first, second = _tfds_dir(tfds, tmp_path / "a", "alpha"), _tfds_dir(tfds, tmp_path / "b", "beta")
  web = _jsonl(tmp_path / "web.jsonl", _texts("web", 10))
  from configs import pretrain_tiny
  from internlm_jax.train.loop import build_data
  cfg = pretrain_tiny.get_config()
  cfg.data.corpus, cfg.data.tokenizer = "files", tok.path
  cfg.data.train_paths = f"tfds:{first}:0.25,tfds:{second}:0.25,{web}:0.5"
  cfg.data.val_paths = f"tfds:{first}:1,tfds:{second}:1"
  with caplog.at_level("INFO"):
    _, train, val = build_data(cfg)
  assert isinstance(train, data.Mixture) and [len(c.source) for c in train.components] == [5, 5, 10]
  assert sorted(val[i] for i in range(len(val))) == sorted([f"valalpha{i} the king" for i in range(3)]
                                                           + [f"valbeta{i} the king" for i in range(3)])
  assert "config.data.train_paths: data mixture of 3" in caplog.text
  docs = _docs_of(_take(_make(train, tok), 8), tok)
  assert {d.split()[0].rstrip("0123456789") for d in docs} == {"alpha", "beta", "web"}
  # Validation reads the mixture once, unshuffled, as the training loop's evaluate() does.
  val_docs = _docs_of(list(_make(val, tok, shuffle=False, num_epochs=1)), tok)
  assert len(val_docs) == 6 and len(set(val_docs)) == 6


def test_unigram_baseline_reads_every_component_by_weight(tok, two):
  """The baseline used to read the mixture's concatenation from the start: only the first component's documents
  once it holds max_docs of them, whatever the weights."""
  from internlm_jax.train.loop import _baseline_docs, unigram_baseline
  web, code = two
  mix = data.open_spec(f"{web}:0.25,{code}:0.75")
  docs = _baseline_docs(mix, 20)
  assert [d[:3] for d in docs].count("web") == 5 and [d[:3] for d in docs].count("cod") == 15
  plain = data.make_source(web)
  assert _baseline_docs(plain, 20) == [plain[i] for i in range(20)]
  code_only = data.open_spec(code)
  assert unigram_baseline(mix, code_only, tok, max_docs=20) < unigram_baseline(
      data.open_spec(f"{web}:0.75,{code}:0.25"), code_only, tok, max_docs=20)
