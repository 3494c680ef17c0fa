"""GSE on convolutions: sampled conv weight gradients, the rule on conv nets, the paper's models
and configs, and a trainer run."""

from __future__ import annotations

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sift_jax import config_lib, models, sparsity, train
from sift_jax.sparsity import gse, plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Odd prime sizes throughout: input (B, H, W, C_in) = (3, 11, 13, 5), 7 output channels.
GEOMETRIES = [
  dict(kernel_size=(3, 3), strides=1, padding='SAME'),
  dict(kernel_size=(3, 3), strides=2, padding='VALID'),
  dict(kernel_size=(5, 3), strides=(2, 3), kernel_dilation=(2, 1), padding=((2, 1), (0, 3))),
  dict(kernel_size=(3, 5), strides=(3, 2), kernel_dilation=(1, 3), padding='SAME'),
  dict(kernel_size=(3, 3), strides=2, padding='CIRCULAR'),
  dict(kernel_size=(3, 3), strides=1, padding='REFLECT'),
  dict(kernel_size=(1, 1), strides=2, padding=((-1, 2), (1, -2))),  # negative pads crop
  dict(kernel_size=(3,), strides=2, kernel_dilation=2, padding='CAUSAL'),  # 1-d
]


def conv_grads(conv: nn.Module, x: jax.Array):
  """(jax.grad of the kernel, captured aux, geometry dict) for loss = sum(conv(x) * r)."""
  variables = conv.init(jax.random.PRNGKey(1), x)
  convs = {}
  cap = lambda: gse.capture([('kernel',)], convs)  # noqa: E731
  perts = gse.zero_perturbations(conv, cap, variables, x)

  def loss(params, perts):
    out, mut = conv.apply({'params': params, 'perturbations': perts}, x, mutable=['intermediates'])
    r = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    return jnp.sum(out * r), mut['intermediates']

  with cap():
    (_, inter), (g, g_out) = jax.value_and_grad(loss, (0, 1), has_aux=True)(
      variables['params'], perts
    )
  return np.asarray(g['kernel']), {'intermediates': inter, 'perturbations': g_out}, convs


# By default SAME, VALID, circular, reflect and causal; explicit, dilated and negative pads: -m slow.
@pytest.mark.parametrize(
  'geometry',
  [
    g if i in (0, 1, 4, 5, 7) else pytest.param(g, marks=pytest.mark.slow)
    for i, g in enumerate(GEOMETRIES)
  ],
  ids=lambda g: f'{g["padding"]}-{g["strides"]}',
)
def test_conv_sampled_grads_equal_jax_grad(geometry, monkeypatch):
  shape = (3, 11, 13, 5) if len(geometry['kernel_size']) == 2 else (3, 17, 5)
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  g, aux, convs = conv_grads(nn.Conv(7, **geometry), x)
  idx = jnp.asarray(np.random.default_rng(0).permutation(g.size)[: g.size // 2 + 1])  # (C,)
  monkeypatch.setattr(gse, '_CHUNK', 3 * 2 * 13)  # a few samples per chunk, the last one padded
  got = jax.jit(lambda a, i: gse.sampled_layer_grads(a, ('kernel',), g.shape, i, convs))(aux, idx)
  want = g.reshape(-1)[np.asarray(idx)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(g).max())


def test_conv_sampled_grads_equal_numpy_loops():
  """dL/dW[a, b, c, o] = sum_{n,p,q} x_pad[n, p s_h + a d_h, q s_w + b d_w, c] gy[n, p, q, o]."""
  conv = nn.Conv(7, (5, 3), strides=(2, 3), kernel_dilation=(2, 1), padding=((2, 1), (0, 3)))
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 11, 13, 5))
  _, aux, convs = conv_grads(conv, x)
  gy = np.asarray(aux['perturbations']['gse_outputs'], np.float64)  # (3, OH, OW, 7)
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (2, 1), (0, 3), (0, 0)))
  ref = np.zeros((5, 3, 5, 7))
  for a in range(5):
    for b in range(3):
      for p in range(gy.shape[1]):
        for q in range(gy.shape[2]):
          ref[a, b] += xp[:, 2 * p + 2 * a, 3 * q + b, :].T @ gy[:, p, q, :]
  idx = jnp.arange(ref.size)
  got = gse.sampled_layer_grads(aux, ('kernel',), ref.shape, idx, convs)
  np.testing.assert_allclose(got, ref.reshape(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  ('layer', 'match'),
  [
    (nn.Conv(10, (3, 3), feature_group_count=5), 'feature_group_count=5'),
    (nn.Conv(7, (3, 3), input_dilation=2, padding=1), 'input_dilation=2'),
    (nn.ConvTranspose(7, (3, 3)), 'ConvTranspose'),
  ],
)
def test_unsupported_convs_are_clear_errors(layer, match):
  x = jnp.ones((2, 7, 7, 5))
  with pytest.raises(ValueError, match=match):
    conv_grads(layer, x)


def test_er_distribution_by_hand():
  """Density ~ (fan_in + fan_out) / (fan_in fan_out) over the matrix view, solved for 0.9."""
  shapes = [(3, 3, 5, 7), (11, 13)]  # views (45, 7) and (11, 13)
  raw = np.array([52 / 315, 24 / 143])
  eps = 0.1 * (315 + 143) / (52 + 24)  # sum(eps raw_l n_l) = 0.1 sum(n_l)
  got = gse.erdos_renyi(shapes, 0.9, 1.0)
  np.testing.assert_allclose(got, 1 - eps * raw, rtol=1e-12)
  assert gse.erdos_renyi(shapes, 0.9, 1.0) != plan.erk(shapes, 0.9, 1.0)


# ----- the rule on a conv net


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(7, (3, 3), strides=2, padding='SAME', name='c0')(x))  # (B, 7, 6, 7)
    x = nn.relu(nn.Conv(11, (3, 3), kernel_dilation=2, padding=((2, 1), (1, 2)), name='c1')(x))
    return nn.Dense(3, name='head')(x.mean((1, 2)))


