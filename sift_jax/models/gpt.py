"""GPT decoder (GPT-2 / GPT-3 style): pre-LayerNorm, learned positions, tied LM head."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sift_jax.models import layers


class CausalAttentionCore(nn.Module):
  """softmax(q k^T / sqrt(d_head) + causal mask) v over the full T x T (the FLOP counter's hook)."""

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
    t = q.shape[1]
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    causal = jnp.tril(jnp.ones((t, t), jnp.bool_))  # (T, T)
    scores = jnp.where(causal, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # (B, H, T, T)
    probs = nn.Dropout(self.dropout, deterministic=not train)(probs)
    return jnp.einsum('bhqk,bkhd->bqhd', probs, v)  # (B, T, H, Dh)


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
