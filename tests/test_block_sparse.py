"""Block-sparse execution: balanced selection, the block-sparse Dense layer, its conversions."""

from __future__ import annotations

import contextlib
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.sparse
from test_sparsity import Harness
from test_train import assert_trees_equal, final_params, read_jsonl, tiny_config

from sift_jax import config_lib, experiment, models, sharding, sparse_layers, sparsity, train
from sift_jax.sift import sizes
from sift_jax.sparse_layers import block_dense
from sift_jax.sparsity import gse, select
from sift_jax.sparsity.execution import BlockSparse
from sift_jax.state import TrainState


def reference_balanced(scores: np.ndarray, k, valid: np.ndarray | None = None) -> np.ndarray:
  """NumPy: per column (last axis) the k highest scores among valid rows, ties lowest row first."""
  flat = scores.reshape(-1, scores.shape[-1])
  ok = np.ones(flat.shape, bool) if valid is None else valid.reshape(flat.shape)
  ks = np.broadcast_to(np.asarray(k), (flat.shape[1],))
  out = np.zeros(flat.shape, bool)
  for c in range(flat.shape[1]):
    rows = [r for r in np.argsort(-flat[:, c], kind='stable') if ok[r, c]]
    out[rows[: ks[c]], c] = True
  return out.reshape(scores.shape)


# ----- balanced selection