class ConvHarness:
  """The GSE rule on ConvNet, driven as the trainer drives it (one grads + update)."""

  def __init__(self, **sparsity_keys):
    self.model = ConvNet()
    self.x = jax.random.normal(jax.random.PRNGKey(7), (5, 13, 11, 3))
    self.y = jax.random.normal(jax.random.PRNGKey(8), (5, 3))
    params = self.model.init(jax.random.PRNGKey(0), self.x)['params']
    c = config_lib.base_config()
    c.total_steps = 40
    c.sparsity.update(
      rule='gse', level=0.8, update_every_steps=2, drop_schedule='constant', **sparsity_keys
    )
    self.rule = sparsity.make_rule(c, params, [('c0', 'kernel'), ('c1', 'kernel')])
    self.sstate, self.params = jax.jit(self.rule.init)(params, jax.random.PRNGKey(1))
    self.opt_state = optax.sgd(0.1).init(self.params)
    self.perts = self.rule.zero_perturbations(self.model, {'params': params}, self.x)

  def grads(self):
    def loss_fn(fwd, perts):
      out, mut = self.model.apply(
        {'params': fwd, 'perturbations': perts}, self.x, mutable=['intermediates']
      )
      return jnp.mean((out - self.y) ** 2), mut['intermediates']

    fwd = self.rule.forward_params(self.sstate, self.params)
    with self.rule.execute(self.sstate):
      (_, inter), (g, g_out) = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(fwd, self.perts)
    return g, {'intermediates': inter, 'perturbations': g_out}

  def update(self, g, aux, step=2):
    return jax.jit(self.rule.update_masks)(
      self.sstate, self.params, g, self.opt_state, step, None, aux
    )


@functools.cache
def harness() -> ConvHarness:
  """One harness for the tests below (init compiled once). gamma * active >= inactive: every
  inactive position is a candidate."""
  return ConvHarness(gse_gamma=4.0)


