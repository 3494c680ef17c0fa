"""Sparse-IFT members wired into the models: widths, structure, iso-FLOP accounting, XLA check."""

from __future__ import annotations

import jax
import pytest

from sift_jax import config_lib, flops, models
from sift_jax.models.layers import sparse_kernel_paths
from sift_jax.sift import match, report, sizes

LEVELS = (0.5, 0.75, 0.9)
MEMBERS = ('wide', 'parallel', 'factorized', 'doped')
RESNET_CIFAR = ('resnet', {'depth': 18, 'stem': 'cifar', 'width': 64})
RESNET_IMAGENET = ('resnet', {'depth': 18, 'stem': 'imagenet', 'width': 64})
CIFAR_META = {'num_classes': 100, 'image_shape': (32, 32, 3)}
IMAGENET_META = {'num_classes': 1000, 'image_shape': (224, 224, 3)}
GPT_META = {'vocab_size': 50257, 'seq_len': 1024}
MLP_META = {'num_classes': 10, 'image_shape': (28, 28, 1)}


def make_config(name, keys, member='dense', level=0.0, **sift_keys):
  c = config_lib.base_config()
  c.model = models.model_config(name, **keys)
  c = report.configured(c, member, level)
  c.sift.update(sift_keys)
  return c


def gpt_small(num_layers=12):
  return ('gpt', {**models.gpt_preset('gpt3_small'), 'num_layers': num_layers})


def abstract(c, meta):
  return models.abstract_variables(models.build_model(c, meta), c, meta)


def kernel_shape(variables, *path):
  leaf = variables['params']
  for key in path:
    leaf = leaf[key]
  return leaf.shape


# Widths and structure.


@pytest.mark.parametrize(
  'level,base', [(0.5, 90), (0.75, 128), (0.9, 202)], ids=['s0.5', 's0.75', 's0.9']
)
def test_wide_resnet18_stage_widths(level, base):
  v = abstract(make_config(*RESNET_CIFAR, 'wide', level), CIFAR_META)
  widths = [kernel_shape(v, f'layer{i}_0', 'conv1', 'conv', 'kernel')[-1] for i in range(1, 5)]
  assert widths == [base, 2 * base, 4 * base, 8 * base]
  assert kernel_shape(v, 'stem_conv', 'kernel') == (3, 3, 3, base)
  assert kernel_shape(v, 'classifier', 'kernel') == (8 * base, 100)
  # Stem and classifier stay dense; shortcuts are widened and sparse.
  paths = {'/'.join(p) for p in sparse_kernel_paths(v)}
  assert 'stem_conv/kernel' not in paths and 'classifier/kernel' not in paths
  assert 'layer2_0/shortcut/conv/kernel' in paths
  assert kernel_shape(v, 'layer2_0', 'shortcut', 'conv', 'kernel') == (1, 1, base, 2 * base)


@pytest.mark.parametrize('level,d_model', [(0.5, 1092), (0.75, 1536)])
def test_wide_gpt_small_widths(level, d_model):
  v = abstract(make_config(*gpt_small(1), 'wide', level), GPT_META)
  assert kernel_shape(v, 'wte', 'embedding') == (50257, d_model)
  assert kernel_shape(v, 'Block_0', 'query', 'kernel') == (d_model, d_model)
  assert kernel_shape(v, 'Block_0', 'fc', 'kernel') == (d_model, 4 * d_model)
  paths = {'/'.join(p) for p in sparse_kernel_paths(v)}
  assert paths == {f'Block_0/{n}/kernel' for n in ('query', 'key', 'value', 'out', 'fc', 'proj')}


@pytest.mark.parametrize('level,b', [(0.5, 2), (0.75, 4), (0.9, 10)])
def test_parallel_branch_counts(level, b):
  v = abstract(make_config(*RESNET_CIFAR, 'parallel', level), CIFAR_META)
  unit = v['params']['layer3_1']['conv2']
  assert sorted(unit) == sorted([f'branch_{i}' for i in range(b)] + [f'norm_{i}' for i in range(b)])
  v = abstract(make_config('mlp', {'hidden': (97, 89)}, 'parallel', level), MLP_META)
  assert len([k for k in v['params']['hidden_1'] if k.startswith('branch_')]) == b