@pytest.mark.parametrize('shape', [(7, 13), (13, 7), (3, 5, 11), (1, 2)])
@pytest.mark.parametrize('seed', [0, 1])
def test_balanced_topk_matches_numpy_with_ties(shape, seed):
  rng = np.random.default_rng(seed)
  scores = rng.integers(-3, 4, size=shape).astype(np.float32)  # many ties
  valid = rng.random(shape) < 0.7
  rows = int(np.prod(shape[:-1]))
  for k in (0, 1, rows // 2, rows, rows + 3):
    got = np.asarray(select.balanced_topk_mask(jnp.asarray(scores), k))
    np.testing.assert_array_equal(got, reference_balanced(scores, k))
    want = reference_balanced(scores, k, valid)
    got = np.asarray(select.balanced_topk_mask(jnp.asarray(scores), k, jnp.asarray(valid)))
    np.testing.assert_array_equal(got, want)
    per_col = got.reshape(-1, shape[-1]).sum(0)
    valid_col = valid.reshape(-1, shape[-1]).sum(0)
    np.testing.assert_array_equal(per_col, np.minimum(k, valid_col))


def test_balanced_topk_per_column_counts_and_traced_k():
  rng = np.random.default_rng(3)
  scores = rng.normal(size=(11, 5)).astype(np.float32)
  ks = np.array([0, 3, 11, 5, 1])
  got = np.asarray(jax.jit(select.balanced_topk_mask)(jnp.asarray(scores), jnp.asarray(ks)))
  np.testing.assert_array_equal(got, reference_balanced(scores, ks))
  np.testing.assert_array_equal(got.sum(0), ks)


def test_balanced_random_exact_per_column_and_inside_valid():
  rng = np.random.default_rng(4)
  valid = rng.random((17, 7)) < 0.6
  valid[:, 0] = False
  seen = np.zeros((17, 7), int)
  for i in range(40):
    m = np.asarray(select.balanced_random_mask(jax.random.key(i), (17, 7), 3, jnp.asarray(valid)))
    np.testing.assert_array_equal(m.sum(0), np.minimum(3, valid.sum(0)))
    assert not (m & ~valid).any()
    seen += m
  assert ((seen > 0) == valid).all()  # every valid position drawn at some point, no other


# ----- the rules keep balanced masks


def block_counts(mask: np.ndarray, block: tuple[int, int]) -> np.ndarray:
  """(I, O) mask -> active blocks per output block-column, checking blocks are whole."""
  bi, bo = block
  i, o = mask.shape
  grid = mask.reshape(i // bi, bi, o // bo, bo).transpose(0, 2, 1, 3)  # (R, C, bi, bo)
  assert np.all(grid.all((2, 3)) | ~grid.any((2, 3)))
  return grid.all((2, 3)).sum(0)  # (C,)


@pytest.mark.parametrize(
  'rule,block,regrow',
  [
    ('static', (1, 1), True),
    ('set', (2, 3), True),
    ('rigl', (1, 1), False),
    ('rigl', (2, 3), True),
    ('topkast', (2, 1), True),
  ],
)
def test_rules_keep_balanced_masks(rule, block, regrow):
  h = Harness(
    rule,
    widths=(21, 4),
    d_in=14,
    level=0.7,
    block_shape=block,
    balanced=True,
    regrow_dropped=regrow,
    drop_fraction=0.45,
  )
  layer = h.rule.layers[0]
  k = layer.active_blocks // layer.columns
  assert layer.balanced and k == round((1 - 0.7) * (14 // block[0]))
  changed = False
  first = h.layer(h.sstate.masks, 'fc0')
  for _ in h.run(7):
    m = h.layer(h.sstate.masks, 'fc0')
    np.testing.assert_array_equal(block_counts(m, block), k)
    changed |= bool((m != first).any())
    if rule == 'topkast':
      b = h.layer(h.sstate.backward, 'fc0')
      kb = block_counts(b, block)
      assert (kb == kb[0]).all() and kb[0] > k and not (m & ~b).any()
  assert changed == (rule != 'static')


@pytest.mark.parametrize('how', [{'balanced': True}, {'execution': 'block_sparse'}])
def test_gmp_cannot_keep_balance_and_says_so(how):
  with pytest.raises(
    ValueError, match='cannot keep balanced masks.*allowed: gse, rigl, set, static, topkast$'
  ):
    Harness('gmp', widths=(8, 4), d_in=6, level=0.5, **how)


def test_sampled_block_grads_equal_the_dense_gradient_blocks():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(11, 21)).astype(np.float32)  # (N, D_in): 7 block-rows of 3
  gy = rng.normal(size=(11, 10)).astype(np.float32)  # (N, D_out): 2 block-columns of 5
  rows = jnp.asarray([[6, 0, 3], [2, 5, 1]], jnp.int32)  # (C, S)
  got = gse.sampled_block_grads(jnp.asarray(x), jnp.asarray(gy), (3, 5), rows)
  dense = (x.T @ gy).reshape(7, 3, 2, 5)  # (R, bi, C, bo)
  for c in range(2):
    for s, r in enumerate(np.asarray(rows[c])):
      np.testing.assert_allclose(got[c, s], dense[r, :, c], rtol=1e-5, atol=1e-5)


def test_block_sparse_execution_implies_balanced_and_bad_name_raises():
  h = Harness('static', widths=(8, 4), d_in=6, level=0.5, execution='block_sparse')
  assert isinstance(h.rule.execution, BlockSparse) and h.rule.layers[0].balanced
  assert h.params['fc0']['kernel'].shape == (8, 3, 1, 1)  # 8 columns, K = 3 of 6 rows stored
  with pytest.raises(ValueError, match="execution='sparse'; allowed: block_sparse, masked"):
    Harness('static', widths=(8, 4), d_in=6, level=0.5, execution='sparse')


# ----- the block-sparse Dense layer against the masked layer


def member_shapes(d_model: int = 256, d_ff: int = 1024, level: float = 0.75) -> list:
  """Every sparse kernel shape of the benchmark GPT's transformed layers under each member, and
  the MLP's hidden layers, from sift_jax.sift.sizes (Sparse Wide widens, Parallel keeps,
  Factorized adds U (D_in, d) and V (d, D_out), Doped keeps the sparse full weight)."""
  base = [(d_model, d_model), (d_model, d_ff), (d_ff, d_model), (784, 1024), (1024, 1024)]
  wide = sizes.width_factor(level)
  shapes = set(base)
  shapes |= {(sizes.scale_width(i, wide), sizes.scale_width(o, wide)) for i, o in base}
  for i, o in base:
    d = sizes.factorized_rank(i, o, level)
    shapes |= {(i, d), (d, o)}
  return sorted(shapes)


def pick_block(shape: tuple[int, int]) -> tuple[int, int]:
  """The largest square block of 64 or below (powers of two) that tiles the kernel."""
  b = next(b for b in (64, 32, 16, 8, 4, 2, 1) if shape[0] % b == 0 and shape[1] % b == 0)
  return b, b


def balanced_kernel(shape, block, level, seed):
  """A dense kernel (NumPy), a balanced block mask at `level`, the masked kernel and K."""
  rng = np.random.default_rng(seed)
  r, c = shape[0] // block[0], shape[1] // block[1]
  k = max(1, round((1 - level) * r))
  kernel = rng.normal(size=shape).astype(np.float32) / np.sqrt(shape[0])
  grid = np.argsort(rng.random((r, c)), axis=0) < k  # (R, C): k random block-rows per column
  mask = np.repeat(np.repeat(grid, block[0], axis=0), block[1], axis=1)
  return jnp.asarray(kernel * mask), jnp.asarray(mask), k


# In the default run: dense / parallel / doped, factorized U with block 4, the MLP's 784 inputs
# with block 16 (wide's and factorized V's shapes take the same paths, 3x longer); all with -m slow.
FAST_SHAPES = [(256, 1024), (256, 820), (784, 1024)]


@pytest.mark.parametrize(
  'shape',
  [s if s in FAST_SHAPES else pytest.param(s, marks=pytest.mark.slow) for s in member_shapes()],
)
def test_forward_and_backward_equal_masked_on_member_shapes(shape):
  block = pick_block(shape)
  kernel, mask, k = balanced_kernel(shape, block, 0.75, seed=shape[0] + shape[1])
  values, rows = sparse_layers.from_masked(kernel, mask, block, k)
  x = jax.random.normal(jax.random.key(5), (3, 5, shape[0]))  # (B, T, D_in)
  cot = jax.random.normal(jax.random.key(6), (3, 5, shape[1]))

  def masked(x, w, mask, cot):
    return jnp.sum((x @ (w * mask)) * cot)

  def blocked(x, v, rows, cot):
    return jnp.sum(sparse_layers.block_matmul(x, v, rows, 'xla') * cot)

  @jax.jit  # everything an argument: constants would be folded at compile time
  def both(x, kernel, mask, values, rows, cot):
    return (
      jax.value_and_grad(masked, (0, 1))(x, kernel, mask, cot),
      jax.value_and_grad(blocked, (0, 1))(x, values, rows, cot),
    )

  (y0, (dx0, dw0)), (y1, (dx1, dv1)) = both(x, kernel, mask, values, rows, cot)
  np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(dx1, dx0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    dv1, sparse_layers.gather_blocks(dw0, rows, block), rtol=1e-5, atol=1e-5
  )
  y = sparse_layers.block_matmul(x, values, rows, 'xla')
  np.testing.assert_allclose(y, x @ kernel, rtol=1e-5, atol=1e-5)


def test_conversion_both_ways_is_exact():
  shape, block = (24, 30), (4, 6)
  kernel, mask, k = balanced_kernel(shape, block, 0.5, seed=1)
  assert sparse_layers.check_balanced(mask, block) == k == 3
  values, rows = sparse_layers.from_masked(kernel, mask, block, k)
  assert values.shape == (5, 3, 4, 6) and rows.shape == (5, 3) and rows.dtype == jnp.int32
  assert (np.diff(np.asarray(rows), axis=1) > 0).all()  # ascending block-rows
  back_kernel, back_mask = sparse_layers.to_masked(values, rows, shape)
  np.testing.assert_array_equal(back_kernel, kernel)
  np.testing.assert_array_equal(back_mask, mask)
  again = sparse_layers.from_masked(back_kernel, back_mask, block, k)
  np.testing.assert_array_equal(again[0], values)
  np.testing.assert_array_equal(again[1], rows)


def test_check_balanced_and_dense_kernel_errors():
  mask = np.zeros((4, 4), bool)
  mask[:2, :2] = True
  mask[:2, 2:] = True
  mask[2:, 2:] = True  # column block 1 holds two blocks, column block 0 one
  with pytest.raises(ValueError, match='not balanced: active blocks per block-column range 1..2'):
    sparse_layers.check_balanced(mask, (2, 2))
  mask[0, 0] = False
  with pytest.raises(ValueError, match='partially active'):
    sparse_layers.check_balanced(mask, (2, 2))
  with pytest.raises(ValueError, match=r'Dense \(2-D\) kernels only; conv1/kernel has shape'):
    sparse_layers.check_dense_kernel((3, 3, 16, 16), (4, 4), 'conv1/kernel')
  with pytest.raises(ValueError, match='does not tile'):
    sparse_layers.check_dense_kernel((10, 16), (4, 4), 'fc/kernel')
  with pytest.raises(ValueError, match="impl 'cuda'; allowed: auto, xla, pallas"):
    sparse_layers.block_matmul(
      jnp.ones((2, 4)), jnp.ones((1, 1, 4, 4)), jnp.zeros((1, 1), jnp.int32), 'cuda'
    )


def test_forward_prefix_matmul_runs_a_and_trains_b_straight_through():
  """Top-KAST's layer against NumPy: y = x @ (W on A), dW = x^T dy on all of B, dx through A."""
  rng = np.random.default_rng(3)
  block, shape, n, k_a = (3, 5), (21, 10), 7, 2  # R = 7 block-rows, C = 2 block-columns
  w = rng.normal(size=shape).astype(np.float32)
  rows = jnp.asarray([[4, 0, 6], [1, 5, 2]], jnp.int32)  # (C, K_B): A = the first 2 per column
  values = sparse_layers.gather_blocks(jnp.asarray(w), rows, block)  # (C, K_B, bi, bo)
  x = rng.normal(size=(n, shape[0])).astype(np.float32)
  dy = rng.normal(size=(n, shape[1])).astype(np.float32)
  y, vjp = jax.vjp(
    lambda x, v: block_dense.forward_prefix_matmul(x, v, rows, k_a, 'xla'), jnp.asarray(x), values
  )
  dx, dv = vjp(jnp.asarray(dy))
  _, mask_a = sparse_layers.to_masked(values[:, :k_a], rows[:, :k_a], shape)
  _, mask_b = sparse_layers.to_masked(values, rows, shape)
  w_a = np.where(np.asarray(mask_a), w, 0)
  np.testing.assert_allclose(y, x @ w_a, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dy @ w_a.T, rtol=1e-5, atol=1e-5)
  dw = sparse_layers.to_masked(dv, rows, shape)[0]
  np.testing.assert_allclose(dw, np.where(np.asarray(mask_b), x.T @ dy, 0), rtol=1e-5, atol=1e-5)


def test_layer_matches_dense_layer_of_its_masked_state():
  layer = sparse_layers.BlockSparseDense(24, (4, 6), 2, impl='xla')
  x = jax.random.normal(jax.random.key(0), (7, 16))
  variables = jax.jit(layer.init)(jax.random.key(1), x)
  values = variables['params']['values']
  rows = variables[sparse_layers.BLOCK_COLLECTION]['rows']
  assert values.shape == (4, 2, 4, 6) and rows.shape == (4, 2)
  kernel, mask = sparse_layers.to_masked(values, rows, (16, 24))
  assert sparse_layers.check_balanced(mask, (4, 6)) == 2
  bias = jnp.arange(24.0)
  variables = {**variables, 'params': {'values': values, 'bias': bias}}
  want = nn.Dense(24).apply({'params': {'kernel': kernel, 'bias': bias}}, x)
  np.testing.assert_allclose(layer.apply(variables, x), want, rtol=1e-5, atol=1e-5)
  # the init distribution is the masked layer's: lecun_normal over the dense fan-in of 16
  big = sparse_layers.BlockSparseDense(512, (64, 64), 4, use_bias=False)
  v = jax.jit(big.init)(jax.random.key(2), jnp.ones((1, 1024)))['params']['values']
  assert abs(float(jnp.std(v)) * np.sqrt(1024) - 1.0) < 0.05


def test_pattern_change_inside_jit_does_not_recompile():
  shape, block = (64, 48), (16, 16)
  kernel, mask, k = balanced_kernel(shape, block, 0.5, seed=2)
  values, rows = sparse_layers.from_masked(kernel, mask, block, k)
  traces = []

  @jax.jit
  def step(values, rows, x):
    traces.append(1)
    loss = lambda v: jnp.sum(sparse_layers.block_matmul(x, v, rows, 'xla') ** 2)
    return values - 0.1 * jax.grad(loss)(values)

  x = jnp.ones((8, 64))
  for seed in range(4):
    new = select.balanced_random_mask(jax.random.key(seed), (4, 3), k)
    rows = jnp.argsort(~new, axis=0, stable=True)[:k].T.astype(jnp.int32)
    values = step(values, rows, x)
  assert len(traces) == 1 and step._cache_size() == 1


# ----- the Pallas kernel (interpret mode on the CPU)


@pytest.mark.parametrize('shape,block,n', [((32, 48), (8, 16), 20), ((32, 16), (16, 8), 130)])
def test_pallas_kernel_matches_xla_forward_and_backward(shape, block, n):
  kernel, mask, k = balanced_kernel(shape, block, 0.6, seed=3)
  values, rows = sparse_layers.from_masked(kernel, mask, block, k)
  x = jax.random.normal(jax.random.key(4), (n, shape[0]))

  @functools.partial(jax.jit, static_argnums=3)
  def value_and_grads(x, v, rows, impl):
    loss = lambda x, v: jnp.sum(jnp.sin(sparse_layers.block_matmul(x, v, rows, impl)))
    return sparse_layers.block_matmul(x, v, rows, impl), jax.grad(loss, (0, 1))(x, v)

  y_p, g_p = value_and_grads(x, values, rows, 'pallas_interpret')
  np.testing.assert_allclose(y_p, x @ kernel, rtol=1e-5, atol=1e-5)
  _, g_x = value_and_grads(x, values, rows, 'xla')
  for a, b in zip(g_p, g_x, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_pallas_is_the_default_on_gpu_and_tpu_only(monkeypatch):
  assert block_dense.default_impl() == 'xla'  # this CPU
  for backend, want in (('gpu', 'pallas'), ('tpu', 'pallas'), ('cpu', 'xla')):
    monkeypatch.setattr(jax, 'default_backend', lambda b=backend: b)
    assert block_dense.default_impl() == want


# ----- whole models: block-sparse execution against masked execution of the same masks


def model_case(name: str):
  """(model, config, x, y) of a small MLP or GPT whose sparse kernels (16, 16) blocks tile."""
  c = config_lib.base_config()
  c.sparsity.rule = 'static'
  c.sparsity.level = 0.5
  c.sparsity.block_shape = (16, 16)
  c.sparsity.balanced = True
  rng = np.random.default_rng(0)
  if name == 'mlp':
    c.model = models.model_config('mlp', hidden=(64, 32))
    meta = {'num_classes': 5, 'image_shape': (8, 8, 1)}
    x = jnp.asarray(rng.normal(size=(6, 8, 8, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 5, 6))
  else:
    c.model = models.model_config(
      'gpt', num_layers=1, d_model=32, num_heads=2, d_ff=64, context_length=16, dropout=0.0
    )
    meta = {'vocab_size': 17, 'seq_len': 16}
    x = jnp.asarray(rng.integers(0, 17, (3, 16)))
    y = jnp.asarray(rng.integers(0, 17, (3, 16)))
  return models.build_model(c, meta), c, x, y


def make_steps(model, tx, x, y, rule):
  """Jitted optimizer steps: masked (params, opt_state, sstate) and block-sparse (..., rows)."""

  def loss(p, rows=None):
    with sparse_layers.block_execution(rows) if rows is not None else contextlib.nullcontext():
      logits = model.apply({'params': p}, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def finish(params, grads, opt_state, value, sstate=None):
    updates, opt_state = tx.update(grads, opt_state, params)
    if sstate is not None:
      updates = rule.restrict_updates(sstate, updates)
    return optax.apply_updates(params, updates), opt_state, value

  @jax.jit
  def masked(params, opt_state, sstate):
    value, g = jax.value_and_grad(loss)(rule.forward_params(sstate, params))
    return finish(params, rule.param_grads(sstate, params, g), opt_state, value, sstate)

  @jax.jit
  def blocked(params, opt_state, rows):
    value, grads = jax.value_and_grad(loss)(params, rows)
    return finish(params, grads, opt_state, value)

  def run(step, params, opt_state, state, n):
    losses = []
    for _ in range(n):
      params, opt_state, value = step(params, opt_state, state)
      losses.append(float(value))
    return params, opt_state, losses

  return (lambda *a: run(masked, *a)), (lambda *a: run(blocked, *a))


def assert_trees_close(a, b):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(u, v, rtol=2e-5, atol=2e-6)


# Both under -m slow: the trainer test below runs the MLP both ways and resumes across modes.
@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) for n in ('mlp', 'gpt')])
def test_model_trains_step_for_step_like_masked_and_resumes_across_modes(name):
  model, c, x, y = model_case(name)
  variables = model.init(jax.random.key(0), x, train=False)
  rule = sparsity.make_rule(c, variables['params'], models.sparse_kernel_paths(variables))
  sstate, params = rule.init(variables['params'], jax.random.key(1))
  block = (16, 16)
  # SGD with momentum: Adam would turn the exactly-zero gradient of GPT's key bias (softmax
  # ignores it) into +-lr steps of float noise, in either mode.
  tx = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1, momentum=0.9))

  masked, blocked = make_steps(model, tx, x, y, rule)
  pm, om, loss_m = masked(params, tx.init(params), sstate, 3)
  pb, rows, _ = sparse_layers.to_block_state(params, sstate.masks, block)
  ob = tx.init(pb)
  pb, ob, loss_b = blocked(pb, ob, rows, 3)
  np.testing.assert_allclose(loss_b, loss_m, rtol=1e-5)
  back, masks, (ob_dense,) = sparse_layers.to_masked_state(pb, rows, params, ob)
  assert_trees_close(back, pm)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), masks, sstate.masks))
  assert_trees_close(ob_dense, om)
  size = lambda t: sum(leaf.size for leaf in jax.tree.leaves(t))
  sparse = sum(leaf.size for leaf in jax.tree.leaves(sstate.masks))
  assert size(ob) == size(om) - sparse // 2  # the momentum holds only the stored half

  # Resume the masked run in block mode and the block run in masked mode: the same two steps.
  _, _, (ob_from_masked,) = sparse_layers.to_block_state(pm, sstate.masks, block, om)
  pb2, _, loss_b2 = blocked(pb, ob_from_masked, rows, 2)
  pm2, _, loss_m2 = masked(back, ob_dense, sstate, 2)
  np.testing.assert_allclose(loss_b2, loss_m2, rtol=1e-5)
  assert_trees_close(sparse_layers.to_masked_state(pb2, rows, params)[0], pm2)


