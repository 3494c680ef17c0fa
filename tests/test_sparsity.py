"""The sparse training engine: exact selection, plans, every rule's invariants, errors, export."""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys
import textwrap

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sift_jax import config_lib, sparsity
from sift_jax.registry import RULES
from sift_jax.sparsity import gse, plan, schedules, select

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
DYNAMIC = ('set', 'rigl', 'topkast', 'gse', 'gmp')


def make_config(rule: str, level: float = 0.8, **kw) -> config_lib.ml_collections.ConfigDict:
  c = config_lib.base_config()
  c.total_steps = 40
  c.sparsity.rule = rule
  c.sparsity.level = 0.0 if rule == 'dense' else level
  c.sparsity.update_every_steps = 2
  c.sparsity.topkast_every_steps = 2
  c.sparsity.drop_schedule = 'constant'
  c.sparsity.backward_level = level / 2 if rule == 'topkast' else 0.0
  for k, v in kw.items():
    setattr(c.sparsity, k, v)
  return c


class MLP(nn.Module):
  widths: tuple[int, ...]

  @nn.compact
  def __call__(self, x):
    for i, w in enumerate(self.widths[:-1]):
      x = nn.relu(nn.Dense(w, name=f'fc{i}')(x))
    return nn.Dense(self.widths[-1], name='head')(x)


def sparse_paths(widths):
  return [(f'fc{i}', 'kernel') for i in range(len(widths) - 1)]


class Harness:
  """A tiny train loop that drives a rule exactly as the trainer does (docs/design.md)."""

  def __init__(self, rule_name, widths=(13, 7), d_in=5, level=0.8, tx=None, seed=0, **kw):
    self.model = MLP(widths)
    self.x = jax.random.normal(jax.random.PRNGKey(seed + 7), (6, d_in))
    self.y = jax.random.normal(jax.random.PRNGKey(seed + 8), (6, widths[-1]))
    params = self.model.init(jax.random.PRNGKey(seed), self.x)['params']
    self.rule = sparsity.make_rule(
      make_config(rule_name, level, **kw), params, sparse_paths(widths)
    )
    self.sstate, self.params = jax.jit(self.rule.init)(params, jax.random.PRNGKey(seed + 1))
    self.tx = tx or optax.adamw(0.05, weight_decay=0.1)
    self.opt_state = self.tx.init(self.params)
    self.start = (self.sstate, self.params, self.opt_state)
    self.perts = (
      self.rule.zero_perturbations(self.model, {'params': params}, self.x)
      if self.rule.needs_aux
      else None
    )
    self.step_fn = jax.jit(self._step)
    self.update = jax.jit(self.rule.update_masks)

  def grads(self, sstate, params):
    fwd = self.rule.forward_params(sstate, params)

    def loss_fn(fwd, perts):
      v = {'params': fwd} if perts is None else {'params': fwd, 'perturbations': perts}
      out, mut = self.model.apply(v, self.x, mutable=['intermediates'])
      return jnp.mean((out - self.y) ** 2), mut.get('intermediates', {})

    with self.rule.execute(sstate):
      (_, inter), (g, gp) = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(fwd, self.perts)
    aux = {'intermediates': inter, 'perturbations': gp} if self.rule.needs_aux else None
    return g, aux

  def _step(self, sstate, params, opt_state, step):
    g, aux = self.grads(sstate, params)
    return sparsity.sparse_apply(self.rule, self.tx, sstate, params, opt_state, g, step, aux=aux)

  def reset(self):
    self.sstate, self.params, self.opt_state = self.start
    return self

  def run(self, steps, start=0):
    for i in range(start, start + steps):
      yield i, self.sstate, self.params, self.opt_state
      self.sstate, self.params, self.opt_state = self.step_fn(
        self.sstate, self.params, self.opt_state, i
      )

  def layer(self, tree, name):
    return np.asarray(tree[name]['kernel'])


@functools.cache
def _rigl() -> Harness:
  return Harness('rigl', widths=(23, 5), d_in=17, level=0.9)


def rigl() -> Harness:
  """One RigL harness shared by several tests (compiled once), reset to its initial state."""
  return _rigl().reset()


# ----- exact selection


TOPK = jax.jit(select.topk_mask)


@settings(max_examples=40, deadline=None)
@given(
  st.integers(1, 400), st.data(), st.booleans(), st.sampled_from([(400,), (16, 25), (4, 10, 10)])
)
def test_topk_equals_stable_argsort(n, data, ties, shape):
  k = data.draw(st.integers(0, n))
  rng = np.random.default_rng(n)
  s = rng.normal(size=400).astype(np.float32)
  if ties:
    s = np.round(s)  # many equal scores, including -0.0 and +0.0
  valid = np.arange(400) < n  # one compiled shape each; the first n entries are the input
  got = TOPK(jnp.asarray(s).reshape(shape), k, jnp.asarray(valid).reshape(shape))
  got = np.asarray(got).reshape(-1)[:n]
  ref = np.zeros(n, bool)
  ref[np.argsort(-s[:n], kind='stable')[:k]] = True
  np.testing.assert_array_equal(got, ref)


