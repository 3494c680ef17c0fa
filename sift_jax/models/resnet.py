"""ResNet-18/34 (BasicBlock) with the CIFAR or the ImageNet stem; BatchNorm running statistics."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sift_jax.models import layers
from sift_jax.sparse_layers import conv

STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
STEMS = ('cifar', 'imagenet')
# He-normal over fan_out, untruncated (PyTorch's kaiming_normal_(mode='fan_out')).
CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _norm(train: bool, dtype: Any) -> layers.NormFactory:
  return functools.partial(
    nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype
  )


class BasicBlock(nn.Module):
  """relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x)); 1x1 conv + BN shortcut on a change."""

  config: ml_collections.ConfigDict
  features: int
  strides: int
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = _norm(train, self.dtype)
    conv = functools.partial(
      layers.make_conv, self.config, kernel_init=CONV_INIT, norm=norm, dtype=self.dtype
    )
    s = (self.strides, self.strides)
    h = nn.relu(conv(self.features, (3, 3), strides=s, name='conv1')(x))  # (B, H/s, W/s, C)
    h = conv(self.features, (3, 3), name='conv2')(h)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, (1, 1), strides=s, transform=False, name='shortcut')(x)
    return nn.relu(h + x)


class ResNet(nn.Module):
  """float32 images (B, H, W, C) -> float32 logits (B, num_classes)."""

  config: ml_collections.ConfigDict
  num_classes: int
  stage_blocks: tuple[int, ...]
  stem: str
  widths: tuple[int, ...]  # channels of the four stages
  dtype: Any
  conv_impl: str = 'xla'  # sift_jax.sparse_layers.conv.IMPLS

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    # Every convolution below is traced inside this scope, so all run self.conv_impl.
    with conv.use_impl(self.conv_impl):
      x = x.astype(self.dtype)
      if self.stem == 'cifar':
        stem_kernel, stem_strides = (3, 3), (1, 1)
      else:
        stem_kernel, stem_strides = (7, 7), (2, 2)
      pad = [((k - 1) // 2, (k - 1) // 2) for k in stem_kernel]
      x = nn.Conv(
        self.widths[0],
        stem_kernel,
        strides=stem_strides,
        padding=pad,
        use_bias=False,
        kernel_init=CONV_INIT,
        dtype=self.dtype,
        conv_general_dilated=conv.conv_general_dilated,
        name='stem_conv',
      )(x)
      x = nn.relu(_norm(train, self.dtype)(name='stem_norm')(x))
      if self.stem == 'imagenet':
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

      for stage, (blocks, features) in enumerate(zip(self.stage_blocks, self.widths, strict=True)):
        for i in range(blocks):
          strides = 2 if stage > 0 and i == 0 else 1
          x = BasicBlock(self.config, features, strides, self.dtype, name=f'layer{stage + 1}_{i}')(
            x, train
          )
      x = jnp.mean(x, axis=(1, 2))  # (B, C)
      x = nn.Dense(self.num_classes, dtype=self.dtype, name='classifier')(x)
      return x.astype(jnp.float32)  # (B, classes)