@pytest.mark.parametrize('level', LEVELS)
def test_factorized_and_doped_ranks_in_models(level):
  # Odd prime MLP widths: 784 -> 97 -> 89.
  c = make_config('mlp', {'hidden': (97, 89)}, 'factorized', level)
  v = abstract(c, MLP_META)
  assert kernel_shape(v, 'hidden_1', 'u', 'kernel') == (97, sizes.factorized_rank(97, 89, level))
  assert kernel_shape(v, 'hidden_0', 'v', 'kernel') == (sizes.factorized_rank(784, 97, level), 97)
  v = abstract(make_config('mlp', {'hidden': (97, 89)}, 'doped', level), MLP_META)
  assert kernel_shape(v, 'hidden_1', 'u', 'kernel') == (97, sizes.doped_rank(97, 89, level))
  assert kernel_shape(v, 'hidden_1', 'sparse', 'kernel') == (97, 89)
  # ResNet: a 3x3 conv 128 -> 256 channels has D_in = 1152.
  v = abstract(make_config(*RESNET_CIFAR, 'factorized', level), CIFAR_META)
  d = sizes.factorized_rank(9 * 128, 256, level)
  assert kernel_shape(v, 'layer3_0', 'conv1', 'u', 'kernel') == (3, 3, 128, d)
  assert kernel_shape(v, 'layer3_0', 'conv1', 'v', 'kernel') == (1, 1, d, 256)
  v = abstract(make_config(*RESNET_CIFAR, 'doped', level), CIFAR_META)
  r = sizes.doped_rank(9 * 128, 256, level)
  assert kernel_shape(v, 'layer3_0', 'conv1', 'u', 'kernel') == (3, 3, 128, r)
  paths = {'/'.join(p) for p in sparse_kernel_paths(v)}
  assert 'layer3_0/conv1/sparse/kernel' in paths and 'layer3_0/conv1/u/kernel' not in paths


# Iso-FLOP accounting (shapes only: the full-size models are never allocated).


def check_iso_flop(name, keys, meta, member, level, whole_model):
  r = report.sift_flops(make_config(name, keys, member, level), meta)
  # The MLP's first input and last output are the data's: Sparse Wide cannot widen them, so
  # only its whole-model FLOPs (with match_flops) are iso.
  if not (member == 'wide' and name == 'mlp'):
    assert r.transformed / r.dense_transformed == pytest.approx(1.0, abs=0.02)
  if member == 'wide' and whole_model:
    m = report.sift_flops(make_config(name, keys, member, level, match_flops=True), meta)
    assert m.forward / m.dense_forward == pytest.approx(1.0, abs=1e-3)
    assert (m.mask_level > level) == (m.transformed < r.transformed)
  return r


@pytest.mark.parametrize('level', LEVELS)
@pytest.mark.parametrize('member', MEMBERS)
@pytest.mark.parametrize(
  'model,meta',
  [(RESNET_CIFAR, CIFAR_META), (('mlp', {'hidden': (1024, 1024)}), MLP_META)],
  ids=['resnet18_cifar', 'mlp'],
)
def test_iso_flop(model, meta, member, level):
  check_iso_flop(*model, meta, member, level, whole_model=True)


@pytest.mark.slow
@pytest.mark.parametrize('level', LEVELS)
@pytest.mark.parametrize('member', MEMBERS)
def test_iso_flop_resnet18_imagenet(member, level):
  check_iso_flop(*RESNET_IMAGENET, IMAGENET_META, member, level, whole_model=True)


@pytest.mark.parametrize('level', LEVELS)
@pytest.mark.parametrize('member', MEMBERS)
def test_iso_flop_gpt_small_block(member, level):
  # One GPT-3 Small block at context 1024: the per-layer ratios of the full model.
  check_iso_flop(*gpt_small(1), GPT_META, member, level, whole_model=False)