def test_topk_respects_valid_and_large_values():
  s = jnp.asarray([3e38, -3e38, np.inf, -np.inf, 0.0, 1.0, 2.0], jnp.float32)
  valid = jnp.asarray([True, True, False, True, True, True, False])
  got = np.asarray(select.topk_mask(s, 3, valid))
  np.testing.assert_array_equal(got, [True, False, False, False, True, True, False])
  # More than the valid count asked: exactly the valid entries.
  assert int(select.topk_mask(s, 7, valid).sum()) == 5


# ----- plans and distributions


@FAST
@given(
  st.lists(st.tuples(st.integers(2, 40), st.integers(2, 40)), min_size=1, max_size=5),
  st.floats(0.0, 0.99),
)
def test_erk_meets_global_target(shapes, s):
  levels = plan.erk(shapes, s, 1.0)
  sizes = np.array([np.prod(x) for x in shapes])
  dens = 1 - np.array(levels)
  assert np.all(dens <= 1 + 1e-9) and np.all(dens >= 0)
  np.testing.assert_allclose((dens * sizes).sum(), (1 - s) * sizes.sum(), rtol=1e-9)


def test_erk_makes_small_layers_dense_and_resolves():
  levels = plan.erk([(3, 3), (500, 500)], 0.5, 1.0)
  assert levels[0] == 0.0  # would exceed density 1
  np.testing.assert_allclose(9 + (1 - levels[1]) * 250000, 0.5 * 250009)


@settings(max_examples=4, deadline=None)
@given(st.integers(3, 31), st.integers(3, 31), st.sampled_from([0.5, 0.75, 0.9, 0.97]))
def test_initial_masks_exact_counts(a, b, s):
  params = {
    'l0': {'kernel': jnp.ones((a, b))},
    'l1': {'kernel': jnp.ones((b, a)), 'bias': jnp.ones(a)},
  }
  rule = sparsity.make_rule(
    make_config('static', s), params, [('l0', 'kernel'), ('params', 'l1', 'kernel')]
  )
  sstate, p = jax.jit(rule.init)(params, jax.random.PRNGKey(a * b))
  for name, (x, y) in (('l0', (a, b)), ('l1', (b, a))):
    m = np.asarray(sstate.masks[name]['kernel'])
    assert m.shape == (x, y) and m.sum() == round((1 - s) * x * y)
    np.testing.assert_array_equal(np.asarray(p[name]['kernel']), m.astype(np.float32))
  assert sstate.masks['l1']['bias'] is None


def test_default_filter_skips_first_last_embeddings_norms():
  shapes = {
    'embed': {'embedding': jnp.zeros((9, 4))},
    'conv_0': {'kernel': jnp.zeros((3, 3, 3, 8))},
    'conv_2': {'kernel': jnp.zeros((3, 3, 8, 8))},
    'conv_10': {'kernel': jnp.zeros((3, 3, 8, 8))},
    'norm': {'scale': jnp.zeros(8)},
    'head': {'kernel': jnp.zeros((8, 10))},
  }
  layers = plan.make_plan(shapes, 0.5)
  assert [layer.name for layer in layers] == ['conv_10/kernel', 'conv_2/kernel']


