"""The CIFAR networks of the GSE paper (Heddes et al. 2024): CIFAR ResNets and VGG with BatchNorm.

CifarResNet is He et al. 2016's CIFAR family (section 4.2): a 3x3 stem, 3 stages of n basic
blocks at widths w, 2w, 4w (16/32/64), global average pooling, a linear classifier; depth
6n + 2 (ResNet-56: n = 9, 0.86M parameters on CIFAR-100). Shortcuts are parameter-free
(option A): subsample, then zero-pad the new channels.

VGG is VGG-11/13/16/19 with BatchNorm after every conv and five 2x2 max-pools, channels
(w, 2w, 4w, 8w, 8w) per stage; the classifier is flatten -> 32w -> ReLU, dropout -> 32w -> ReLU,
dropout -> classes. The GSE paper's "VGG-16" is its code's `vgg16_bn_small`: w = 16 (a quarter of
Simonyan & Zisserman's 64) and a 512-wide classifier. Its convs carry biases, which are
redundant before BatchNorm and left out here (1,056 parameters fewer than the PyTorch model).

Both models build their layers through the factory (`layers.make_conv` / `make_dense`), so a
Sparse-IFT member replaces the convs inside the blocks (and VGG's hidden classifier layers).
The stem conv and the classifier stay dense unless `sparse_ends` (the GSE code sparsifies every
conv and linear layer).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sift_jax.models import layers
from sift_jax.models.resnet import _norm

RESNET_DEPTHS = {6 * n + 2: n for n in range(1, 19)}  # depth 6n + 2 -> n blocks per stage
VGG_STAGES = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
KERNEL_INITS = {
  # He et al.: N(0, 2 / fan_in) (PyTorch's kaiming_normal_, as in the GSE code's ResNets).
  'he_normal': nn.initializers.variance_scaling(2.0, 'fan_in', 'normal'),
  # The GSE code's sparse init: U(-sqrt(3 / fan_in), sqrt(3 / fan_in)), variance 1 / fan_in;
  # with sparsity.init_rescale the fan-in is each unit's active fan-in, as there.
  'lecun_uniform': nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform'),
}


def _conv_unit(
  config: ml_collections.ConfigDict, kernel_init: layers.Initializer, train: bool, dtype: Any
) -> Callable[..., nn.Module]:
  """The factory's conv + BatchNorm unit with a network's init and dtype."""
  return functools.partial(
    layers.make_conv, config, kernel_init=kernel_init, norm=_norm(train, dtype), dtype=dtype
  )


class ShortcutBlock(nn.Module):
  """relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x)), option-A (parameter-free) shortcut."""

  config: ml_collections.ConfigDict
  features: int
  strides: int
  kernel_init: layers.Initializer
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = _conv_unit(self.config, self.kernel_init, train, self.dtype)
    s = (self.strides, self.strides)
    h = nn.relu(conv(self.features, (3, 3), strides=s, name='conv1')(x))  # (B, H/s, W/s, F)
    h = conv(self.features, (3, 3), name='conv2')(h)
    x = x[:, :: self.strides, :: self.strides, :]  # (B, H/s, W/s, C)
    extra = self.features - x.shape[-1]
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))  # (B, H/s, W/s, F)
    return nn.relu(h + x)


class _CifarNet(nn.Module):
  """The fields and layers both networks share; float32 images -> float32 logits."""

  config: ml_collections.ConfigDict
  num_classes: int
  kernel_init: layers.Initializer
  sparse_ends: bool
  dtype: Any

  def classify(self, x: jax.Array) -> jax.Array:
    """The final linear layer (dense unless sparse_ends): (B, D) -> float32 (B, classes)."""
    x = layers.make_dense(
      self.config,
      self.num_classes,
      name='classifier',
      kernel_init=self.kernel_init,
      transform=False,
      sparse=self.sparse_ends,
      dtype=self.dtype,
    )(x)
    return x.astype(jnp.float32)


class CifarResNet(_CifarNet):
  """float32 images (B, H, W, C) -> float32 logits (B, num_classes)."""

  blocks: int = 9  # basic blocks per stage
  widths: tuple[int, int, int] = (16, 32, 64)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    stem = _conv_unit(self.config, self.kernel_init, train, self.dtype)(
      self.widths[0], (3, 3), name='stem', transform=False, sparse=self.sparse_ends
    )
    x = nn.relu(stem(x.astype(self.dtype)))  # (B, H, W, w)
    for stage, features in enumerate(self.widths):
      for i in range(self.blocks):
        strides = 2 if stage > 0 and i == 0 else 1
        x = ShortcutBlock(
          self.config, features, strides, self.kernel_init, self.dtype, name=f'layer{stage + 1}_{i}'
        )(x, train)
    return self.classify(jnp.mean(x, axis=(1, 2)))  # (B, 4w) -> (B, classes)


class VGG(_CifarNet):
  """float32 images (B, H, W, C) -> float32 logits (B, num_classes); H, W multiples of 32."""

  stages: tuple[int, ...] = (2, 2, 3, 3, 3)  # convs per stage, each ending in a 2x2 max-pool
  widths: tuple[int, ...] = (16, 32, 64, 128, 128)  # channels per stage
  hidden: int = 512  # width of the two hidden classifier layers
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.astype(self.dtype)
    conv = _conv_unit(self.config, self.kernel_init, train, self.dtype)
    for stage, (convs, features) in enumerate(zip(self.stages, self.widths, strict=True)):
      for i in range(convs):
        first = stage == 0 and i == 0
        unit = conv(
          features,
          (3, 3),
          name=f'conv{stage + 1}_{i + 1}',
          transform=not first,
          sparse=self.sparse_ends or not first,
        )
        x = nn.relu(unit(x))  # (B, H', W', features)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)  # (B, H/32 * W/32 * 8w)
    for i in range(2):
      x = layers.make_dense(
        self.config, self.hidden, name=f'fc{i + 1}', kernel_init=self.kernel_init, dtype=self.dtype
      )(x)
      x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))  # (B, hidden)
    return self.classify(x)
