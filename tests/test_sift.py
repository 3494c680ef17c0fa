"""Sparse-IFT size rules, config group and layers (phase 1: no model wiring needed)."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sift_jax import config_lib, flops
from sift_jax.models.layers import sparse_kernel_paths
from sift_jax.sift import layers as sift_layers
from sift_jax.sift import match, members, settings, sizes

LEVELS = (0.5, 0.75, 0.9)
# s = p / q exactly, for integer references.
RATIONAL = {0.5: (1, 2), 0.75: (3, 4), 0.9: (9, 10)}
PRIME_DIMS = [(3, 5), (7, 7), (13, 11), (97, 89), (257, 263), (1_009, 4_099), (2_304, 769)]


def ceil_div(a: int, b: int) -> int:
  return -(-a // b)


# Size rules.


@pytest.mark.parametrize('level,b', [(0.0, 1), (0.5, 2), (0.75, 4), (0.9, 10), (0.8, 5), (0.6, 2)])
def test_branch_count_original(level, b):
  assert sizes.branch_count(level) == b


@pytest.mark.parametrize(
  'level,resnet,gpt',
  [(0.5, (90, 180, 360, 720), 1092), (0.75, (128, 256, 512, 1024), 1536), (0.9, (202,), 2436)],
)
def test_wide_widths_match_original(level, resnet, gpt):
  # The original code widens the base width and doubles it per stage: 64 -> 90, 180, 360, 720.
  base = sizes.scale_width(64, sizes.width_factor(level))
  assert tuple(base * 2**i for i in range(len(resnet))) == resnet
  d_model = sizes.scale_width(768, sizes.width_factor(level), multiple_of=12)
  assert d_model == gpt and d_model % 12 == 0
  assert d_model >= 768 * math.sqrt(sizes.branch_count(level))


def test_exact_rounding():
  assert sizes.width_factor(0.75, 'exact') == 2.0
  assert sizes.width_factor(0.6, 'exact') == pytest.approx(math.sqrt(2.5))
  assert sizes.width_factor(0.6) == pytest.approx(math.sqrt(2))
  assert sizes.branch_count(0.9, 'exact') == 10
  with pytest.raises(ValueError, match='integer.*s=0.6'):
    sizes.branch_count(0.6, 'exact')
  with pytest.raises(ValueError, match="'nearest'; allowed: original, exact"):
    sizes.width_factor(0.5, 'nearest')


@pytest.mark.parametrize('level', LEVELS)
@pytest.mark.parametrize('d_in,d_out', PRIME_DIMS)
def test_ranks_equal_formulas_in_integers(level, d_in, d_out):
  p, q = RATIONAL[level]
  d = sizes.factorized_rank(d_in, d_out, level)
  r = sizes.doped_rank(d_in, d_out, level)
  assert d == ceil_div(d_in * d_out * q, (q - p) * (d_in + d_out))
  assert r == (p * d_in * d_out) // (q * (d_in + d_out))
  # d is the smallest width whose sparse U, V cost at least the dense layer; r the largest
  # rank whose dense U V fit in the FLOPs the sparse weight leaves.
  assert (q - p) * d * (d_in + d_out) >= q * d_in * d_out > (q - p) * (d - 1) * (d_in + d_out)
  assert q * r * (d_in + d_out) <= p * d_in * d_out < q * (r + 1) * (d_in + d_out)


def test_rank_of_exact_integer_is_not_bumped_by_float_error():
  # 9 * 64 * 64 / (0.1 * (9 * 64 + 64)) = 576 exactly; naive float arithmetic gives 577.
  assert math.ceil(9 * 64 * 64 / ((1 - 0.9) * (9 * 64 + 64))) == 577
  assert sizes.factorized_rank(9 * 64, 64, 0.9) == 576


@pytest.mark.parametrize('bad', [1.0, -0.1, 1.5])
def test_bad_level_raises(bad):
  with pytest.raises(ValueError, match='outside'):
    sizes.branch_count(bad)
  with pytest.raises(ValueError, match='outside'):
    sizes.factorized_rank(3, 5, bad)


def test_doped_rank_zero_at_zero_sparsity_and_bad_dims():
  assert sizes.doped_rank(97, 89, 0.0) == 0
  assert sizes.factorized_rank(2, 2, 0.0) == 1
  with pytest.raises(ValueError, match='D_in=0'):
    sizes.doped_rank(0, 5, 0.5)


# The config group.


def sift_config(name='dense', level=0.0, **sift_keys):
  c = config_lib.base_config()
  c.sift.name = name
  c.sparsity.level = level
  c.sift.update(sift_keys)
  return c


def test_settings_defaults_and_switches():
  s = settings.from_config(sift_config('factorized', 0.75))
  assert s == settings.SiftSettings('factorized', 0.75, False, 'norm_relu', False, 'original')
  s = settings.from_config(sift_config('doped', 0.5, doped_sparse_uv=True, rounding='exact'))
  assert s.doped_sparse_uv and s.rounding == 'exact'
  hash(s)  # flax module attributes must be hashable


@pytest.mark.parametrize(
  'name,keys,match',
  [
    # Other test modules register toy members, so the list may hold more names.
    ('tall', {}, "unknown sift member 'tall'; known: dense, doped, factorized, (.*, )?parallel, "),
    ('wide', {'factorized_between': 'relu'}, "'relu'; allowed: none, norm, norm_relu"),
    ('wide', {'rounding': 'floor'}, "'floor'; allowed: original, exact"),
    ('dense', {'match_flops': True}, 'match_flops needs a Sparse-IFT member'),
  ],
)
def test_settings_bad_values(name, keys, match):
  c = sift_config(name, 0.5)
  for k, v in keys.items():
    c.sift[k] = v
  with pytest.raises(ValueError, match=match):
    settings.from_config(c)


def test_settings_unknown_key_and_erk():
  c = sift_config('wide', 0.5)
  c.sift.widht = 2
  with pytest.raises(ValueError, match=r"unknown sift key\(s\) \['widht'\]"):
    settings.from_config(c)
  c = sift_config('parallel', 0.5)
  c.sparsity.distribution = 'erk'
  with pytest.raises(ValueError, match="distribution=uniform.*'erk'"):
    settings.from_config(c)
  c.sift.name = 'dense'
  assert settings.from_config(c).name == 'dense'


# The layers.


class Host(nn.Module):
  """Calls one member-built layer, as a model would."""

  build: object

  @nn.compact
  def __call__(self, x):
    return self.build()(x)


BN = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=1e-5)


def build_dense(name, level, features, **keys):
  m = members.member(sift_config(name, level, **keys))
  return Host(lambda: m.dense(features, name='layer', kernel_init=nn.initializers.normal(0.5)))


def build_conv(name, level, features, strides=(1, 1), **keys):
  m = members.member(sift_config(name, level, **keys))
  return Host(
    lambda: m.conv(
      features,
      (3, 3),
      name='layer',
      kernel_init=nn.initializers.he_normal(),
      norm=BN,
      strides=strides,
    )
  )


def shapes(variables):
  return {
    '/'.join(k.key for k in path): tuple(v.shape)
    for path, v in jax.tree_util.tree_flatten_with_path(variables['params']['layer'])[0]
  }


def sparse_names(variables):
  return ['/'.join(p[1:]) for p in sparse_kernel_paths(variables)]


def init(module, x):
  return module.init(jax.random.key(0), x)


def abstract_init(module, x):
  return jax.eval_shape(functools.partial(init, module), x)


@pytest.mark.parametrize('level', LEVELS)
def test_dense_forms_shapes_and_sparse_declarations(level):
  d_in, d_out = 13, 11
  x = jnp.ones((2, d_in))
  b = sizes.branch_count(level)
  v = abstract_init(build_dense('parallel', level, d_out), x)
  assert sparse_names(v) == sorted(f'branch_{i}/kernel' for i in range(b))
  assert shapes(v)[f'branch_{b - 1}/kernel'] == (d_in, d_out)
  assert shapes(v)[f'norm_{b - 1}/scale'] == (d_out,)

  d = sizes.factorized_rank(d_in, d_out, level)
  v = abstract_init(build_dense('factorized', level, d_out), x)
  assert sparse_names(v) == ['u/kernel', 'v/kernel']
  assert shapes(v) == {
    'u/kernel': (d_in, d),
    'u_norm/scale': (d,),
    'u_norm/bias': (d,),
    'v/kernel': (d, d_out),
    'v/bias': (d_out,),
  }

  r = sizes.doped_rank(d_in, d_out, level)
  v = abstract_init(build_dense('doped', level, d_out), x)
  assert sparse_names(v) == ['sparse/kernel']
  assert shapes(v) == {
    'sparse/kernel': (d_in, d_out),
    'sparse/bias': (d_out,),
    'u/kernel': (d_in, r),
    'v/kernel': (r, d_out),
  }
  v = abstract_init(build_dense('doped', level, d_out, doped_sparse_uv=True), x)
  assert sparse_names(v) == ['sparse/kernel', 'u/kernel', 'v/kernel']

  for name in ('dense', 'wide'):
    v = abstract_init(build_dense(name, level, d_out), x)
    assert sparse_names(v) == ['kernel'] and shapes(v) == {
      'kernel': (d_in, d_out),
      'bias': (d_out,),
    }


def macs(variables, level, per_position=1):
  """MACs per output position of a layer from its kernels: sparse ones at density 1 - s."""
  sparse = set(sparse_names(variables))
  return sum(
    math.prod(shape) * ((1 - level) if name in sparse else 1.0) * per_position
    for name, shape in shapes(variables).items()
    if name.endswith('kernel')
  )


@pytest.mark.parametrize('name', ['parallel', 'factorized', 'doped', 'wide'])
@pytest.mark.parametrize('level', LEVELS)
def test_member_layers_are_iso_flop(name, level):
  # Odd prime sizes: 257 -> 263 Dense, 31 -> 37 channels 3x3 conv (D_in = 279).
  dense = abstract_init(build_dense(name, level, 263), jnp.ones((1, 257)))
  conv = abstract_init(build_conv(name, level, 37), jnp.ones((1, 8, 8, 31)))
  if name == 'wide':  # iso-FLOP only with the model widened: k^2 (1 - s) = b (1 - s) ~ 1
    k = sizes.width_factor(level)
    assert macs(dense, level) * k * k == pytest.approx(257 * 263, rel=0.05)
    return
  assert macs(dense, level) == pytest.approx(257 * 263, rel=0.02)
  assert macs(conv, level) == pytest.approx(279 * 37, rel=0.02)


def test_doped_sparse_uv_reproduces_released_flop_deficit():
  # docs/methods.md: the release's sparse U V leaves 0.75 / 0.44 / 0.19 of dense FLOPs.
  for level, ratio in zip(LEVELS, (0.75, 0.44, 0.19), strict=True):
    v = abstract_init(build_dense('doped', level, 1024, doped_sparse_uv=True), jnp.ones((1, 1024)))
    assert macs(v, level) / 1024**2 == pytest.approx(ratio, abs=0.01)


def test_parallel_dense_forward_matches_numpy():
  x = np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32)
  module = build_dense('parallel', 0.75, 5)
  variables = init(module, x)
  params = jax.tree_util.tree_map(np.asarray, variables['params']['layer'])
  out = 0
  for i in range(4):
    h = x @ params[f'branch_{i}']['kernel'] + params[f'branch_{i}']['bias']
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
    out = out + h * params[f'norm_{i}']['scale'] + params[f'norm_{i}']['bias']
  np.testing.assert_allclose(module.apply(variables, x), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('between', settings.BETWEEN)
def test_factorized_dense_forward_matches_numpy(between):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 11)).astype(np.float32)
  module = build_dense('factorized', 0.5, 7, factorized_between=between)
  variables = init(module, x)
  p = jax.tree_util.tree_map(np.asarray, variables['params']['layer'])
  if between != 'none':
    # Non-trivial norm parameters, so a missing or misplaced norm shows.
    p['u_norm'] = {'scale': rng.normal(size=p['u']['kernel'].shape[1])}
    p['u_norm']['bias'] = rng.normal(size=p['u_norm']['scale'].shape)
    variables = {'params': {'layer': jax.tree_util.tree_map(jnp.asarray, p)}}
  h = x @ p['u']['kernel']
  if between != 'none':
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
    h = h * p['u_norm']['scale'] + p['u_norm']['bias']
  if between == 'norm_relu':
    h = np.maximum(h, 0)
  expected = h @ p['v']['kernel'] + p['v']['bias']
  np.testing.assert_allclose(module.apply(variables, x), expected, rtol=1e-4, atol=1e-4)


def test_doped_dense_forward_matches_numpy():
  x = np.random.default_rng(2).normal(size=(3, 13)).astype(np.float32)
  module = build_dense('doped', 0.9, 17)
  variables = init(module, x)
  p = jax.tree_util.tree_map(np.asarray, variables['params']['layer'])
  assert p['u']['kernel'].shape == (13, sizes.doped_rank(13, 17, 0.9)) == (13, 6)
  expected = (
    x @ p['sparse']['kernel'] + p['sparse']['bias'] + x @ p['u']['kernel'] @ p['v']['kernel']
  )
  np.testing.assert_allclose(module.apply(variables, x), expected, rtol=1e-4, atol=1e-4)


def conv_nhwc(x, kernel, strides):
  return jax.lax.conv_general_dilated(
    x, kernel, strides, [(1, 1), (1, 1)], dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


@pytest.mark.parametrize('strides', [(1, 1), (2, 2)])
def test_conv_forms_structure_and_linearity(strides):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 9, 9, 5)), jnp.float32)
  c_out, level = 7, 0.75
  scale = 1 / np.sqrt(1 + 1e-5)  # BatchNorm at its initial running statistics

  v = init(build_conv('doped', level, c_out, strides), x)
  p = v['params']['layer']
  r = sizes.doped_rank(45, c_out, level)
  assert p['u']['kernel'].shape == (3, 3, 5, r) and p['v']['kernel'].shape == (1, 1, r, c_out)
  assert sparse_names(v) == ['sparse/kernel']
  # Sparse Doped is linear: one conv with W + U V composed, then the block's norm.
  composed = p['sparse']['kernel'] + jnp.einsum(
    'hwir,ro->hwio', p['u']['kernel'], p['v']['kernel'][0, 0]
  )
  out = build_conv('doped', level, c_out, strides).apply(v, x)
  assert out.shape == (2, 9 // strides[0] + 9 % strides[0], 9 // strides[1] + 9 % strides[1], c_out)
  np.testing.assert_allclose(out, conv_nhwc(x, composed, strides) * scale, rtol=1e-4, atol=1e-4)

  v = init(build_conv('factorized', level, c_out, strides, factorized_between='none'), x)
  p = v['params']['layer']
  d = sizes.factorized_rank(45, c_out, level)
  assert p['u']['kernel'].shape == (3, 3, 5, d) and p['v']['kernel'].shape == (1, 1, d, c_out)
  assert sparse_names(v) == ['u/kernel', 'v/kernel'] and 'norm' in p and 'u_norm' not in p
  composed = jnp.einsum('hwid,do->hwio', p['u']['kernel'], p['v']['kernel'][0, 0])
  out = build_conv('factorized', level, c_out, strides, factorized_between='none').apply(v, x)
  np.testing.assert_allclose(out, conv_nhwc(x, composed, strides) * scale, rtol=1e-4, atol=1e-4)

  module = build_conv('parallel', level, c_out, strides)
  v = init(module, x)
  p = v['params']['layer']
  assert sparse_names(v) == [f'branch_{i}/kernel' for i in range(4)] and 'norm' not in p
  expected = sum(conv_nhwc(x, p[f'branch_{i}']['kernel'], strides) * scale for i in range(4))
  np.testing.assert_allclose(module.apply(v, x), expected, rtol=1e-4, atol=1e-4)


# match_flops.


def report(fixed, sparse_layers):
  per_layer = {'stem/kernel': flops.LayerFlops(fixed, fixed, 1.0)}
  per_layer.update({n: flops.LayerFlops(f, f, 1.0) for n, f in sparse_layers.items()})
  total = fixed + sum(sparse_layers.values())
  return flops.FlopReport(per_layer=per_layer, forward=total, forward_dense=total)


def test_matched_level_solves_affine_budget():
  rep = report(100.0, {'a/kernel': 3000.0, 'b/kernel': 1000.0})
  paths = [('a', 'kernel'), ('b', 'kernel')]
  counts = {('a', 'kernel'): 30_000, ('b', 'kernel'): 10_000}
  level = match.matched_level(rep, paths, counts, target_flops=1100.0)
  assert level == pytest.approx(0.75)  # 100 + 0.25 * 4000 = 1100
  with pytest.raises(ValueError, match='no sparsity in'):
    match.matched_level(rep, paths, counts, target_flops=90.0)
  with pytest.raises(ValueError, match='no FLOP record'):
    match.matched_level(rep, [('c', 'kernel')], counts, target_flops=1100.0)
  with pytest.raises(ValueError, match='exact mask counts'):
    # 3 weights cannot hold density 1/3 + 0.05 closely enough.
    match.matched_level(
      report(0.0, {'a/kernel': 300.0}), paths[:1], {('a', 'kernel'): 3}, target_flops=115.0
    )


@pytest.mark.parametrize('name', ['dense', 'wide', 'parallel', 'factorized', 'doped'])
def test_member_layers_are_marked_transformed_units(name):
  assert sift_layers.is_unit(build_dense(name, 0.5, 3).build())
  assert sift_layers.is_unit(build_conv(name, 0.5, 3).build())
  assert not sift_layers.is_unit(nn.Dense(3))