class Named(nn.Module):
  """Layers whose sorted names differ from the order they run in."""

  names: tuple[str, ...]
  conv: bool = False

  @nn.compact
  def __call__(self, x):
    for name in self.names[:-1]:
      x = nn.relu(nn.Conv(4, (3, 3), name=name)(x) if self.conv else nn.Dense(6, name=name)(x))
    return nn.Dense(3, name=self.names[-1])(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize(
  ('names', 'conv', 'sparse'),
  [
    (('hidden_0', 'hidden_1', 'hidden_2', 'classifier'), False, ['hidden_1', 'hidden_2']),
    (('conv_in', 'block1', 'block2', 'head'), True, ['block1', 'block2']),
  ],
)
def test_default_filter_uses_network_order(names, conv, sparse):
  x = jnp.zeros((1, 5, 5, 2) if conv else (1, 4))
  params = Named(names, conv).init(jax.random.PRNGKey(0), x)['params']
  rule = sparsity.make_rule(make_config('static', 0.5), params)
  assert sorted(layer.name.split('/')[0] for layer in rule.layers) == sparse
  nested = {'params': params}  # a leading 'params' level and nesting keep the order
  assert plan.network_order(nested)[0][:2] == ('params', names[0])


def test_every_sparse_layer_keeps_one_active_weight(caplog):
  params = {'a': {'kernel': jnp.ones((9, 5))}, 'b': {'kernel': jnp.ones((40, 50))}}
  layers = plan.make_plan(params, 0.99, 'uniform', [('a', 'kernel'), ('b', 'kernel')])
  assert [(x.active, x.floored) for x in layers] == [(1, True), (20, False)]  # round(0.45) = 0
  assert 'raised to one active block' in plan.describe(layers) and 'a/kernel' in plan.describe(
    layers
  )
  assert 'raised' not in plan.describe(layers[1:])
  c = make_config('gmp', 0.99)
  with caplog.at_level('INFO'):
    rule = sparsity.make_rule(c, params, [('a', 'kernel'), ('b', 'kernel')])
  assert 'a/kernel (s=0.99, n=45)' in caplog.text
  sstate, p = jax.jit(rule.init)(params, jax.random.PRNGKey(0))
  update, opt = jax.jit(rule.update_masks), optax.sgd(0.1).init(p)
  for step in range(c.total_steps):
    sstate, p, opt = update(sstate, p, jax.tree.map(jnp.cos, p), opt, step)
  assert int(np.asarray(sstate.masks['a']['kernel']).sum()) == 1


def test_overrides_set_layer_sparsity():
  params = {'a': {'kernel': jnp.ones((10, 10))}, 'b': {'kernel': jnp.ones((10, 10))}}
  layers = plan.make_plan(params, 0.5, 'uniform', [('a', 'kernel')], 'b/*=0.9, a/kernel=0.2')
  assert {(x.name, x.active) for x in layers} == {('a/kernel', 80), ('b/kernel', 10)}


@pytest.mark.parametrize(
  ('field', 'value', 'match'),
  [
    ('level', 1.0, 'outside'),
    ('level', -0.1, 'outside'),
    ('rule', 'magic', 'known: dense'),
    ('distribution', 'zipf', 'known: er, erk, uniform'),
    ('backward_level', 0.95, 'above'),
    ('drop_fraction', 1.5, 'drop_fraction'),
    ('drop_schedule', 'linear', 'allowed'),
    ('overrides', 'nothing*=0.5', 'names no parameter'),
    ('block_shape', (3, 1), 'does not tile'),
  ],
)
def test_bad_config_raises(field, value, match):
  params = {'a': {'kernel': jnp.ones((8, 8))}, 'b': {'kernel': jnp.ones((8, 8))}}
  c = make_config('topkast' if field == 'backward_level' else 'rigl', 0.9)
  setattr(c.sparsity, field, value)
  with pytest.raises(ValueError, match=match):
    sparsity.make_rule(c, params, [('a', 'kernel')])


# ----- every rule's invariants over a few steps


@pytest.mark.parametrize(
  ('rule_name', 'widths', 's', 'opt'),
  [
    ('set', (13, 7), 0.9, 'sgd'),
    ('rigl', (17, 5), 0.8, 'adamw'),
    ('topkast', (11, 3), 0.5, 'adamw'),
    ('gse', (19, 7), 0.9, 'sgd'),
    ('gmp', (13, 5), 0.8, 'adamw'),
    ('static', (7, 3), 0.5, 'sgd'),
  ],
)
def test_rule_invariants(rule_name, widths, s, opt):
  tx = optax.sgd(0.1, momentum=0.9) if opt == 'sgd' else optax.adamw(0.05, weight_decay=0.1)
  h = Harness(rule_name, widths=widths, level=s, tx=tx, seed=widths[0])
  prev = None
  for step, sstate, params, opt_state in h.run(9):
    masks = sstate.masks
    fwd = h.rule.forward_params(sstate, params)
    for layer in h.rule.layers:
      name = layer.name.split('/')[0]
      m = h.layer(masks, name)
      target = layer.active
      if rule_name == 'gmp':
        done = [u for u in range(step) if h.rule.schedule.is_update(u)]
        target = layer.size
        if done:
          target = int(h.rule.target_active_blocks(done[-1])[h.rule.layers.index(layer)])
      assert m.sum() == target, (rule_name, step, layer.name)
      assert np.all(h.layer(fwd, name)[~m] == 0)  # masked weights exactly zero in the forward pass
      if rule_name != 'topkast':
        assert np.all(h.layer(params, name)[~m] == 0)
      if prev is not None and rule_name not in ('topkast', 'gmp'):
        grown = m & ~h.layer(prev, name)
        assert np.all(h.layer(params, name)[grown] == 0)  # regrown weights start at 0
        for leaf in moments(opt_state, name):
          assert np.all(leaf[grown] == 0)
    prev = masks
  if rule_name in DYNAMIC:  # RigL may legitimately regrow exactly what it dropped
    assert float(h.rule.metrics(h.sstate)['sparsity/itop']) > float(met_density(h))


def met_density(h):
  return h.rule.metrics(h.sstate)['sparsity/density']


def moments(opt_state, name):
  """Every optimizer-state leaf of params[name]['kernel'] (trace for sgd, mu and nu for adam)."""
  flat = jax.tree_util.tree_flatten_with_path(opt_state)[0]
  out = [np.asarray(x) for kp, x in flat if plan.path_of(kp)[-2:] == (name, 'kernel')]
  assert out
  return out


@pytest.mark.parametrize('kind', ['constant', 'cosine', 'exponential'])
def test_drop_schedules_are_spec_formulas(kind):
  steps = np.arange(0, 130, 7)
  t = np.minimum(steps / 90, 1.0)  # held at its T_end value afterwards
  ref = {
    'constant': np.full(t.shape, 0.3),
    'cosine': 0.3 * 0.5 * (1 + np.cos(np.pi * t)),
    'exponential': 0.3 * 0.1**t,
  }[kind]
  got = schedules.DropSchedule(kind, 0.3, 90, 0.1)(jnp.asarray(steps))
  chex.assert_shape(got, steps.shape)
  chex.assert_trees_all_close(got, ref.astype(np.float32), rtol=1e-6, atol=1e-7)


def test_update_schedule_and_nonfinite_skip():
  h = rigl()
  g, _ = h.grads(h.sstate, h.params)
  for step, expect in ((0, False), (2, True), (3, False), (40, False)):
    new, _, _ = h.update(h.sstate, h.params, g, h.opt_state, step)
    changed = not np.array_equal(h.layer(new.masks, 'fc0'), h.layer(h.sstate.masks, 'fc0'))
    assert changed == expect, step
  bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), g)
  new, _, _ = h.update(h.sstate, h.params, bad, h.opt_state, 2)
  np.testing.assert_array_equal(h.layer(new.masks, 'fc0'), h.layer(h.sstate.masks, 'fc0'))


