"""HF InternLM2 checkpoints (config.json + safetensors) <-> the params pytree, streamed tensor by tensor.

Shapes: L layers, E embed, V vocab, F mlp, H query heads, K kv heads, G = H / K, D head_dim.

  HF tensor (torch layout, Linear weights are [out, in])      params leaf (see model.param_specs)
  model.tok_embeddings.weight            [V, E]               embed [V, E]
  model.layers.{i}.attention_norm.weight [E]                  layers/attention_norm [L, E]
  model.layers.{i}.attention.wqkv.weight [K * (G + 2) * D, E] layers/wqkv [L, E, K, G + 2, D]
  model.layers.{i}.attention.wo.weight   [E, H * D]           layers/wo [L, H, D, E]
  model.layers.{i}.ffn_norm.weight       [E]                  layers/ffn_norm [L, E]
  model.layers.{i}.feed_forward.w1/w3    [F, E]               layers/w1, w3 [L, E, F]
  model.layers.{i}.feed_forward.w2       [E, F]               layers/w2 [L, F, E]
  model.norm.weight                      [E]                  norm [E]
  output.weight                          [V, E]               output [E, V]

The fused wqkv rows are grouped per kv head (G query heads, then the key, then the value, D rows each), so the
torch tensor viewed as [K, G + 2, D, E] is our layout up to a transpose. Every conversion below is "view the
torch tensor as `view`, then transpose by `perm`", which lets a loader read any index slice of a param straight
from the file without touching the rest.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from internlm_jax.config import DTYPES, ModelConfig, from_hf_config, to_hf_config
from internlm_jax.model import param_shardings, param_specs
from internlm_jax.safetensors_format import (ST_NAMES as _ST_NAMES, CheckpointError, SafetensorsFile as _SafetensorsFile,
                                             header_bytes as _header_bytes, plan_shards as _plan_shards)
from internlm_jax.sharding import DEFAULT_RULES, ShardingRules

Params = dict[str, Any]

INDEX_FILE = "model.safetensors.index.json"
# The released InternLM2 vocabulary's <|im_end|>: chat models stop on it as well as on </s>.
_IM_END_92544 = 92542


# ---- layouts -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Layout:
  hf_name: str                  # "{i}" stands for the layer index of stacked params
  torch_shape: tuple[int, ...]  # as stored in the file
  view: tuple[int, ...]         # the torch tensor reshaped so each of our dims is one of its dims
  perm: tuple[int, ...]         # our dim j (after the layer axis) is view dim perm[j]

  @property
  def stacked(self) -> bool:
    return "{i}" in self.hf_name

  def names(self, num_layers: int) -> list[str]:
    return [self.hf_name.format(i=i) for i in range(num_layers)] if self.stacked else [self.hf_name]


def _layouts(config: ModelConfig) -> dict[tuple[str, ...], _Layout]:
  """Param path -> layout; checked against model.param_specs so a change there cannot silently skew I/O."""
  c = config
  L, E, V, F = c.num_layers, c.hidden_size, c.vocab_size, c.intermediate_size
  H, K, G, D = c.num_heads, c.num_kv_heads, c.q_per_kv, c.head_dim
  pre = "model.layers.{i}."
  out = {
      ("embed",): _Layout("model.tok_embeddings.weight", (V, E), (V, E), (0, 1)),
      ("layers", "attention_norm"): _Layout(pre + "attention_norm.weight", (E,), (E,), (0,)),
      ("layers", "wqkv"): _Layout(pre + "attention.wqkv.weight", (K * (G + 2) * D, E), (K, G + 2, D, E),
                                  (3, 0, 1, 2)),
      ("layers", "wo"): _Layout(pre + "attention.wo.weight", (E, H * D), (E, H, D), (1, 2, 0)),
      ("layers", "ffn_norm"): _Layout(pre + "ffn_norm.weight", (E,), (E,), (0,)),
      ("layers", "w1"): _Layout(pre + "feed_forward.w1.weight", (F, E), (F, E), (1, 0)),
      ("layers", "w3"): _Layout(pre + "feed_forward.w3.weight", (F, E), (F, E), (1, 0)),
      ("layers", "w2"): _Layout(pre + "feed_forward.w2.weight", (E, F), (E, F), (1, 0)),
      ("norm",): _Layout("model.norm.weight", (E,), (E,), (0,)),
      ("output",): _Layout("output.weight", (V, E), (V, E), (1, 0)),
  }
  specs = param_specs(config)
  spec_paths = {tuple(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: hasattr(x, "logical_axes"))[0]}
  if spec_paths != set(out):
    raise RuntimeError(f"hf_io layouts {sorted(out)} do not cover model.param_specs {sorted(spec_paths)}")
  for path, lay in out.items():
    ours = ((L,) if lay.stacked else ()) + tuple(lay.view[p] for p in lay.perm)
    if ours != _get(specs, path).shape:
      raise RuntimeError(f"hf_io layout of {'/'.join(path)} gives {ours}, param_specs says {_get(specs, path).shape}")
  return out


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _dtype_name(dtype) -> str:
  name = jnp.dtype(dtype).name
  if name not in DTYPES:
    raise CheckpointError(f"dtype {name!r} is not supported; use one of {DTYPES}")
  return name


def _shape_str(shape) -> str:
  return "[" + ", ".join(str(int(s)) for s in shape) + "]"


# ---- tensor sources ----------------------------------------------------------------------------------------------
class _Source:
  """Named tensors with known shapes/dtypes; `read` returns one index slice of a tensor seen as `view`."""
  where: str
  shapes: dict[str, tuple[int, ...]]
  dtypes: dict[str, np.dtype]
  tied: dict[str, str] = {}  # name -> the stored tensor it reads (tie_word_embeddings)

  def read(self, name: str, view: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    # np.array copies only the selected elements: for a memmap, only those pages are read from disk.
    return np.array(self._tensor(self.tied.get(name, name)).reshape(view)[index])

  def tie(self, name: str, to: str) -> None:
    self.tied = {name: to}
    self.shapes[name], self.dtypes[name] = self.shapes[to], self.dtypes[to]

  def _tensor(self, name: str) -> np.ndarray:
    raise NotImplementedError


class _FolderSource(_Source):
  """All safetensors files of an HF folder: the ones the index names, else model.safetensors, else *.safetensors."""

  def __init__(self, folder: str):
    self.where = folder
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from None
      files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
      weight_map, files = None, ["model.safetensors"]
    else:
      weight_map, files = None, sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.safetensors")))
    if not files and glob.glob(os.path.join(folder, "pytorch_model*.bin")):
      raise CheckpointError(f"{folder}: has only pytorch_model*.bin weights, and only safetensors load; convert "
                            "with transformers: from_pretrained(..., trust_remote_code=True).save_pretrained(DIR)")
    if not files:
      raise CheckpointError(f"{folder}: no *.safetensors files")
    self._files: dict[str, _SafetensorsFile] = {}
    self.shapes, self.dtypes = {}, {}
    for fname in files:
      path = os.path.join(folder, fname)
      if not os.path.isfile(path):
        raise CheckpointError(f"{index_path}: names shard file {fname}, which does not exist")
      st = _SafetensorsFile(path)
      for name, (shape, dtype, _, _) in st.entries.items():
        if name in self._files:
          raise CheckpointError(f"{path}: tensor {name} also appears in {self._files[name].path}")
        self._files[name], self.shapes[name], self.dtypes[name] = st, shape, dtype
    if weight_map is not None:
      for name, fname in weight_map.items():
        if name not in self._files or os.path.basename(self._files[name].path) != fname:
          raise CheckpointError(f"{index_path}: maps tensor {name} to {fname}, which does not hold it")

  def _tensor(self, name):
    return self._files[name].tensor(name)


class _DictSource(_Source):
  def __init__(self, tensors: Mapping[str, Any]):
    self.where = "state dict"
    self._tensors = {k: np.asarray(v) for k, v in tensors.items()}
    self.shapes = {k: v.shape for k, v in self._tensors.items()}
    self.dtypes = {k: v.dtype for k, v in self._tensors.items()}

  def _tensor(self, name):
    return self._tensors[name]


def _names(names: list[str], limit: int) -> str:
  return ", ".join(names[:limit]) + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _check_tensors(config: ModelConfig, source: _Source) -> None:
  """Every expected tensor present with its exact shape and nothing else; one-line errors naming the tensor."""
  expected = {n: lay.torch_shape for lay in _layouts(config).values() for n in lay.names(config.num_layers)}
  # Some exporters keep the (recomputable, non-persistent) rotary buffer; it carries no weights.
  found = {n: s for n, s in source.shapes.items() if not n.endswith("rotary_emb.inv_freq")}
  extra = sorted(set(found) - set(expected))
  llama_like = [n for n in extra if any(k in n for k in ("q_proj", "k_proj", "v_proj", "self_attn", "embed_tokens"))]
  if llama_like:
    raise CheckpointError(f"{source.where}: tensor {_names(llama_like, 1)} has a Llama-style name (separate q/k/v "
                          "projections); this is not an InternLM2 checkpoint (fused attention.wqkv)")
  missing = [n for n in expected if n not in found]
  if missing:
    raise CheckpointError(f"{source.where}: missing tensor {_names(missing, 1)}")
  if extra:
    raise CheckpointError(f"{source.where}: unexpected tensor(s) {_names(extra, 5)} for an InternLM2 model with "
                          f"{config.num_layers} layers")
  for name, shape in expected.items():
    if tuple(found[name]) != tuple(shape):
      raise CheckpointError(f"{source.where}: tensor {name} has shape {_shape_str(found[name])}, expected "
                            f"{_shape_str(shape)} from the config")


# ---- loading -----------------------------------------------------------------------------------------------------
def _read_block(source: _Source, lay: _Layout, num_layers: int, dtype: np.dtype, index) -> np.ndarray:
  """The block of a param at `index` (slices over our shape), read layer by layer and slice by slice."""
  def one(name, idx):
    view_index = [slice(None)] * len(lay.view)
    for j, p in enumerate(lay.perm):
      view_index[p] = idx[j]
    block = source.read(name, lay.view, tuple(view_index))
    return block.transpose(lay.perm).astype(dtype, copy=False)

  if not lay.stacked:
    return np.ascontiguousarray(one(lay.hf_name, index))
  layer_ids = range(*index[0].indices(num_layers))
  out = None
  for n, i in enumerate(layer_ids):
    block = one(lay.hf_name.format(i=i), index[1:])
    if out is None:  # filled in place: the host holds this shard once, never the whole stacked weight
      out = np.empty((len(layer_ids),) + block.shape, dtype)
    out[n] = block
  return out


def _build_params(config: ModelConfig, source: _Source, mesh, rules: ShardingRules) -> Params:
  _check_tensors(config, source)
  dtype = np.dtype(jnp.dtype(config.param_dtype))
  specs = param_specs(config)
  shardings = param_shardings(config, mesh, rules) if mesh is not None else None
  single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  params: Params = {}
  for path, lay in _layouts(config).items():
    sharding = _get(shardings, path) if shardings is not None else single
    cb = lambda index, lay=lay: _read_block(source, lay, config.num_layers, dtype, index)
    _set(params, path, jax.make_array_from_callback(_get(specs, path).shape, sharding, cb))
  return params


def load_hf_checkpoint(path: str | os.PathLike, *, mesh=None, rules: ShardingRules = DEFAULT_RULES,
                       dtype=None) -> tuple[ModelConfig, Params]:
  """Reads an HF InternLM2 folder into (config, params), each param built directly in its sharding on `mesh`
  (one device without a mesh) from only the bytes that device's shard needs.

  dtype None keeps the checkpoint's torch_dtype (else the tensors' dtype) as param_dtype; a dtype casts.
  """
  folder = os.fspath(path)
  if not os.path.isdir(folder):
    raise CheckpointError(f"{folder}: no such checkpoint folder")
  config_path = os.path.join(folder, "config.json")
  if not os.path.isfile(config_path):
    raise CheckpointError(f"{config_path}: missing; an HF InternLM2 checkpoint folder needs a config.json")
  config = from_hf_config(config_path)
  source = _FolderSource(folder)
  with open(config_path) as f:
    hf = json.load(f)
  # HF ties the head to the embedding and leaves output.weight out of the files.
  embed = "model.tok_embeddings.weight"
  if hf.get("tie_word_embeddings") and "output.weight" not in source.shapes and embed in source.shapes:
    source.tie("output.weight", embed)
  if dtype is not None:
    config = config.replace(param_dtype=_dtype_name(dtype))
  elif (hf.get("torch_dtype") or hf.get("dtype")) not in DTYPES and embed in source.dtypes:
    config = config.replace(param_dtype=source.dtypes[embed].name)
  return config, _build_params(config, source, mesh, rules)


def from_hf_state_dict(config: ModelConfig, tensors: Mapping[str, Any], *, mesh=None,
                       rules: ShardingRules = DEFAULT_RULES) -> Params:
  """Params (in config.param_dtype) from in-memory HF InternLM2 tensors {name: array in torch layout}."""
  return _build_params(config, _DictSource(tensors), mesh, rules)


# ---- saving ------------------------------------------------------------------------------------------------------
def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # every process must join this gather
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _torch_tensors(lay: _Layout, host: np.ndarray, num_layers: int, dtype: np.dtype | None):
  """Yields (hf name, torch-layout array) for one param held on the host."""
  inverse = tuple(int(i) for i in np.argsort(lay.perm))
  blocks = [host[i] for i in range(num_layers)] if lay.stacked else [host]
  for name, block in zip(lay.names(num_layers), blocks):
    arr = np.ascontiguousarray(block.transpose(inverse)).reshape(lay.torch_shape)
    yield name, arr.astype(dtype if dtype is not None else arr.dtype, copy=False)


def _check_params(config: ModelConfig, params: Params, layouts) -> None:
  for path in layouts:
    try:
      shape = tuple(_get(params, path).shape)
    except (KeyError, TypeError):
      raise CheckpointError(f"params have no {'/'.join(path)}") from None
    if not hasattr(_get(params, path), "dtype"):  # QArray, QuantizedWeight: HF InternLM2 has no int8/int4 format
      raise CheckpointError(f"param {'/'.join(path)} is quantized ({type(_get(params, path)).__name__}); HF "
                            "folders hold float weights: save the params from before quantization")
    if shape != _get(param_specs(config), path).shape:
      raise CheckpointError(f"param {'/'.join(path)} has shape {_shape_str(shape)}, the config needs "
                            f"{_shape_str(_get(param_specs(config), path).shape)}")


def to_hf_state_dict(config: ModelConfig, params: Params, dtype=None) -> dict[str, np.ndarray]:
  """HF InternLM2 tensors {name: numpy array in torch layout}; dtype None keeps each param's dtype."""
  layouts = _layouts(config)
  _check_params(config, params, layouts)
  np_dtype = np.dtype(jnp.dtype(_dtype_name(dtype))) if dtype is not None else None
  out = {}
  for path, lay in layouts.items():
    for name, arr in _torch_tensors(lay, _to_host(_get(params, path)), config.num_layers, np_dtype):
      out[name] = np.require(arr, requirements=["C", "W"])  # views of device buffers are read-only
  return out


