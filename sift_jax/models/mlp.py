"""MLP classifier: flatten, a Dense + ReLU stack (sparse, transformed), then a dense classifier."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sift_jax.models import layers


class MLP(nn.Module):
  """float32 inputs (B, ...) -> float32 logits (B, num_classes)."""

  config: ml_collections.ConfigDict
  num_classes: int
  hidden: tuple[int, ...]  # widths of the Dense + ReLU layers
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no dropout or normalisation: train and eval are the same function
    x = x.reshape(x.shape[0], -1).astype(self.dtype)  # (B, D_in)
    for i, width in enumerate(self.hidden):
      x = layers.make_dense(
        self.config,
        width,
        name=f'hidden_{i}',
        kernel_init=nn.initializers.lecun_normal(),
        dtype=self.dtype,
      )(x)
      x = nn.relu(x)  # (B, W_i)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='classifier')(x)
    return x.astype(jnp.float32)  # (B, classes)