# ----- rule-specific references


def test_rigl_grows_what_numpy_picks():
  h = rigl()  # the defaults: drop fraction 0.3, dropped weights may regrow
  params = h.params
  g, _ = h.grads(h.sstate, params)
  old = h.layer(h.sstate.masks, 'fc0')
  w = h.layer(params, 'fc0').reshape(-1)
  grad = np.abs(np.asarray(g['fc0']['kernel'])).reshape(-1)
  n_act = int(old.sum())
  n_drop = int(np.round(np.float32(0.3) * n_act))
  score = np.where(old.reshape(-1), np.abs(w), -np.inf)
  keep = np.zeros(w.size, bool)
  keep[np.argsort(-score, kind='stable')[: n_act - n_drop]] = True
  grow_score = np.where(~keep, grad, -np.inf)
  grow = np.zeros(w.size, bool)
  grow[np.argsort(-grow_score, kind='stable')[:n_drop]] = True
  new, _, _ = h.update(h.sstate, params, g, h.opt_state, 2)
  np.testing.assert_array_equal(h.layer(new.masks, 'fc0').reshape(-1), keep | grow)


def test_rigl_without_regrow_never_regrows_dropped():
  h = Harness('rigl', widths=(23, 5), d_in=17, level=0.5, regrow_dropped=False, drop_fraction=0.5)
  g, _ = h.grads(h.sstate, h.params)
  old = h.layer(h.sstate.masks, 'fc0')
  new, _, _ = h.update(h.sstate, h.params, g, h.opt_state, 2)
  m = h.layer(new.masks, 'fc0')
  dropped = old & ~m
  assert dropped.sum() > 0 and not np.any(m & dropped)
  assert m.sum() == old.sum()


def test_topkast_sets_and_untouched_weights():
  h = Harness('topkast', widths=(19, 5), d_in=11, level=0.8)
  for step, *_ in h.run(5):
    if step and not h.rule.schedule.is_update(step - 1):
      continue  # A and B are the top magnitudes as of their last recompute
    a = h.layer(h.sstate.masks, 'fc0')
    b = h.layer(h.sstate.backward, 'fc0')
    assert np.all(b[a]) and a.sum() == round(0.2 * a.size) and b.sum() == round(0.6 * b.size)
    w = np.abs(h.layer(h.params, 'fc0'))
    assert w[a].min() >= w[~a].max() and w[b].min() >= w[~b].max()
  before = h.layer(h.params, 'fc0')
  outside = ~h.layer(h.sstate.backward, 'fc0')
  _, params, _ = h.step_fn(h.sstate, h.params, h.opt_state, 5)  # step 5: no recompute
  np.testing.assert_array_equal(h.layer(params, 'fc0')[outside], before[outside])
  assert not np.array_equal(h.layer(params, 'fc0')[~outside], before[~outside])
  pen = float(h.rule.loss_penalty(h.sstate, h.params))
  a, b, w = (h.layer(h.sstate.masks, 'fc0'), h.layer(h.sstate.backward, 'fc0'), before)
  ref = (w[a] ** 2).sum() + (w[b & ~a] ** 2).sum() / 0.2
  np.testing.assert_allclose(pen, 1e-4 * ref, rtol=1e-5)


def test_topkast_zeroes_optimizer_state_entering_b():
  # Coupled weight decay feeds every position's momentum, also outside B.
  tx = optax.chain(optax.add_decayed_weights(0.05), optax.sgd(0.1, momentum=0.9))
  h = Harness('topkast', widths=(19, 5), d_in=11, level=0.8, tx=tx)
  entered, prev_b = 0, None
  for step, sstate, _, opt_state in h.run(12):
    if step and h.rule.schedule.is_update(step - 1):  # sstate, opt_state: right after an update
      new_b = h.layer(sstate.backward, 'fc0') & ~h.layer(prev_b, 'fc0')
      entered += int(new_b.sum())
      for leaf in moments(opt_state, 'fc0'):
        assert np.all(leaf[new_b] == 0), step
    prev_b = sstate.backward
  assert entered > 0


def test_topkast_erk_backward_density_meets_its_target():
  params = {
    'a': {'kernel': jnp.ones((20, 30))},
    'b': {'kernel': jnp.ones((60, 80))},
    'c': {'kernel': jnp.ones((200, 150))},
  }
  c = make_config('topkast', 0.9, distribution='erk', backward_level=0.5)
  rule = sparsity.make_rule(c, params, [(k, 'kernel') for k in params])
  sizes = [layer.size for layer in rule.layers]
  assert rule.layers[0].active < sizes[0] == rule.backward_blocks[0]  # B capped at 1 there
  # The others take up the rest (the old per-layer scaling fell short: 0.468 of 0.5).
  np.testing.assert_allclose(sum(rule.backward_blocks), 0.5 * sum(sizes), atol=len(sizes))
  assert all(b >= layer.active for b, layer in zip(rule.backward_blocks, rule.layers, strict=True))
  # ... in ERK's own proportions, as ERK at the backward level would give them.
  ref = plan.erk([(20, 30), (60, 80), (200, 150)], 0.5, 1.0)
  expect = [plan.exact_count(1 - r, n) for r, n in zip(ref, sizes, strict=True)]
  assert rule.backward_blocks == expect