def block_run_config(execution: str, total_steps: int = 6, family: str = 'mlp', rule: str = 'rigl'):
  """A tiny run of tests/test_train.py under a dynamic rule on balanced (16, 16) blocks."""
  c = tiny_config(family, f'local,sparsity=0.5,rule={rule}')
  c.sparsity.update(
    block_shape=(16, 16),
    balanced=True,
    execution=execution,
    update_every_steps=2,
    end_fraction=1.0,  # updates at steps 2 and 4 whether the run is 3 or 6 steps long
    drop_fraction=0.5,
    drop_schedule='constant',
  )
  if rule == 'gse':  # alpha K = 1 block grown per column of K = 2
    c.sparsity.gse_alpha = 0.5
  if rule == 'topkast':  # sets recomputed at steps 2 and 4; a large lr so that A changes
    c.sparsity.update(topkast_every_steps=2, backward_level=0.25, topkast_penalty=1e-2)
    c.optim.lr = 0.5
  c.log_every_steps = 1
  c.total_steps = total_steps
  return c


@pytest.mark.parametrize(
  'family,rule',
  [
    ('mlp', 'rigl'),
    ('mlp', 'topkast'),
    pytest.param('mlp', 'gse', marks=pytest.mark.slow),  # GSE blocks: the sampled-grads tests
    pytest.param('gpt', 'set', marks=pytest.mark.slow),
  ],
)
def test_trainer_block_sparse_matches_masked_resumes_across_modes_and_exports(
  tmp_path, family, rule
):
  run = lambda execution, n=6: block_run_config(execution, n, family, rule)
  masked = train.train_and_evaluate(run('masked'), str(tmp_path / 'masked'))
  block = train.train_and_evaluate(run('block_sparse'), str(tmp_path / 'block'))
  rows = {n: read_jsonl(tmp_path / n / 'metrics.jsonl') for n in ('masked', 'block')}
  np.testing.assert_allclose(
    [r['train/loss'] for r in rows['block']], [r['train/loss'] for r in rows['masked']], rtol=1e-5
  )
  assert [r['sparsity/churn'] for r in rows['block']] == [
    r['sparsity/churn'] for r in rows['masked']
  ]
  assert max(r['sparsity/churn'] for r in rows['block']) > 0  # the rule moved blocks
  np.testing.assert_allclose(block['eval/loss'], masked['eval/loss'], rtol=1e-5)
  for key in ('params/total', 'params/active', 'sparsity/layer_density'):
    assert block[key] == masked[key], key
  if family == 'mlp':
    stored = final_params(tmp_path / 'block')['hidden_0']['kernel']
    # (C, K, bi, bo): 2 of 4 block-rows per column (Top-KAST: B's 3, at backward_level 0.25)
    assert stored.shape == (2, 3 if rule == 'topkast' else 2, 16, 16)

  half = train.train_and_evaluate(run('block_sparse', 3), str(tmp_path / 'resumed'))
  assert half['resumed_from_step'] == 0
  resumed = train.train_and_evaluate(run('block_sparse'), str(tmp_path / 'resumed'))
  assert resumed['resumed_from_step'] == 3
  assert_trees_equal(final_params(tmp_path / 'block'), final_params(tmp_path / 'resumed'))
  assert resumed['train/loss'] == block['train/loss']

  # A checkpoint of one mode resumes in the other (the state is converted), both ways.
  for first, then in (('masked', 'block_sparse'), ('block_sparse', 'masked')):
    workdir = str(tmp_path / f'{first}_then_{then}')
    train.train_and_evaluate(run(first, 3), workdir)
    crossed = train.train_and_evaluate(run(then), workdir)
    assert crossed['resumed_from_step'] == 3
    np.testing.assert_allclose(crossed['train/loss'], masked['train/loss'], rtol=1e-5)
    np.testing.assert_allclose(crossed['eval/loss'], masked['eval/loss'], rtol=1e-5)
    assert [r['sparsity/churn'] for r in read_jsonl(f'{workdir}/metrics.jsonl')] == [
      r['sparsity/churn'] for r in rows['masked']
    ]
  # A block-sparse checkpoint exports as the masked run's does.
  exported, masks = {}, {}
  for name in ('masked', 'block'):
    out = str(tmp_path / f'{name}_csr')
    index = sparsity.export.export_checkpoint(str(tmp_path / name), out)
    exported[name] = sparsity.export.load_sparse(out)
    masks[name] = {k: explicit_entries(f'{out}/{e["file"]}') for k, e in index.items()}
  assert exported['block'].keys() == exported['masked'].keys()
  for key, w in exported['masked'].items():
    assert sparse_layers.check_balanced(masks['masked'][key], (16, 16)) * 32 == w.shape[0]  # R/2
    np.testing.assert_array_equal(masks['block'][key], masks['masked'][key])
    np.testing.assert_allclose(exported['block'][key], w, rtol=2e-5, atol=2e-6)


