"""The analytical FLOP counter: closed forms, XLA's own count, densities, training FLOPs, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import ml_collections
import pytest

from sift_jax import config_lib, flops, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(name: str, **model_keys) -> ml_collections.ConfigDict:
  c = config_lib.base_config()
  c.model = models.model_config(name, **model_keys)
  return c


GPT_KEYS = dict(num_layers=2, d_model=39, num_heads=3, d_ff=17, context_length=13, dropout=0.0)
GPT_META = {'vocab_size': 257, 'seq_len': 11}


def gpt_macs(v: int, t: int, d: int, f: int, n: int) -> int:
  """Per sequence: Q, K, V, out (4 T d^2), MLP (2 T d f), scores + context (2 T^2 d), head T d V."""
  return n * (4 * t * d * d + 2 * t * d * f + 2 * t * t * d) + t * d * v


def resnet18_cifar_macs(size: int, width: int, classes: int) -> int:
  macs = size * size * 27 * width  # stem 3x3, stride 1
  c, hw = width, size
  for stage in range(4):
    out = width * 2**stage
    if stage:
      hw //= 2
      macs += hw * hw * (9 * c * out + c * out)  # strided conv1 + 1x1 shortcut
      macs += 3 * hw * hw * 9 * out * out
    else:
      macs += 4 * hw * hw * 9 * out * out
    c = out
  return macs + c * classes


def xla_forward_flops(model, config, meta, batch_size: int) -> float:
  variables = models.abstract_variables(model, config, meta)
  variables = {k: v for k, v in variables.items() if k != 'sparse'}
  x = models.example_input(config, meta, batch_size)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  cost = forward.lower(variables, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a dict in jax 0.10
  return float(cost['flops'])


def test_gpt_per_layer_closed_form():
  c = make_config('gpt', **GPT_KEYS)
  report = flops.count_forward_flops(models.build_model(c, GPT_META), c, GPT_META)
  t, d, f = 11, 39, 17
  layer = report.per_layer
  assert layer['Block_1/query/kernel'].dense_flops == 2 * t * d * d
  assert layer['Block_0/fc/kernel'].dense_flops == 2 * t * d * f
  assert layer['Block_0/proj/kernel'].dense_flops == 2 * t * f * d
  assert layer['Block_0/core/scores'].dense_flops == 2 * t * t * d
  assert layer['Block_0/core/context'].dense_flops == 2 * t * t * d
  assert layer['wte/embedding'].dense_flops == 2 * t * d * 257
  assert len(layer) == 2 * 8 + 1
  assert report.forward == report.forward_dense == 2 * gpt_macs(257, t, d, f, 2)


def test_gpt3_small_flops_from_shapes_only():
  c = make_config('gpt', **models.gpt_preset('gpt3_small'))
  meta = {'vocab_size': 50257, 'seq_len': 1024}
  report = flops.count_forward_flops(models.build_model(c, meta), c, meta)
  assert report.forward_dense == 2 * gpt_macs(50257, 1024, 768, 3072, 12)


def test_cifar_resnet18_macs():
  c = make_config('resnet')
  meta = {'num_classes': 100, 'image_shape': (32, 32, 3)}
  report = flops.count_forward_flops(models.build_model(c, meta), c, meta)
  assert report.forward_dense == 2 * resnet18_cifar_macs(32, 64, 100)
  assert report.forward_dense / 2 == pytest.approx(0.556e9, rel=2e-3)
  assert len(report.per_layer) == 1 + 16 + 3 + 1


def test_remat_does_not_change_the_count():
  plain = make_config('gpt', **GPT_KEYS)
  remat = make_config('gpt', **GPT_KEYS, remat=True)
  count = lambda c: flops.count_forward_flops(models.build_model(c, GPT_META), c, GPT_META)
  with pytest.warns(UserWarning, match='saves no memory on the CPU'):
    counted = count(remat)
  assert count(plain).per_layer == counted.per_layer


@pytest.mark.parametrize(
  'name,keys,meta',
  [
    (
      'gpt',
      dict(GPT_KEYS, d_model=96, d_ff=384, context_length=64),
      {'vocab_size': 251, 'seq_len': 64},
    ),
    ('mlp', {'hidden': (97, 101)}, {'num_classes': 10, 'image_shape': (8, 8, 1)}),
    # Large images: XLA does not count the zero padding of convolutions, so small feature maps
    # would disagree by the padded border alone.
    ('resnet', {'width': 4}, {'num_classes': 10, 'image_shape': (224, 224, 3)}),
  ],
)
def test_matches_xla_cost_analysis(name, keys, meta):
  c = make_config(name, **keys)
  model = models.build_model(c, meta)
  report = flops.count_forward_flops(model, c, meta)
  xla = xla_forward_flops(model, c, meta, batch_size=2)
  # XLA also counts elementwise work (norms, softmax, biases), so it may only be slightly larger.
  assert 2 * report.forward_dense <= xla <= 1.05 * 2 * report.forward_dense


def test_densities_scale_masked_layers_exactly():
  c = make_config('resnet', width=8)
  meta = {'num_classes': 10, 'image_shape': (16, 16, 3)}
  model = models.build_model(c, meta)
  dense = flops.count_forward_flops(model, c, meta)
  densities = flops.uniform_densities(model, c, meta, level=0.75)
  assert len(densities) == 19 and set(densities.values()) == {0.25}
  densities[('layer3_1', 'conv2', 'conv', 'kernel')] = 0.1
  report = flops.count_forward_flops(model, c, meta, densities)
  assert report.forward_dense == dense.forward_dense
  expected = 0.0
  for name, layer in report.per_layer.items():
    d = densities.get(tuple(name.split('/')), 1.0)
    assert layer.density == d and layer.flops == layer.dense_flops * d
    assert layer.dense_flops == dense.per_layer[name].dense_flops
    expected += layer.dense_flops * d
  assert report.forward == pytest.approx(expected, rel=1e-12)
  assert report.per_layer['stem_conv/kernel'].flops == dense.per_layer['stem_conv/kernel'].flops


def test_bad_densities_raise():
  c = make_config('mlp', hidden=(5,))
  meta = {'num_classes': 3, 'image_shape': (4, 4, 1)}
  model = models.build_model(c, meta)
  with pytest.raises(ValueError, match='unknown layers'):
    flops.count_forward_flops(model, c, meta, {('hidden_9', 'kernel'): 0.5})
  with pytest.raises(ValueError, match=r'in \[0, 1\]'):
    flops.count_forward_flops(model, c, meta, {('hidden_0', 'kernel'): 1.5})


@pytest.mark.parametrize(
  ('rule', 'step', 'expect'),
  [
    ('dense', 0, 3 * 120),
    ('static', 0, 3 * 50),
    ('set', 0, 3 * 50),
    ('gmp', 0, 3 * 50),
    ('rigl', 0, (3 * 50 * 4 + 2 * 50 + 120) / 5),  # updating: one dense gradient in dT + 1
    ('rigl', 36, (3 * 50 * 4 + 2 * 50 + 120) / 5),  # the last update step
    ('rigl', 37, 3 * 50),
    ('topkast', 0, 2 * 50 + (60 + 20)),  # f_A forward and input grads, f_B weight grads
  ],
)
def test_training_flops_per_example(rule, step, expect):
  from sift_jax import sparsity

  params = {
    'a': {'kernel': jax.ShapeDtypeStruct((10, 10), 'float32')},
    'head': {'kernel': jax.ShapeDtypeStruct((10, 2), 'float32')},
  }
  c = config_lib.base_config()
  c.total_steps = 50  # updates every 4 steps before step 38: the last at 36
  c.sparsity.update(rule=rule, level=0.0 if rule == 'dense' else 0.7, update_every_steps=4)
  c.sparsity.topkast_every_steps = 4
  c.sparsity.backward_level = 0.4 if rule == 'topkast' else 0.0
  layers = {
    'a/kernel': flops.LayerFlops(100.0, 100.0, 1.0),
    'head/kernel': flops.LayerFlops(20.0, 20.0, 1.0),
  }
  report = flops.FlopReport(layers, forward=120.0, forward_dense=120.0)
  r = sparsity.make_rule(c, params, [('a', 'kernel')])
  got = flops.training_flops_per_example(r, report, {('a', 'kernel'): 0.3}, step)
  assert got == pytest.approx(expect)


def test_cli_prints_per_layer_table(tmp_path):
  config_file = tmp_path / 'mlp_config.py'
  config_file.write_text(
    textwrap.dedent(
      """
      from sift_jax import config_lib, models

      def get_config():
        c = config_lib.base_config()
        c.model = models.model_config('mlp', hidden=(13,))
        c.sparsity.rule = 'static'
        c.sparsity.level = 0.5
        return c
      """
    )
  )
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run(
    [sys.executable, '-m', 'sift_jax.model_report', f'--config={config_file}'],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if '/' in line}
  # Sized by the config's dataset (base_config: digits, 8x8x1 images, 10 classes).
  assert float(rows['hidden_0/kernel'][0]) == pytest.approx(2 * 64 * 13 / 1e6, abs=1e-3)
  assert float(rows['hidden_0/kernel'][2]) == pytest.approx(64 * 13 / 1e6, abs=1e-3)
  assert float(rows['classifier/kernel'][0]) == pytest.approx(2 * 13 * 10 / 1e6, abs=1e-3)
  assert rows['hidden_0/kernel'][1] == '0.5000' and rows['classifier/kernel'][1] == '1.0000'
  assert 'params: 985' in out  # 64 * 13 + 13 + 13 * 10 + 10
  assert 'training GFLOPs per example (static)' in out