def test_gse_sampled_grads_and_grow_prune(monkeypatch):
  x = jax.random.normal(jax.random.PRNGKey(0), (37, 11))
  gy = jax.random.normal(jax.random.PRNGKey(1), (37, 7))
  idx = jnp.asarray([0, 5, 76, 13, 40])
  dense = np.asarray(x).T @ np.asarray(gy)
  np.testing.assert_allclose(gse.sampled_grads(x, gy, idx), dense.reshape(-1)[idx], rtol=1e-5)
  monkeypatch.setattr(gse, '_CHUNK', 2 * 37)  # chunks of 2 samples: the last one padded
  np.testing.assert_allclose(gse.sampled_grads(x, gy, idx), dense.reshape(-1)[idx], rtol=1e-5)
  assert gse.sampled_grads(x, gy, idx[:0]).shape == (0,)

  h = Harness('gse', widths=(23, 5), d_in=17, level=0.8)
  g, aux = h.grads(h.sstate, h.params)
  old = h.layer(h.sstate.masks, 'fc0')
  new, params, _ = h.update(h.sstate, h.params, g, h.opt_state, 2, None, aux)
  m = h.layer(new.masks, 'fc0')
  grown = m & ~old
  k = int(np.round(np.float32(0.2) * old.sum()))
  assert grown.sum() == k and m.sum() == old.sum()
  # Grown positions carry the largest |gradient| among themselves vs. the kept magnitude order.
  full = np.abs(np.asarray(g['fc0']['kernel']))
  assert np.all(full[grown] > 0)
  # The weights dropped are the smallest |w| among the old active ones; grown never dropped.
  w = np.abs(h.layer(h.params, 'fc0'))
  dropped = old & ~m
  assert dropped.sum() == k and w[dropped].max() <= w[old & m].min()
  # Only sampled positions are read: garbage g_fwd gives the same masks.
  junk = jax.tree.map(lambda t: t * 0 + 1.0, g)
  new2, _, _ = h.update(h.sstate, h.params, junk, h.opt_state, 2, None, aux)
  np.testing.assert_array_equal(h.layer(new2.masks, 'fc0'), m)
  # No dense weight gradient: neither a matmul nor a (batch, D_in, D_out) product.
  text = str(
    jax.make_jaxpr(lambda a: h.rule.update_masks(h.sstate, h.params, g, h.opt_state, 2, None, a))(
      aux
    )
  )
  assert 'dot_general' not in text and 'f32[6,17,23]' not in text


def test_gmp_reaches_target():
  h = Harness('gmp', widths=(16, 5), d_in=10, level=0.75, update_every_steps=3)
  for _ in h.run(31):
    pass
  assert h.layer(h.sstate.masks, 'fc0').sum() == 40
  dens = [float(x) for x in h.rule.target_active_blocks(jnp.arange(0, 31, 3))[0]]
  assert dens[0] == 160 and dens == sorted(dens, reverse=True) and dens[-1] == 40


@pytest.mark.parametrize(
  ('total', 'every', 'start', 'end_fraction'), [(100, 100, 0, 0.75), (1000, 100, 700, 0.75)]
)
def test_gmp_without_update_step_is_an_error(total, every, start, end_fraction):
  params = {'a': {'kernel': jnp.ones((8, 8))}}
  c = make_config('gmp', 0.9, update_every_steps=every, start_step=start, end_fraction=end_fraction)
  c.total_steps = total
  with pytest.raises(ValueError, match='never prunes') as err:
    sparsity.make_rule(c, params, [('a', 'kernel')])
  for key in ('sparsity.update_every_steps', 'sparsity.start_step', 'sparsity.end_fraction'):
    assert key in str(err.value)
  assert 'total_steps' in str(err.value)


@pytest.mark.parametrize('rule_name', ['rigl', 'set', 'topkast'])
def test_dynamic_rule_without_update_step_warns(rule_name):
  params = {'a': {'kernel': jnp.ones((8, 8))}}
  c = make_config(rule_name, 0.5, update_every_steps=100, topkast_every_steps=100)
  c.total_steps = 100
  with pytest.warns(UserWarning, match='never updates its masks'):
    sparsity.make_rule(c, params, [('a', 'kernel')])