@pytest.mark.slow
@pytest.mark.parametrize('level', LEVELS)
@pytest.mark.parametrize('member', MEMBERS)
def test_iso_flop_gpt_small(member, level):
  r = check_iso_flop(*gpt_small(), GPT_META, member, level, whole_model=False)
  if member == 'wide':
    # docs/methods.md: attention scores and the LM head grow with width (+18% / +40%).
    expected = {0.5: 1.18, 0.75: 1.40}.get(level)
    if expected:
      assert r.forward / r.dense_forward == pytest.approx(expected, abs=0.03)


def test_mask_level_is_the_solved_level():
  c = make_config('mlp', {'hidden': (1024, 1024)}, 'wide', 0.75)
  assert match.mask_level(c, MLP_META) == 0.75
  c.sift.match_flops = True
  solved = match.mask_level(c, MLP_META)
  assert solved == pytest.approx(report.sift_flops(c, MLP_META).mask_level, abs=1e-12)
  # The widened layers' inputs and outputs include the data's: the matched density is higher.
  assert 0.5 < solved < 0.75


@pytest.mark.slow
def test_wide_gpt_small_whole_model_match_solves_a_higher_sparsity():
  c = make_config(*gpt_small(), 'wide', 0.75, match_flops=True)
  r = report.sift_flops(c, GPT_META)
  assert r.forward / r.dense_forward == pytest.approx(1.0, abs=1e-3)
  assert r.mask_level > 0.9  # the 4x LM head and attention scores take most of the budget


def test_match_without_a_solution_raises():
  # One GPT-3 Small block: the doubled LM head alone exceeds the dense model's FLOPs.
  c = make_config(*gpt_small(1), 'wide', 0.75, match_flops=True)
  with pytest.raises(ValueError, match='no sparsity in'):
    match.mask_level(c, GPT_META)


def test_doped_sparse_uv_switch_in_resnet():
  for level, ratio in zip(LEVELS, (0.75, 0.44, 0.19), strict=True):
    c = make_config(*RESNET_CIFAR, 'doped', level, doped_sparse_uv=True)
    r = report.sift_flops(c, CIFAR_META)
    assert r.transformed / r.dense_transformed == pytest.approx(ratio, abs=0.02)


# The FLOP counter against XLA, for every member's forward pass with all weights dense.

XLA_CASES = {
  'gpt': (
    ('gpt', {'num_layers': 2, 'd_model': 192, 'num_heads': 4, 'd_ff': 0, 'context_length': 64}),
    {'vocab_size': 251, 'seq_len': 64},
  ),
  'mlp': (('mlp', {'hidden': (257, 263)}), {'num_classes': 10, 'image_shape': (16, 16, 1)}),
  # Large images: XLA does not count the zero padding of convolutions.
  'resnet': (('resnet', {'width': 4}), {'num_classes': 10, 'image_shape': (224, 224, 3)}),
}


def check_against_xla(case, member):
  model_keys, meta = XLA_CASES[case]
  c = make_config(*model_keys, member, 0.75 if member != 'dense' else 0.0)
  model = models.build_model(c, meta)
  variables = {k: v for k, v in abstract(c, meta).items() if k != 'sparse'}
  x = models.example_input(c, meta)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  cost = forward.lower(variables, x).compile().cost_analysis()
  xla = float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])
  ours = flops.count_forward_flops(model, c, meta).forward_dense
  # XLA also counts elementwise work (norms, softmax, biases), so it may only be slightly larger.
  assert ours <= xla <= 1.05 * ours


@pytest.mark.parametrize('member', ('dense', *MEMBERS))
@pytest.mark.parametrize('case', ['gpt', 'mlp'])
def test_flop_counter_agrees_with_xla(case, member):
  check_against_xla(case, member)


@pytest.mark.slow
@pytest.mark.parametrize('member', ('dense', *MEMBERS))
def test_flop_counter_agrees_with_xla_resnet(member):
  check_against_xla('resnet', member)
