"""GPT decoder (GPT-2 / GPT-3 style): pre-LayerNorm, learned positions, tied LM head.

Attention runs through jax.nn.dot_product_attention (`CausalAttentionCore`). model.remat wraps
each block in nn.remat: the forward pass keeps only the block's input for the backward pass and
recomputes the rest there, the (B, H, T, T) attention probabilities among it. Measured with a
4-layer GPT (d_model 64, 4 heads, d_ff 256, batch 8 x 64 tokens, float32; tests/test_attention.py):
the residuals jax.vjp keeps for the backward fall from 26.3 MB to 1.04 MB with remat, which is
what GPU and TPU compilers keep: they honour the rematerialisation barriers, and the program
lowered for cuda and tpu holds one per block (jax.export; device memory not measured here).
XLA:CPU drops the barriers and merges the recomputation back into the forward: the compiled
value-and-grad's temporaries are 17.73 MB without remat and 17.68 MB with it
(memory_analysis().temp_size_in_bytes, jax 0.10.2), so on the CPU remat saves nothing
(models.build_model warns).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sift_jax.models import layers

# cuDNN's fused attention takes these input dtypes; float32 stays on XLA's formulation.
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def attention_implementation(q: jax.Array) -> str:
  """'cudnn' (fused flash attention) on a GPU backend for bfloat16 / float16 inputs, else 'xla'.

  Chosen here because jax.nn.dot_product_attention's implementation=None means XLA in jax
  0.10.2 (its automatic choice is not implemented yet), and 'cudnn' fails to trace without a
  CUDA backend, so the choice follows the backend the step is traced on: a jax.export for
  platforms=['cuda'] from a CPU host lowers the XLA formulation.
  """
  return 'cudnn' if jax.default_backend() == 'gpu' and q.dtype in CUDNN_DTYPES else 'xla'


def explicit_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, drop_probs: Callable[[jax.Array], jax.Array]
) -> jax.Array:
  """softmax(q k^T / sqrt(d_head) + causal mask) v with the (B, H, T, T) probabilities in
  memory, for attention dropout (`drop_probs`), which jax.nn.dot_product_attention lacks."""
  t = q.shape[1]
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(q.shape[-1])  # (B, H, T, T)
  causal = jnp.tril(jnp.ones((t, t), jnp.bool_))  # (T, T)
  scores = jnp.where(causal, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
  probs = drop_probs(jax.nn.softmax(scores, axis=-1).astype(v.dtype))  # (B, H, T, T)
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v)  # (B, T, H, Dh)


class CausalAttentionCore(nn.Module):
  """Causal softmax attention of (B, T, H, Dh) q, k, v (the FLOP counter's hook).

  Through jax.nn.dot_product_attention (cuDNN flash attention on NVIDIA GPUs in bfloat16,
  XLA's formulation elsewhere), except in training with dropout > 0: the dropout of the
  attention probabilities needs them in memory, so that case runs `explicit_attention`.
  """

  dropout: float

  def forward_flops(
    self, q: jax.Array, k: jax.Array, v: jax.Array, train: bool
  ) -> dict[str, float]:
    """Dense FLOPs of q k^T and probs v, each 2 B H T S Dh (the full T x T, as XLA counts)."""
    del v, train
    b, t, h, dh = q.shape
    matmul = 2.0 * b * h * t * k.shape[1] * dh
    return {'scores': matmul, 'context': matmul}

  @nn.compact
  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, train: bool) -> jax.Array:
    if train and self.dropout > 0:
      drop = nn.Dropout(self.dropout, deterministic=False)
      return explicit_attention(q, k, v, drop)  # (B, T, H, Dh)
    if attention_implementation(q) == 'cudnn':
      try:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')
      except (RuntimeError, NotImplementedError) as e:  # no cuDNN (ROCm), or a shape it lacks
        warnings.warn(f"cuDNN attention unavailable, using XLA's: {e}", stacklevel=2)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='xla')


class Block(nn.Module):
  """x + attn(ln(x)); x + mlp(ln(x)); Q, K, V, out and both MLP kernels through the factory."""

  config: ml_collections.ConfigDict
  d_model: int
  d_ff: int
  num_heads: int
  dropout: float
  init_std: float
  out_std: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    b, t, d = x.shape
    dh = d // self.num_heads
    dense = lambda features, name, std: layers.make_dense(
      self.config,
      features,
      name=name,
      kernel_init=nn.initializers.normal(std),
      dtype=self.dtype,
    )
    drop = nn.Dropout(self.dropout, deterministic=not train)

    h = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='ln_1')(x)  # (B, T, D)
    q, k, v = (
      dense(d, name, self.init_std)(h).reshape(b, t, self.num_heads, dh)  # (B, T, H, Dh)
      for name in ('query', 'key', 'value')
    )
    ctx = CausalAttentionCore(self.dropout, name='core')(q, k, v, train)  # (B, T, H, Dh)
    x = x + drop(dense(d, 'out', self.out_std)(ctx.reshape(b, t, d)))  # (B, T, D)

    h = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='ln_2')(x)
    h = nn.gelu(dense(self.d_ff, 'fc', self.init_std)(h))  # (B, T, F)
    return x + drop(dense(d, 'proj', self.out_std)(h))  # (B, T, D)


class GPT(nn.Module):
  """int32 tokens (B, T) -> float32 logits (B, T, V); logits = ln_f(h) @ wte^T."""

  config: ml_collections.ConfigDict
  vocab_size: int
  num_layers: int
  d_model: int
  d_ff: int
  num_heads: int
  context_length: int
  dropout: float
  init_std: float
  remat: bool
  dtype: Any

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    t = tokens.shape[1]
    if t > self.context_length:
      raise ValueError(f'sequence length {t} exceeds model.context_length {self.context_length}')
    init = nn.initializers.normal(self.init_std)
    wte = nn.Embed(self.vocab_size, self.d_model, embedding_init=init, dtype=self.dtype, name='wte')
    wpe = self.param('wpe', init, (self.context_length, self.d_model))  # (C, D)
    x = wte(tokens) + wpe[:t].astype(self.dtype)  # (B, T, D)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)

    block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    for i in range(self.num_layers):
      x = block_cls(
        self.config,
        self.d_model,
        self.d_ff,
        self.num_heads,
        self.dropout,
        self.init_std,
        self.init_std / math.sqrt(2 * self.num_layers),
        self.dtype,
        name=f'Block_{i}',
      )(x, train)
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='ln_f')(x)
    return wte.attend(x).astype(jnp.float32)  # (B, T, V)