def save_hf_checkpoint(path: str | os.PathLike, config: ModelConfig, params: Params, *,
                       max_shard_bytes: int = 2**31, dtype=None, eos_token_ids: list[int] | None = None) -> None:
  """Writes an HF InternLM2 folder: config.json, generation_config.json and safetensors shards (with
  model.safetensors.index.json when there are several), loadable by the HF InternLM2 modeling code.

  Params go to the host one at a time (sharded ones are gathered; with several processes all must call this and
  process 0 writes). dtype None keeps the params' dtype. eos_token_ids defaults to [eos] plus <|im_end|> for the
  released 92544 vocabulary.
  """
  folder = os.fspath(path)
  layouts = _layouts(config)
  _check_params(config, params, layouts)
  np_dtype = np.dtype(jnp.dtype(_dtype_name(dtype))) if dtype is not None else None
  dtypes = {}
  for path_, lay in layouts.items():
    dtypes[path_] = np_dtype or np.dtype(_get(params, path_).dtype)
    if dtypes[path_] not in _ST_NAMES:
      raise CheckpointError(f"param {'/'.join(path_)} has dtype {dtypes[path_]}; save with dtype= one of {DTYPES}")
  def entry(p, i=None):
    lay = layouts[p]
    return (lay.hf_name.format(i=i) if lay.stacked else lay.hf_name, lay.torch_shape, dtypes[p])
  # HF order: the embedding, then layer by layer, then the final norm and the head.
  stacked = [p for p in layouts if layouts[p].stacked]
  entries = ([entry(("embed",))] + [entry(p, i) for i in range(config.num_layers) for p in stacked]
             + [entry(("norm",)), entry(("output",))])
  shards = _plan_shards(entries, max_shard_bytes)
  n = len(shards)
  fnames = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
  writer = jax.process_index() == 0
  location, handles = {}, {}
  try:
    if writer:
      os.makedirs(folder, exist_ok=True)
      # Stale shards or an old index from an earlier save would shadow or mix with this one on load.
      for old in glob.glob(os.path.join(folder, "*.safetensors")) + [os.path.join(folder, INDEX_FILE)]:
        if os.path.exists(old):
          os.remove(old)
      for fname, shard in zip(fnames, shards):
        f = handles[fname] = open(os.path.join(folder, fname), "wb")
        head = _header_bytes(shard)
        f.write(head)
        for name, _, _, begin, _ in shard:
          location[name] = (f, len(head) + begin)
    for path_, lay in layouts.items():
      host = _to_host(_get(params, path_))
      if not writer:
        continue
      for name, arr in _torch_tensors(lay, host, config.num_layers, dtypes[path_]):
        f, offset = location[name]
        f.seek(offset)
        f.write(arr.tobytes())
      del host
  finally:
    for f in handles.values():
      f.close()
  if not writer:
    return
  if n > 1:
    total = sum(end - begin for shard in shards for *_, begin, end in shard)
    index = {"metadata": {"total_size": total},
             "weight_map": {e[0]: fname for fname, shard in zip(fnames, shards) for e in shard}}
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
  torch_dtype = dtypes[("embed",)].name
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(to_hf_config(config, torch_dtype=torch_dtype), f, indent=2)
  if eos_token_ids is None:
    eos_token_ids = [config.eos_token_id] + ([_IM_END_92544] if config.vocab_size == 92544 else [])
  generation = {"bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id,
                "eos_token_id": eos_token_ids[0] if len(eos_token_ids) == 1 else list(eos_token_ids)}
  with open(os.path.join(folder, "generation_config.json"), "w") as f:
    json.dump(generation, f, indent=2)