@pytest.mark.slow  # compiles GSE's conv update (166 s at load 18); MLP GSE updates run by default
def test_gse_conv_grows_numpy_top_gradients():
  """All inactive positions are candidates, so GSE grows exactly the top alpha * active
  |dL/dW| of jax.grad among them and prunes the smallest |w| of the old active ones."""
  h = harness()
  g, aux = h.grads()
  new, params, _ = h.update(g, aux)
  for name in ('c0', 'c1'):
    old = np.asarray(h.sstate.masks[name]['kernel']).reshape(-1)
    w = np.abs(np.asarray(h.params[name]['kernel'])).reshape(-1)
    grad = np.abs(np.asarray(g[name]['kernel'])).reshape(-1)
    active = int(old.sum())
    k = int(np.round(np.float32(0.2) * active))
    grow = np.zeros_like(old)
    grow[np.argsort(-np.where(old, -np.inf, grad), kind='stable')[:k]] = True
    keep = np.zeros_like(old)
    keep[np.argsort(-np.where(old, w, -np.inf), kind='stable')[: active - k]] = True
    m = np.asarray(new.masks[name]['kernel']).reshape(-1)
    np.testing.assert_array_equal(m, keep | grow)
    assert m.sum() == active == round(0.2 * old.size)
    assert np.all(np.asarray(params[name]['kernel']).reshape(-1)[grow] == 0)