def test_gmp_reaches_target_exactly_at_its_last_update():
  params = {'a': {'kernel': jnp.ones((37, 11))}, 'b': {'kernel': jnp.ones((3, 5))}}
  for total, every, start, end_fraction in itertools.product(
    (7, 100, 200, 1000), (1, 3, 100), (0, 5, 700), (0.5, 0.75, 1.0)
  ):
    c = make_config(
      'gmp', 0.9, update_every_steps=every, start_step=start, end_fraction=end_fraction
    )
    c.total_steps = total
    try:
      rule = sparsity.make_rule(c, params, [('a', 'kernel'), ('b', 'kernel')])
    except ValueError as e:
      assert 'never prunes' in str(e)
      continue
    steps = list(rule.schedule.steps())
    traced = np.flatnonzero(rule.schedule.is_update(np.arange(total))).tolist()
    assert traced == steps and steps, (total, every, start, end_fraction)
    counts = rule.counts.T  # (L, n + 1): before any update, after each
    assert counts[:, 0].tolist() == [407, 15]
    assert counts[:, -1].tolist() == [plan.exact_count(1 - 0.9, n) for n in (407, 15)]
    assert np.all(np.diff(counts, axis=1) <= 0)
    if len(steps) > 1:  # gradual: the big layer is not pruned all at once
      assert counts[0, 1] > counts[0, -1]
  # The traced lookup follows the table; the cubic is optax's polynomial schedule, in float64.
  got = np.asarray(rule.target_active_blocks(jnp.asarray([0, *steps, total])))  # (L, n + 2)
  np.testing.assert_array_equal(got[:, :-1], counts)
  np.testing.assert_array_equal(got[:, -1], counts[:, -1])
  cubic = optax.polynomial_schedule(0.0, 1.0, 3, steps[-1] - start, start)
  frac = np.asarray(cubic(jnp.asarray(steps)), np.float64)
  ref = np.maximum(np.round((1 - 0.9 * frac) * 407), counts[0, -1])
  np.testing.assert_allclose(counts[0, 1:], ref, atol=1)


# Shapes whose count round((1 - s) n) differs when computed in float32 (s = 0.9, 0.7, 0.99).
ODD_SHAPES = ((3, 5), (5, 7), (7, 15), (5, 23), (5, 10), (11, 5))


# RigL and Top-KAST under -m slow: their counts are held in test_rule_invariants and test_train.
@pytest.mark.parametrize(
  'rule_name', [*(pytest.param(r, marks=pytest.mark.slow) for r in ('rigl', 'topkast')), 'gmp']
)
def test_every_rule_holds_the_plans_exact_count(rule_name):
  params = {
    f'l{i}': {'kernel': jax.random.normal(jax.random.PRNGKey(i), shape)}
    for i, shape in enumerate(ODD_SHAPES)
  }
  c = make_config(rule_name, 0.9, overrides='l4/kernel=0.99, l5/kernel=0.7', end_fraction=0.75)
  c.total_steps = 8
  rule = sparsity.make_rule(c, params, [(f'l{i}', 'kernel') for i in range(len(ODD_SHAPES))])
  levels = {f'l{i}': 0.9 for i in range(4)} | {'l4': 0.99, 'l5': 0.7}
  expect = {
    f'{k}/kernel': plan.exact_count(1 - v, params[k]['kernel'].size) for k, v in levels.items()
  }
  assert {layer.name: layer.active for layer in rule.layers} == expect
  sstate, p = jax.jit(rule.init)(params, jax.random.PRNGKey(0))
  opt = optax.sgd(0.1).init(p)
  update = jax.jit(rule.update_masks)
  for step in range(c.total_steps):
    g = jax.tree.map(lambda x, step=step: jnp.sin(x * (step + 2.0)), p)
    sstate, p, opt = update(sstate, p, g, opt, step)
  got = {k: int(np.asarray(v['kernel']).sum()) for k, v in sstate.masks.items()}
  assert {f'{k}/kernel': v for k, v in got.items()} == expect


def test_exact_count_of_a_big_layer_from_shapes_only():
  params = {
    'a': {'kernel': jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32)},
    'b': {'kernel': jax.ShapeDtypeStruct((3, 3, 2020, 2020), jnp.float32)},
  }
  for rule_name in ('static', 'rigl', 'topkast', 'gmp'):
    c = make_config(rule_name, 0.9)
    rule = sparsity.make_rule(c, params, [('a', 'kernel'), ('b', 'kernel')])
    assert rule.layers[1].active == 3672360  # round(0.1 * 36723600), not 3672361
    if rule_name == 'gmp':
      assert rule.counts[-1].tolist() == [3686, 3672360]


def test_block_masks_keep_blocks_whole():
  h = Harness('rigl', widths=(12, 4), d_in=8, level=0.75, block_shape=(2, 2))
  for _ in h.run(5):
    m = h.layer(h.sstate.masks, 'fc0')
    blocks = m.reshape(4, 2, 6, 2).transpose(0, 2, 1, 3).reshape(24, 4)
    assert np.all(blocks.all(1) | ~blocks.any(1)) and m.sum() == 4 * 6


# ----- the one-call wrapper


# RigL through wrap_optax by default: README's example (tests/test_readme.py).
@pytest.mark.parametrize('rule_name', [pytest.param('rigl', marks=pytest.mark.slow), 'topkast'])
def test_wrap_optax_trains_at_exact_density(rule_name):
  model = MLP((32, 32, 4))
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 12))
  y = jnp.arange(64) % 4
  params = model.init(jax.random.PRNGKey(1), x)['params']
  extra = {'backward_level': 0.5, 'topkast_every_steps': 5} if rule_name == 'topkast' else {}
  tx = sparsity.wrap_optax(
    optax.sgd(0.1, momentum=0.9),
    params,
    level=0.9,
    rule=rule_name,
    total_steps=40,
    update_every_steps=5,
    **extra,
  )
  opt_state = tx.init(params)

  def loss_fn(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({'params': p}, x), y).mean()

  @jax.jit
  def step(params, opt_state):
    fwd = sparsity.masked_params(opt_state, params)
    loss, grads = jax.value_and_grad(loss_fn)(fwd)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses, masks = [], []
  for _ in range(40):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
    masks.append(np.asarray(opt_state.sparsity.masks['fc1']['kernel']))
  assert losses[-1] < 0.5 * losses[0]
  assert all(m.sum() == round(0.1 * 32 * 32) for m in masks)  # only fc1: first and last dense
  assert opt_state.sparsity.masks['fc0']['kernel'] is None
  assert any(
    not np.array_equal(a, b) for a, b in zip(masks, masks[1:], strict=False)
  )  # masks moved
  fwd = sparsity.masked_params(opt_state, params)
  assert np.all(np.asarray(fwd['fc1']['kernel'])[~masks[-1]] == 0)
  if rule_name == 'rigl':  # inactive weights are exactly zero in the params themselves
    assert np.all(np.asarray(params['fc1']['kernel'])[~masks[-1]] == 0)


