"""QLoRA memory techniques: double-quantized NF4 scales, projections and head whose backward decodes the frozen
base again (quant_nf4_ops), and what XLA keeps alive because of them. Tiny shapes: seconds on CPU."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from internlm_jax import quant_nf4 as Q
from internlm_jax import quant_nf4_ops as O


def _w(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 0.02


# ---- double quantization ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,n_lead", [((3, 40, 2, 80), 1), ((96, 640), 0)])
def test_double_quant_round_trip_within_bound_and_smaller(shape, n_lead):
  w = _w(shape).at[(0,) * len(shape)].set(0.5)  # one outlier block
  plain = Q.quantize(w, "nf4", n_lead=n_lead)
  dq = Q.quantize(w, "nf4", n_lead=n_lead, double_quant=True)
  np.testing.assert_array_equal(dq.codes, plain.codes)  # codes are chosen against the exact absmax
  assert dq.scales.dtype == jnp.int8 and dq.scales.shape == plain.scales.shape
  assert dq.scale2.shape == plain.scales.shape[:-1] + (-(-plain.scales.shape[-1] // Q.DOUBLE_QUANT_BLOCK),)
  # decoded scales are within half a second-level step of the exact ones
  step = jnp.take(dq.scale2, jnp.arange(dq.scales.shape[-1]) // Q.DOUBLE_QUANT_BLOCK, axis=-1)
  assert bool(jnp.all(jnp.abs(Q.decode_scales(dq) - plain.scales) <= step / 2 * (1 + 1e-5)))
  err = jnp.abs(Q.dequantize(dq) - w)
  assert bool(jnp.all(err <= Q.error_bound(w, dq) * (1 + 1e-5) + 1e-12))
  assert dq.nbytes < plain.nbytes
  # bytes per weight: 0.5 for the codes, 1 / 64 for int8 scales, 4 / (64 * 256) for the steps, 4 per layer offset
  n = np.prod(shape)
  assert dq.nbytes <= n * (0.5 + 1 / 64) + 4 * dq.scale2.size + 4 * dq.offset.size + 64


def test_double_quant_rows_and_columns_match_the_dequantized_weight():
  q = Q.quantize(_w((64, 640)), "nf4", double_quant=True)
  d = Q.dequantize(q)
  idx = jnp.array([[3, 5], [63, 0]])
  np.testing.assert_array_equal(O.take_rows(q, idx), d[idx])
  np.testing.assert_array_equal(O.column_slice(q, 128, 256), d[:, 128:384])


def test_born_quantized_base_with_double_quant():
  from internlm_jax.config import PRESETS
  config = PRESETS["tiny"]
  targets = ["embed", "wqkv", "wo", "w1", "w2", "w3", "output"]
  plain = Q.init_quantized_params(config, jax.random.key(0), "nf4", targets=targets)
  dq = Q.init_quantized_params(config, jax.random.key(0), "nf4", targets=targets, double_quant=True)
  for a, b in zip(jax.tree.leaves(plain, is_leaf=lambda x: isinstance(x, Q.QuantizedWeight)),
                  jax.tree.leaves(dq, is_leaf=lambda x: isinstance(x, Q.QuantizedWeight))):
    if isinstance(a, Q.QuantizedWeight):
      assert b.double_quant and b.shape == a.shape
      np.testing.assert_array_equal(a.codes, b.codes)
      np.testing.assert_allclose(Q.dequantize(b), Q.dequantize(a), atol=float(jnp.max(b.scale2)))
  assert Q.params_nbytes(dq) < Q.params_nbytes(plain)


# ---- custom VJPs equal autodiff of the dequantized weight ---------------------------------------------------------
SPECS = [("bte,ekgd->btkgd", (2, 3, 64), (64, 2, 4, 32)), ("bthd,hde->bte", (2, 3, 4, 32), (4, 32, 128)),
         ("bte,ef->btf", (2, 3, 64), (64, 192)), ("btf,fe->bte", (2, 3, 192), (192, 128))]


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("groups", [False, True])
@pytest.mark.parametrize("spec,x_shape,w_shape", SPECS)
def test_quantized_einsum_gradient_equals_autodiff_of_dequantized(spec, x_shape, w_shape, groups, double_quant,
                                                                  monkeypatch):
  if groups:  # decode the backward's weight a few rows at a time
    monkeypatch.setattr(O, "DECODE_GROUP_ELEMS", 2048)
  q = Q.quantize(_w(w_shape), "nf4", n_in=len(w_shape) - (3 if len(w_shape) == 4 else 1), double_quant=double_quant)
  x = jax.random.normal(jax.random.key(1), x_shape)
  ct = jax.random.normal(jax.random.key(2), jnp.einsum(spec, x, Q.dequantize(q)).shape)
  ours = lambda x: jnp.sum(q.project(spec, x, jnp.float32) * ct)
  ref = lambda x: jnp.sum(jnp.einsum(spec, x, Q.dequantize(q)) * ct)
  np.testing.assert_allclose(ours(x), ref(x), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(ref)(x), rtol=1e-5, atol=1e-6)
  if groups:
    assert O._groups(q, O._n_in(spec), rows=True) > 1 and O._groups(q, O._n_in(spec), rows=False) > 1


def test_int8_projection_gradient():
  q = Q.quantize(_w((64, 192)), "int8")
  x = jax.random.normal(jax.random.key(1), (2, 3, 64))
  ours = jax.grad(lambda x: jnp.sum(jnp.sin(q.project("bte,ef->btf", x, jnp.float32))))(x)
  ref = jax.grad(lambda x: jnp.sum(jnp.sin(jnp.einsum("bte,ef->btf", x, Q.dequantize(q)))))(x)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantized_head_cross_entropy_value_and_gradient(double_quant):
  q = Q.quantize(_w((64, 640)), "nf4", double_quant=double_quant)
  d = Q.dequantize(q)
  x = jax.random.normal(jax.random.key(1), (2, 8, 64))
  t = jax.random.randint(jax.random.key(2), (2, 8), 0, 640).at[0, 0].set(639).at[0, 1].set(600)
  w = jax.random.uniform(jax.random.key(3), (2, 8))
  chunked = lambda x: jnp.sum(O.quantized_head_cross_entropy(x, q, t, max_chunk=192) * w)
  dense = lambda x: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(x @ d, t) * w)
  np.testing.assert_allclose(chunked(x), dense(x), rtol=1e-5)
  np.testing.assert_allclose(jax.grad(chunked)(x), jax.grad(dense)(x), rtol=1e-4, atol=1e-6)


def test_gather_embedding_builds_no_embedding_gradient():
  q = Q.quantize(_w((64, 128)), "nf4")
  tokens = jnp.array([[1, 2, 3]])

  def loss(scale):
    params, local = O.gather_embedding({"embed": q}, tokens)
    return jnp.sum(params["embed"][local] * scale)
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(1.0))
  assert "scatter" not in jaxpr  # the transpose of a gather into the embedding would be a scatter-add


# ---- what XLA keeps alive -----------------------------------------------------------------------------------------
def test_backward_keeps_no_dequantized_weight_as_residual():
  """The residuals jax.vjp saves for the backward: autodiff through dequantize saves the float32 weight; the
  custom VJP saves only the quantized leaves (already inputs). (The benchmark's XLA buffer report showed the
  saved or CSE'd float copies in the layer backward; see BENCHMARKS.md.)"""
  E, F = 256, 1024
  q = Q.quantize(_w((E, F)), "nf4", double_quant=True)
  x = jax.random.normal(jax.random.key(1), (1, 8, E))
  big = lambda f: [r.shape for r in jax.tree.leaves(jax.vjp(f, x)[1])
                   if jnp.issubdtype(r.dtype, jnp.floating) and r.size >= E * F]
  assert big(lambda x: jnp.einsum("bte,ef->btf", x, Q.dequantize(q))) == [(E, F)]
  assert big(lambda x: q.project("bte,ef->btf", x, jnp.float32)) == []


# The whole QLoRA model twice (32 s): with the slow suite; tests/test_qlora_mlp.py and test_model's full_split
# case keep the fused MLP and the nested remat in the fast one.
@pytest.mark.slow
def test_qlora_step_loss_and_adapter_gradients_equal_the_dequantized_base():
  """The whole QLoRA loss (NF4 embedding, layers and head, double-quantized, the fused MLP, full remat with the
  block's halves checkpointed again) against the same base dequantized to float (the generic MLP): the custom
  VJPs and the nested remat change memory, not numbers."""
  from internlm_jax.config import PRESETS
  from internlm_jax.lora import apply_lora
  from internlm_jax.train.finetune_step import base_cross_entropy_sums
  config = PRESETS["tiny"].replace(remat_policy="full_split")
  base, lcfg, adapters, batch = _qlora_inputs(config, rank=4, seq_len=16)
  loss = lambda b: jax.value_and_grad(lambda a: base_cross_entropy_sums(apply_lora(b, a, lcfg), batch, config)[0])
  (ours, g_ours), (ref, g_ref) = loss(base)(adapters), loss(Q.dequantize_params(base))(adapters)
  np.testing.assert_allclose(ours, ref, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


@pytest.mark.slow
def test_memory_scheduler_changes_no_numbers():
  """experiments/bench_finetune.py compiles with XLA:CPU's memory-optimized scheduler
  (--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED: QLoRA r64 420.4 -> 394.2 MiB on bench-300m, see
  BENCHMARKS.md). A scheduler only orders the fused instructions, so the loss and adapter gradients of a QLoRA
  step are bitwise those of the default schedule. (On tiny shapes the memory scheduler's temporaries are not
  always smaller, so this checks numbers, not bytes.)"""
  from internlm_jax.config import PRESETS
  from internlm_jax.lora import apply_lora
  from internlm_jax.train.finetune_step import base_cross_entropy_sums
  config = PRESETS["tiny"].replace(remat_policy="full", attention_impl="blockwise", attention_block_size=16)
  base, lcfg, adapters, batch = _qlora_inputs(config, rank=8, seq_len=64)
  fn = jax.value_and_grad(lambda a: base_cross_entropy_sums(apply_lora(base, a, lcfg), batch, config)[0])
  lowered = jax.jit(fn).lower(adapters)
  default = lowered.compile()(adapters)
  memory = lowered.compile(compiler_options={"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"})(adapters)
  for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(memory)):
    np.testing.assert_array_equal(a, b)


def _qlora_inputs(config, rank: int, seq_len: int):
  """(NF4 base with double-quantized scales, LoraConfig, adapters with B != 0, a batch of 2 x seq_len)."""
  from internlm_jax.lora import LoraConfig, init_lora
  base = Q.init_quantized_params(config, jax.random.key(0), "nf4", double_quant=True,
                                 targets=["embed", "wqkv", "wo", "w1", "w2", "w3", "output"])
  lcfg = LoraConfig(rank=rank, alpha=2.0 * rank, targets=("wqkv", "wo", "w1", "w2", "w3"))
  adapters = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(2), x.shape),
                          init_lora(config, lcfg, jax.random.key(1)))
  T = seq_len
  batch = {"tokens": jax.random.randint(jax.random.key(3), (2, T), 0, config.vocab_size),
           "targets": jax.random.randint(jax.random.key(4), (2, T), 0, config.vocab_size),
           "segment_ids": jnp.ones((2, T), jnp.int32), "loss_mask": jnp.ones((2, T), jnp.int32),
           "positions": jnp.tile(jnp.arange(T, dtype=jnp.int32), (2, 1))}
  return base, lcfg, adapters, batch