def _walk(jaxpr, prims: set[str], sizes: list[int]) -> None:
  """Primitive names and float output sizes of every equation, sub-jaxprs (cond, map) included."""
  for eqn in jaxpr.eqns:
    prims.add(eqn.primitive.name)
    floats = [v.aval for v in eqn.outvars if jnp.issubdtype(v.aval.dtype, jnp.floating)]
    sizes += [int(np.prod(a.shape)) for a in floats]
    for p in eqn.params.values():
      for sub in p if isinstance(p, (tuple, list)) else (p,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          _walk(sub.jaxpr, prims, sizes)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          _walk(sub, prims, sizes)


def test_gse_conv_update_forms_no_dense_gradient(monkeypatch):
  """No conv or matmul (a dense weight gradient) and no patches matrix in the GSE update."""
  monkeypatch.setattr(gse, '_CHUNK', 4 * 150)  # c1: N = 5 * 6 * 5 = 150 rows per sample
  h = harness()
  g, aux = h.grads()
  closed = jax.make_jaxpr(
    lambda a: h.rule.update_masks(h.sstate, h.params, g, h.opt_state, 2, None, a)
  )(aux)
  prims, sizes = set(), []
  _walk(closed.jaxpr, prims, sizes)
  assert 'cond' in prims and 'gather' in prims
  assert not prims & {'conv_general_dilated', 'dot_general'}
  # Patches (N x kh kw C_in): c0 210 x 27 = 5670, c1 150 x 63 = 9450; the largest array is the
  # stride phases of c0's padded input (2 x 2 x 3 x 5 x 8 x 7 = 3360).
  assert max(sizes) < 210 * 27


def test_conv_geometry_is_required():
  h = harness()
  g, aux = h.grads()
  convs = dict(h.rule.convs)
  h.rule.convs.clear()  # as if the update were traced before any capture
  try:
    with pytest.raises(ValueError, match='nn.Conv layers traced inside rule.capture'):
      h.update(g, aux)
  finally:
    h.rule.convs.update(convs)


# ----- the paper's models and configs


def build(name: str, classes: int, **keys):
  c = config_lib.base_config()
  c.model = models.model_config(name, **keys)
  meta = {'num_classes': classes, 'image_shape': (32, 32, 3)}
  model = models.build_model(c, meta)
  variables = models.abstract_variables(model, c, meta)
  return models.count_params(model, c, meta), models.sparse_kernel_paths(variables)


def test_resnet56_parameter_count():
  conv = lambda c_in, c_out: 9 * c_in * c_out  # noqa: E731  3x3, no bias
  bn = lambda c: 2 * c  # noqa: E731  scale and bias
  stem = conv(3, 16) + bn(16)
  stage1 = 9 * (2 * conv(16, 16) + 2 * bn(16))
  stage2 = conv(16, 32) + conv(32, 32) + 2 * bn(32) + 8 * (2 * conv(32, 32) + 2 * bn(32))
  stage3 = conv(32, 64) + conv(64, 64) + 2 * bn(64) + 8 * (2 * conv(64, 64) + 2 * bn(64))
  head = 64 * 100 + 100
  assert stem + stage1 + stage2 + stage3 + head == 858_868  # "0.86M" (option A: no 1x1 convs)
  count, sparse = build('resnet_cifar', 100)
  assert count == 858_868
  assert len(sparse) == 54  # the 2 x 27 block convs; stem and classifier dense by default
  assert len(build('resnet_cifar', 100, sparse_ends=True)[1]) == 56
  assert build('resnet_cifar', 10, depth=20)[0] == 269_722


def test_vgg16_parameter_count():
  """The GSE code's vgg16_bn_small (widths 16..128, 512-wide classifier), minus conv biases."""
  convs = (
    3 * 16 + 16 * 16 + 16 * 32 + 32 * 32 + 32 * 64 + 2 * 64 * 64 + 64 * 128 + 5 * 128 * 128
  ) * 9  # 919,728
  norms = 2 * (2 * 16 + 2 * 32 + 3 * 64 + 6 * 128)  # 2,112
  head = (128 * 512 + 512) + (512 * 512 + 512) + (512 * 100 + 100)  # 380,004
  assert convs + norms + head == 1_301_844
  count, sparse = build('vgg', 100)
  assert count == 1_301_844  # the PyTorch model's 1,302,900 less its 1,056 conv biases
  assert len(sparse) == 14  # 12 convs after the first, fc1, fc2
  assert build('vgg', 100, width=64)[0] > 14_000_000  # Simonyan & Zisserman's widths


def test_gse_configs_hold_the_paper_settings():
  for name, model in (('gse_resnet56_cifar100', 'resnet_cifar'), ('gse_vgg16_cifar100', 'vgg')):
    c = config_lib.load_config(os.path.join(REPO, 'configs', f'{name}.py'))
    s = c.sparsity
    assert (c.model.name, c.model.kernel_init, c.model.sparse_ends) == (
      model,
      'lecun_uniform',
      True,
    )
    assert (s.rule, s.level, s.distribution, s.init_rescale) == ('gse', 0.98, 'er', True)
    assert (s.update_every_steps, s.end_fraction, s.gse_gamma, s.gse_alpha) == (1000, 0.6, 1, 0.2)
    assert c.total_steps == 200 * 391 and c.batch_size == 128
    local = config_lib.load_config(
      os.path.join(REPO, 'configs', f'{name}.py'), 'local,sparsity=0.9,rule=rigl,seed=3'
    )
    assert (local.data.name, local.sparsity.rule, local.sparsity.level, local.seed) == (
      'cifar10_jpg',
      'rigl',
      0.9,
      3,
    )
    wide = config_lib.load_config(os.path.join(REPO, 'configs', f'{name}.py'), 'sift=wide')
    assert wide.sparsity.distribution == 'uniform'


@pytest.mark.slow  # the GSE trainer path runs by default on the MLP (test_train.py)
def test_gse_trainer_run_on_a_conv_net(tmp_path):
  """A few steps of GSE on a ResNet-8 through the trainer: exact per-layer counts, masks move."""
  c = config_lib.load_config(os.path.join(REPO, 'configs', 'gse_resnet56_cifar100.py'), 'local')
  c.update(total_steps=6, log_every_steps=1, eval_every_steps=6, checkpoint_every_steps=6)
  c.update(batch_size=16, progress=False)
  c.model.update(depth=8, width=4)
  c.data.name = 'digits'
  c.eval.max_examples = 64
  c.optim.update(schedule='constant', warmup_steps=0)
  c.sparsity.update(level=0.9, update_every_steps=2, end_fraction=1.0)
  summary = train.train_and_evaluate(c, str(tmp_path))
  meta = {'num_classes': 10, 'image_shape': (8, 8, 1)}
  variables = models.abstract_variables(models.build_model(c, meta), c, meta)
  layers = plan.make_plan(variables['params'], 0.9, 'er', models.sparse_kernel_paths(variables))
  want = {layer.name: layer.active / layer.size for layer in layers}
  assert len(want) == 8  # stem, 6 block convs, classifier
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  for r in rows:
    for name, density in want.items():
      assert r[f'sparsity/density/{name}'] == pytest.approx(density, abs=1e-7)
  assert max(r['sparsity/churn'] for r in rows) > 0
  assert np.isfinite(summary['eval/loss'])
