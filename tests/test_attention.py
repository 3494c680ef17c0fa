"""GPT attention through jax.nn.dot_product_attention against the explicit T x T formulation it
replaced, and rematerialisation of the GPT blocks."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sift_jax import config_lib, models
from sift_jax.models import gpt

B, T, H, DH = 2, 13, 3, 8  # odd T: the causal mask is not square-aligned to anything


def numpy_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
  """The pre-dot_product_attention formulation in float64: softmax(q k^T / sqrt(Dh) + causal) v."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  t = q.shape[1]
  scores = np.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(q.shape[-1])  # (B, H, T, T)
  scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', probs, v)  # (B, T, H, Dh)


def qkv(dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
  keys = jax.random.split(jax.random.key(0), 3)
  return tuple(jax.random.normal(k, (B, T, H, DH), jnp.float32).astype(dtype) for k in keys)


def core(dropout: float = 0.0, train: bool = False):
  """The attention core as a function of (q, k, v), dropout rng fixed."""
  module = gpt.CausalAttentionCore(dropout)
  rngs = {'dropout': jax.random.key(1)}
  return lambda q, k, v: module.apply({}, q, k, v, train, rngs=rngs)


@pytest.mark.parametrize(
  ('dtype', 'atol'),
  # float32 to rounding; bfloat16 holds 8 bits of mantissa, and q, k, v and the probabilities
  # are each rounded to it.
  [(jnp.float32, 2e-6), (jnp.bfloat16, 3e-2)],
)
def test_attention_equals_the_explicit_formulation(dtype, atol):
  q, k, v = qkv(dtype)
  assert gpt.attention_implementation(q) == 'xla'  # the CPU
  got = jax.jit(core())(q, k, v)
  assert got.dtype == dtype and got.shape == (B, T, H, DH)
  want = numpy_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=atol, rtol=0)
  # The path dropout training takes equals it too (dropout left out).
  explicit = jax.jit(lambda q, k, v: gpt.explicit_attention(q, k, v, lambda p: p))(q, k, v)
  np.testing.assert_allclose(np.asarray(explicit, np.float64), want, atol=atol, rtol=0)


def test_attention_gradients_equal_the_explicit_formulation():
  q, k, v = qkv(jnp.float32)
  w = jax.random.normal(jax.random.key(2), (B, T, H, DH))
  grads = lambda attend: jax.jit(jax.grad(lambda *a: jnp.sum(w * attend(*a)), (0, 1, 2)))(q, k, v)
  got = grads(core())
  want = grads(lambda q, k, v: gpt.explicit_attention(q, k, v, lambda p: p))
  for g, r in zip(got, want, strict=True):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)


def test_the_future_does_not_leak():
  q, k, v = qkv(jnp.float32)
  out = jax.jit(core())(q, k, v)
  changed = jax.jit(core())(q, k.at[:, 7:].set(9.0), v.at[:, 7:].set(-9.0))
  np.testing.assert_array_equal(out[:, :7], changed[:, :7])
  assert not np.allclose(out[:, 7:], changed[:, 7:])


def test_dropout_training_drops_probabilities_and_eval_does_not():
  q, k, v = qkv(jnp.float32)
  want = numpy_attention(q, k, v)
  np.testing.assert_allclose(jax.jit(core(0.5, train=False))(q, k, v), want, atol=2e-6)
  np.testing.assert_allclose(jax.jit(core(0.0, train=True))(q, k, v), want, atol=2e-6)
  dropped = jax.jit(core(0.5, train=True))(q, k, v)
  assert np.abs(np.asarray(dropped) - want).max() > 0.1


def gpt_loss(remat: bool):
  """(loss(params, tokens), params, tokens) of a 4-layer GPT at T = 64."""
  c = config_lib.base_config()
  c.model = models.model_config(
    'gpt', num_layers=4, d_model=64, num_heads=4, d_ff=256, context_length=64, dropout=0.0
  )
  c.model.remat = remat
  meta = {'vocab_size': 97, 'seq_len': 64}
  model = models.build_model(c, meta)
  tokens = jnp.zeros((8, 64), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))['params']
  loss = lambda p, x: model.apply({'params': p}, x, True).mean()
  return loss, params, tokens


def residual_bytes(remat: bool) -> int:
  """Bytes the forward pass keeps for the backward (jax.vjp's residuals, beside the params):
  what any backend must hold between the two, before its compiler's own choices."""
  loss, params, tokens = gpt_loss(remat)
  vjp = jax.eval_shape(lambda p: jax.vjp(lambda p: loss(p, tokens), p)[1], params)
  param_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(vjp)) - param_bytes


def test_remat_keeps_only_block_inputs_for_the_backward():
  plain = residual_bytes(remat=False)
  with pytest.warns(UserWarning, match='saves no memory on the CPU backend'):
    kept = residual_bytes(remat=True)
  # Remat keeps each block's input (B, T, D) in float32 and recomputes the rest, among it the
  # (B, H, T, T) attention probabilities: 4 blocks x 8 x 64 x 64 x 4 bytes = 512 KiB, beside
  # the embedding and head residuals that both keep.
  block_inputs = 4 * 8 * 64 * 64 * 4
  assert plain - kept > 4 * 8 * 4 * 64 * 64 * 4  # at least the probabilities of every block
  assert kept < plain / 4
  assert kept >= block_inputs


def test_remat_barriers_reach_the_gpu_and_tpu_programs():
  """XLA:GPU and XLA:TPU keep a rematerialised block's recomputation apart from the forward
  through its optimization barrier (XLA:CPU drops them); the program lowered for them holds one
  per block with remat and none without."""
  for remat, barriers in ((False, 0), (True, 4)):
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', UserWarning)  # models' CPU remat warning
      loss, params, tokens = gpt_loss(remat)
    lowered = jax.export.export(jax.jit(jax.grad(loss)), platforms=['cuda', 'tpu'])(
      params, jax.ShapeDtypeStruct(tokens.shape, tokens.dtype)
    )
    assert lowered.mlir_module().count('stablehlo.optimization_barrier') == barriers