def test_wrap_optax_bad_input():
  params = {'a': {'kernel': jnp.ones((8, 8))}}
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['update_every'\] of rule 'rigl'"):
    sparsity.wrap_optax(optax.sgd(0.1), params, level=0.5, total_steps=9, update_every=3)
  with pytest.raises(ValueError, match='use make_rule'):
    sparsity.wrap_optax(optax.sgd(0.1), params, level=0.5, total_steps=9, rule='gse')


def test_rule_options_are_the_config_keys_with_their_defaults():
  """Every rule's keyword options and the plan's are `sparsity` config keys with the same
  defaults, so build_rule(**kwargs) and make_rule(config) cannot drift apart."""
  s = config_lib.base_config().sparsity
  for name in ('dense', 'static', 'set', 'rigl', 'topkast', 'gse', 'gmp'):
    options = {**sparsity.PLAN_OPTIONS, **RULES.get(name).options()}
    options.pop('total_steps')
    assert {k: s[k] for k in options} == options, name


def test_build_rule_with_keywords_equals_make_rule_from_config():
  params = {f'l{i}': {'kernel': jnp.ones((12, 12))} for i in range(3)}
  paths = [('l0', 'kernel'), ('l1', 'kernel')]
  options = dict(update_every_steps=2, backward_level=0.4, topkast_every_steps=3)
  c = make_config('topkast', 0.8, **options)
  from_config = sparsity.make_rule(c, params, paths)
  keywords = sparsity.build_rule('topkast', params, paths, level=0.8, total_steps=40, **options)
  assert keywords.layers == from_config.layers
  assert keywords.backward_blocks == from_config.backward_blocks
  assert keywords.schedule == from_config.schedule and keywords.penalty == 1e-4
  direct = RULES.get('topkast').from_config(c, params, from_config.layers)
  assert direct.backward_blocks == from_config.backward_blocks
  assert direct.schedule == from_config.schedule
  chex.assert_trees_all_equal(
    keywords.init(params, jax.random.PRNGKey(0)), from_config.init(params, jax.random.PRNGKey(0))
  )
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['gse_gamma'\] of rule 'rigl'"):
    sparsity.build_rule('rigl', params, level=0.5, total_steps=9, gse_gamma=2.0)


def test_topkast_penalty_is_the_same_in_either_execution():
  """One penalty: its value and gradient on the stored blocks equal the masked ones there."""
  kw = dict(widths=(8, 4), d_in=6, level=0.5, block_shape=(2, 2), balanced=True)
  masked = Harness('topkast', **kw)
  block = Harness('topkast', execution='block_sparse', **kw)
  params = jax.tree.map(lambda p: p + 0.5, masked.params)  # nonzero everywhere
  sstate_b, params_b = block.rule.execution.from_masked(masked.sstate, params)
  np.testing.assert_allclose(
    block.rule.loss_penalty(sstate_b, params_b),
    masked.rule.loss_penalty(masked.sstate, params),
    rtol=1e-6,
  )
  zero = jax.tree.map(jnp.zeros_like, params)
  g_masked = masked.rule.param_grads(masked.sstate, params, zero)
  g_block = block.rule.param_grads(sstate_b, params_b, jax.tree.map(jnp.zeros_like, params_b))
  expanded = block.rule.execution.masked_params(sstate_b, g_block)
  np.testing.assert_allclose(expanded['fc0']['kernel'], g_masked['fc0']['kernel'], rtol=1e-6)


@pytest.mark.parametrize('execution', ['masked', 'block_sparse'])
def test_typed_state_restores_a_checkpoint_of_the_dict_state(tmp_path, execution):
  """Checkpoints written while the state was a dict restore into the typed state: orbax
  matches by name, and the fields are the dict's keys."""
  import dataclasses

  import orbax.checkpoint as ocp

  kw = dict(widths=(8, 4), d_in=6, level=0.5, block_shape=(2, 2), balanced=True)
  sstate = Harness('topkast', execution=execution, **kw).sstate
  as_dict = {f.name: getattr(sstate, f.name) for f in dataclasses.fields(sstate)}
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(str(tmp_path / 'old'), {'sparsity': as_dict})
  ckpt.wait_until_finished()
  abstract = jax.eval_shape(lambda: {'sparsity': sstate})
  restored = ckpt.restore(str(tmp_path / 'old'), abstract)['sparsity']
  assert type(restored) is type(sstate)
  chex.assert_trees_all_equal(restored, sstate)


# ----- optimizer state, other trees, resume, sharding, export