def test_convert_state_refuses_unbalanced_masks_naming_the_layer():
  masked = Harness('static', widths=(8, 4), d_in=6, level=0.5, block_shape=(2, 2))
  block = Harness(
    'static', widths=(8, 4), d_in=6, level=0.5, block_shape=(2, 2), execution='block_sparse'
  )
  mask = np.zeros((6, 8), bool)
  mask[:, :2] = True  # block-column 0 holds 3 blocks, the others none
  masks = masked.sstate.masks
  sstate = masked.sstate.replace(masks={**masks, 'fc0': {**masks['fc0'], 'kernel': mask}})
  state = TrainState(jnp.zeros((), jnp.int32), masked.params, {}, masked.opt_state, sstate, None)
  with pytest.raises(
    ValueError,
    match=r'fc0/kernel: mask is not balanced: active blocks per '
    r'block-column range 0\.\.3; it cannot resume block-sparse',
  ):
    sparsity.convert_state(state, masked.rule.execution, block.rule.execution)
  # The balanced masks of the block rule's own plan convert (and back, exactly).
  sstate, params = block.rule.execution.to_masked(block.sstate, block.params)
  state = TrainState(jnp.zeros((), jnp.int32), params, {}, block.tx.init(params), sstate, None)
  packed = sparsity.convert_state(state, masked.rule.execution, block.rule.execution)
  assert_trees_equal(packed.params, block.params)
  back = sparsity.convert_state(packed, block.rule.execution, masked.rule.execution)
  assert_trees_equal(back.params, params)


