"""The im2col convolution (weight gradient as patches^T @ grad_out) against lax's, and its switch."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sift_jax import config_lib, models
from sift_jax.sparse_layers import ConvNorm, conv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIMS = ('NHWC', 'HWIO', 'NHWC')


def loss_and_grads(fn, x, w, mask, strides, padding):
  """Forward and (dx, dw) of sum(conv(x, w * mask) * probe), float64 on the host."""
  probe_key = jax.random.key(9)

  def loss(x_, w_):
    y = fn(x_, w_ * mask, strides, padding, dimension_numbers=DIMS)  # (B, H_out, W_out, C_out)
    return jnp.sum(y * jax.random.normal(probe_key, y.shape)), y

  (_, y), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(x, w)
  return [np.asarray(a, np.float64) for a in (y, *grads)]


@pytest.mark.parametrize(
  'kernel, strides, padding',
  [
    pytest.param((3, 3), (1, 1), 'pytorch', marks=pytest.mark.slow),
    pytest.param((3, 3), (2, 2), 'pytorch', marks=pytest.mark.slow),
    # Asymmetric padding at even sizes; by default im2col runs in the unit step test below.
    pytest.param((3, 3), (2, 2), 'SAME', marks=pytest.mark.slow),
    pytest.param((1, 1), (2, 2), 'pytorch', marks=pytest.mark.slow),  # the ResNet shortcut
    pytest.param((5, 3), (1, 1), 'SAME', marks=pytest.mark.slow),
  ],
)
def test_im2col_conv_matches_lax_forward_and_grads_with_mask(kernel, strides, padding):
  kx, kw, km = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (3, 7, 11, 5))  # (B, H, W, C_in), odd primes
  w = jax.random.normal(kw, (*kernel, 5, 13))  # (kh, kw, C_in, C_out)
  mask = jax.random.bernoulli(km, 0.3, w.shape).astype(w.dtype)  # a sparse kernel
  pads = 'SAME' if padding == 'SAME' else [((k - 1) // 2, (k - 1) // 2) for k in kernel]
  want = loss_and_grads(jax.lax.conv_general_dilated, x, w, mask, strides, pads)
  got = loss_and_grads(conv.im2col_conv, x, w, mask, strides, pads)
  for name, g, r in zip(('y', 'dx', 'dw'), got, want, strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * np.abs(r).max(), err_msg=name)
  # The mask reaches the weight gradient: inactive weights get none (the rule relies on it).
  assert np.all(got[2][np.asarray(mask) == 0] == 0)
  assert np.abs(got[2]).max() > 0


def test_weight_grad_is_patches_matmul_numpy():
  x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)  # (B, H, W, C_in)
  dy = np.random.default_rng(1).normal(size=(2, 3, 4, 11)).astype(np.float32)  # stride 2, pad 1
  got = np.asarray(conv.weight_grad(x, dy, (3, 3, 3, 11), (2, 2), ((1, 1), (1, 1))))
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = np.zeros((3, 3, 3, 11))
  for i in range(3):
    for j in range(3):
      tap = xp[:, i : i + 5 : 2, j : j + 7 : 2, :]  # (B, 3, 4, C_in)
      want[i, j] = np.einsum('bhwc,bhwo->co', tap, dy)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_im2col_conv_rejects_what_it_does_not_implement():
  x, w = jnp.zeros((1, 5, 5, 2)), jnp.zeros((3, 3, 2, 4))
  with pytest.raises(ValueError, match='rhs_dilation'):
    conv.im2col_conv(x, w, (1, 1), 'SAME', rhs_dilation=(2, 2), dimension_numbers=DIMS)
  with pytest.raises(ValueError, match='NHWC'):
    conv.im2col_conv(x, w, (1, 1), 'SAME', dimension_numbers=('NCHW', 'OIHW', 'NCHW'))


def test_impl_names_resolve_and_bad_names_raise():
  assert conv.resolve_impl('auto', 'cpu') == 'im2col_large'  # measured: benchmarks/README.md
  assert conv.resolve_impl('auto', 'tpu') == 'xla'
  assert conv.resolve_impl('im2col') == 'im2col'
  with pytest.raises(
    ValueError, match="model.conv_impl 'fast'; allowed: auto, xla, im2col, im2col_large"
  ):
    conv.resolve_impl('fast')
  with pytest.raises(ValueError, match="'auto'"), conv.use_impl('auto'):
    pass


def resnet_case(conv_impl: str):
  """A width-3 CIFAR ResNet-18 with `conv_impl`, its variables and input."""
  c = config_lib.base_config()
  c.model = models.model_config('resnet', width=3, conv_impl=conv_impl)
  model = models.build_model(c, {'num_classes': 7, 'image_shape': (9, 9, 3)})
  x = jnp.zeros((2, 9, 9, 3))  # (B, H, W, C)
  return model, jax.eval_shape(model.init, jax.random.key(0), x), x


def test_resnet_runs_every_conv_weight_grad_as_a_dot_under_im2col():
  jaxprs = {}
  for impl in conv.IMPLS:
    model, variables, x = resnet_case(impl)

    def loss(params, batch_stats, model=model, x=x):
      logits, _ = model.apply(
        {'params': params, 'batch_stats': batch_stats}, x, train=True, mutable=['batch_stats']
      )  # (B, classes)
      return jnp.sum(logits)

    args = variables['params'], variables['batch_stats']  # shapes only: nothing is compiled
    jaxprs[impl] = str(jax.make_jaxpr(jax.grad(loss))(*args))
  # Stem, 16 block convs and 3 shortcuts: 20 weight gradients became dots (tracing only).
  assert jaxprs['im2col'].count('dot_general[') - jaxprs['xla'].count('dot_general[') == 20
  assert jaxprs['im2col_large'] == jaxprs['xla']  # batch 2: below the threshold


@pytest.mark.parametrize(
  'batch, dots', [(conv.IM2COL_MIN_BATCH, 1), (conv.IM2COL_MIN_BATCH - 1, 0)]
)
def test_im2col_large_takes_convs_from_min_batch(batch, dots):
  x = jnp.zeros((batch, 5, 3, 2))  # (B, H, W, C_in)

  def loss(w):
    with conv.use_impl('im2col_large'):
      y = conv.conv_general_dilated(x, w, (2, 2), 'SAME', dimension_numbers=DIMS)
    return jnp.sum(y)

  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(jnp.zeros((3, 3, 2, 3))))
  assert jaxpr.count('dot_general[') == dots


def test_conv_unit_step_is_the_same_with_either_conv_impl():
  """A strided ConvNorm (SparseConv + BatchNorm) in train mode: same loss and gradients."""
  unit = ConvNorm(
    features=13,
    kernel_size=(3, 3),
    strides=(2, 2),
    kernel_init=nn.initializers.lecun_normal(),
    norm=functools.partial(nn.BatchNorm, use_running_average=False),
  )
  x = jax.random.normal(jax.random.key(1), (3, 7, 11, 5))  # (B, H, W, C_in)
  variables = unit.init(jax.random.key(0), x)
  probe = jax.random.normal(jax.random.key(2), (3, 4, 6, 13))  # (B, H_out, W_out, C_out)

  def loss(params, x):
    y, _ = unit.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
    return jnp.sum(y * probe)

  results = {}
  for impl in conv.IMPLS:
    with conv.use_impl(impl):
      results[impl] = jax.jit(jax.value_and_grad(loss, (0, 1)))(variables['params'], x)
  want, got = jax.tree.leaves(results['xla']), jax.tree.leaves(results['im2col'])
  for g, r in zip(got, want, strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(jnp.abs(r).max()))


def test_resnet_rejects_unknown_conv_impl():
  c = config_lib.base_config()
  c.model = models.model_config('resnet', width=3, conv_impl='cudnn')
  with pytest.raises(ValueError, match="model.conv_impl 'cudnn'"):
    models.build_model(c, {'num_classes': 7, 'image_shape': (9, 9, 3)})


@pytest.mark.slow
def test_torch_benchmark_smoke():
  """benchmarks/torch_resnet_step.py at its smallest settings (needs benchmarks/requirements.txt)."""
  if importlib.util.find_spec('torch') is None:
    pytest.skip('torch not installed: pip install -r benchmarks/requirements.txt to run this')
  env = {**os.environ, 'PYTHONPATH': REPO}
  cmd = [sys.executable, os.path.join(REPO, 'benchmarks', 'torch_resnet_step.py')]
  args = ['--batch=2', '--steps=1', '--windows=1', '--width=4', '--options=torch:nchw,jax:im2col']
  out = subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert any(line.startswith('torch:nchw') and line.split()[-1] == '1.000' for line in lines)
  assert any(line.startswith('jax:im2col') for line in lines)
  assert lines[-1].startswith('summary: fastest JAX option jax:im2col')
