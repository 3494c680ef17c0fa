"""The im2col convolution (weight gradient as patches^T @ grad_out) against lax's, and its switch."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sift_jax import config_lib, models
from sift_jax.sparse_layers import conv

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


@pytest.mark.parametrize('kernel', [(3, 3), (1, 1), (5, 3)])
@pytest.mark.parametrize('strides', [(1, 1), (2, 2)])
@pytest.mark.parametrize('padding', ['SAME', 'pytorch'])
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
  assert conv.resolve_impl('auto', 'cpu') == conv.AUTO.get('cpu', 'xla')
  assert conv.resolve_impl('auto', 'tpu') == 'xla'
  assert conv.resolve_impl('im2col') == 'im2col'
  with pytest.raises(ValueError, match="model.conv_impl 'fast'; allowed: auto, xla, im2col"):
    conv.resolve_impl('fast')
  with pytest.raises(ValueError, match="'auto'"), conv.use_impl('auto'):
    pass


def resnet_grads(conv_impl: str):
  """Loss, param grads and the jaxpr text of a width-3 ResNet-18 train-mode step."""
  c = config_lib.base_config()
  c.model = models.model_config('resnet', width=3, conv_impl=conv_impl)
  meta = {'num_classes': 7, 'image_shape': (9, 9, 3)}
  model = models.build_model(c, meta)
  x = jax.random.normal(jax.random.key(1), (2, 9, 9, 3))  # (B, H, W, C)
  variables = jax.jit(model.init)(jax.random.key(0), x)

  def loss(params):
    logits, _ = model.apply(
      {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
    )  # (B, classes)
    return jnp.sum(logits * jnp.arange(7.0))

  fn = jax.value_and_grad(loss)
  return jax.jit(fn)(variables['params']), str(jax.make_jaxpr(fn)(variables['params']))


def test_resnet_step_is_the_same_with_either_conv_impl():
  (loss_x, grads_x), jaxpr_x = resnet_grads('xla')
  (loss_i, grads_i), jaxpr_i = resnet_grads('im2col')
  # Every conv's weight gradient (stem, 16 block convs, 3 shortcuts) became one dot.
  assert jaxpr_i.count('dot_general[') - jaxpr_x.count('dot_general[') == 20
  np.testing.assert_allclose(loss_i, loss_x, rtol=1e-5)
  for path, g in jax.tree_util.tree_leaves_with_path(grads_i):
    r = dict(jax.tree_util.tree_leaves_with_path(grads_x))[path]
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