def explicit_entries(path: str) -> np.ndarray:
  """The bool mask of a saved CSR matrix's explicit entries (a trained weight may be 0.0)."""
  csr = scipy.sparse.load_npz(path)
  csr.data[:] = 1
  return csr.toarray() != 0


def test_trainer_refuses_block_sparse_convolutions():
  c = tiny_config('resnet', 'local,sparsity=0.5,rule=static')
  c.sparsity.execution = 'block_sparse'
  with pytest.raises(ValueError, match=r'Dense \(2-D\) kernels only; .*conv.*unsupported'):
    experiment.build_experiment(c)


def dense_weight_dots(hlo: str, shape: tuple[int, int]) -> list[str]:
  """The dot instructions of compiled HLO text that read or produce an array of `shape`,
  outside the branches of a conditional (RigL's update step runs in one)."""
  dims = {}  # instruction name -> its array dims (names are unique in an HLO module)
  for m in re.finditer(r'%([\w.\-]+) = \w+\[([\d,]*)\]', hlo):
    dims[m.group(1)] = tuple(int(d) for d in m.group(2).split(',') if d)
  found = []
  for line in hlo.splitlines():
    m = re.search(r'%([\w.\-]+) = \w+\[[\d,]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)', line)
    if m and '/cond/branch_' not in line and shape in {dims.get(n) for n in m.groups()}:
      found.append(line.strip()[:120])
  return found


@pytest.mark.parametrize('rule', ['static', 'rigl', 'topkast', 'gse'])
def test_compiled_block_sparse_step_has_no_dot_of_the_full_weight(rule):
  found = {}
  for execution in ('masked', 'block_sparse'):
    c = block_run_config(execution, rule=rule)
    exp = experiment.build_experiment(c)
    batch = sharding.global_batch(exp.mesh, exp.dataset.train_batch(0))
    hlo = exp.train_step().lower(exp.new_state(), batch).compile().as_text()
    found[execution] = dense_weight_dots(hlo, (64, 32))  # hidden_0/kernel, the sparse layer
  assert found['masked']  # the check can see them: masked execution multiplies the full kernel
  assert found['block_sparse'] == []