def test_opt_state_matched_by_path_not_shape():
  params = {'a': {'kernel': jnp.ones((6, 6))}, 'b': {'kernel': jnp.ones((6, 6))}}
  rule = sparsity.make_rule(make_config('set', 0.5), params, [('b', 'kernel')])
  opt = optax.sgd(0.1, momentum=0.9).init(params)
  opt = jax.tree.map(jnp.ones_like, opt)
  grown = [jnp.eye(6, dtype=bool)]
  out = rule.zero_opt_state(opt, grown)
  assert float(out[0].trace['a']['kernel'].sum()) == 36
  assert float(out[0].trace['b']['kernel'].sum()) == 30


def test_nnx_state():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(6, 16, rngs=rngs)
      self.l2 = nnx.Linear(16, 16, rngs=rngs)
      self.l3 = nnx.Linear(16, 3, rngs=rngs)

  state = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
  rule = sparsity.make_rule(make_config('rigl', 0.75), state)  # default filter: l2 only
  assert [layer.name for layer in rule.layers] == ['l2/kernel']
  sstate, params = jax.jit(rule.init)(state, jax.random.PRNGKey(0))
  g = jax.tree.map(lambda p: jnp.cos(p * 3.0), params)
  opt = optax.adam(0.1).init(params)
  new, params2, opt2 = jax.jit(rule.update_masks)(sstate, params, g, opt, 2)
  m = np.asarray(jax.tree.leaves(sparsity.masks_of(new))[0])
  assert m.shape == (16, 16) and m.sum() == 64
  assert sparsity.layer_densities(sparsity.masks_of(new)) == {('l2', 'kernel'): 0.25}


def test_resume_equals_uninterrupted(tmp_path):
  import orbax.checkpoint as ocp

  h = rigl()
  start = (h.sstate, h.params, h.opt_state)
  for _ in h.run(8):
    pass
  full = (h.sstate, h.params, h.opt_state)
  h.sstate, h.params, h.opt_state = start
  for _ in h.run(5):
    pass
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / 'c', {'s': h.sstate, 'p': h.params, 'o': h.opt_state})
  ckpt.wait_until_finished()
  back = ocp.StandardCheckpointer().restore(
    tmp_path / 'c', {'s': h.sstate, 'p': h.params, 'o': h.opt_state}
  )
  h.sstate, h.params, h.opt_state = back['s'], back['p'], back['o']
  for _ in h.run(3, start=5):
    pass
  chex.assert_trees_all_equal(full, (h.sstate, h.params, h.opt_state))


SHARDED = textwrap.dedent(
  """
  import os
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  import jax, jax.numpy as jnp, numpy as np, optax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from sift_jax import sparsity
  from tests.test_sparsity import make_config
  assert jax.device_count() == 8
  params = {'a': {'kernel': jax.random.normal(jax.random.PRNGKey(0), (64, 48))},
            'b': {'kernel': jax.random.normal(jax.random.PRNGKey(1), (48, 40))}}
  g = jax.tree.map(lambda p: jnp.sin(3 * p), params)
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ('x', 'y'))
  shard = NamedSharding(mesh, P('x', 'y'))
  for rule_name in ('rigl', 'set'):
    rule = sparsity.make_rule(make_config(rule_name, 0.9), params, [('a', 'kernel'), ('b', 'kernel')])
    sstate, p = rule.init(params, jax.random.PRNGKey(3))
    opt = optax.adam(0.1).init(p)
    ref = jax.jit(rule.update_masks)(sstate, p, g, opt, 2)
    put = lambda t: jax.tree.map(lambda x: jax.device_put(x, shard) if x.ndim == 2 else x, t)
    out = jax.jit(rule.update_masks)(put(sstate), put(p), put(g), put(opt), 2)
    assert jax.tree.leaves(out[0].masks)[0].sharding.num_devices == 8
    for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  print('SHARDED OK')
  """
)


@pytest.mark.slow  # default run: test_scale.py's masks after a RigL update, fsdp against one device
def test_sharded_update_equals_unsharded():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  res = subprocess.run(
    [sys.executable, '-c', SHARDED], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  assert 'SHARDED OK' in res.stdout, res.stderr[-3000:]


def test_export_roundtrip(tmp_path):
  h = Harness('static', widths=(9, 4), d_in=7, level=0.7)
  index = sparsity.export_sparse(h.params, sparsity.masks_of(h.sstate), str(tmp_path))
  assert set(index) == {'fc0/kernel'}
  assert index['fc0/kernel']['nnz'] == round(0.3 * 63)
  back = sparsity.load_sparse(str(tmp_path))
  np.testing.assert_array_equal(back['fc0/kernel'], h.layer(h.params, 'fc0'))


def test_metrics_and_densities():
  h = rigl()
  met = h.rule.metrics(h.sstate)
  assert float(met['sparsity/density']) == pytest.approx(39 / 391)  # round(0.1 * 17 * 23)
  assert float(met['sparsity/density/fc0/kernel']) == pytest.approx(39 / 391)
  row = {k: float(v) for k, v in met.items()}
  assert sparsity.layer_densities_from_metrics(row) == {('fc0', 'kernel'): pytest.approx(39 / 391)}
  dense = sparsity.make_rule(make_config('dense'), h.params)
  assert dense.layers == [] and float(dense.metrics({})['sparsity/density']) == 1.0
