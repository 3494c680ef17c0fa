"""Sparse-training overhead against the dense model, and mask-update time against layer size.

  python benchmarks/sparsity_overhead.py
  python benchmarks/sparsity_overhead.py --models=mlp --rules=static,rigl --windows=5
  python benchmarks/sparsity_overhead.py --skip_overhead --sizes=1e6,1e7,1e8

Step-time ratios: an MLP 784-1024-1024-10 at batch 256 (SGD momentum) and a GPT of 4 layers,
d 256, context 128, batch 16, byte vocabulary (AdamW), at 90% sparsity. Dense and sparse
steps are timed in interleaved windows (dense, then each rule) and the median of the
per-window ratios is printed. A rule that updates masks every dT steps is charged
((dT - 1) * plain step + 1 update step) / (dT * dense step), both measured in the window: the
update step is the same compiled function called at a step where the schedule fires.

Scaling: the time of one mask update per rule on one (1000, n / 1000) kernel as n grows, and
the exponent of a least-squares fit of log time against log n.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from sift_jax import config_lib, models, sparsity

_MODELS = flags.DEFINE_list('models', ['mlp', 'gpt'], 'Models to time: mlp, gpt.')
_RULES = flags.DEFINE_list('rules', ['static', 'rigl', 'set', 'topkast', 'gse'], 'Rules to time.')
_WINDOWS = flags.DEFINE_integer('windows', 5, 'Interleaved timing windows (median of ratios).')
_SIZES = flags.DEFINE_list('sizes', ['1e6', '3e6', '1e7', '3e7', '1e8'], 'Kernel sizes n.')
_SCALE_RULES = flags.DEFINE_list(
  'scale_rules', ['set', 'rigl', 'topkast', 'gse', 'gmp'], 'Rules for the scaling fit.'
)
_SKIP_OVERHEAD = flags.DEFINE_bool('skip_overhead', False, 'Only run the scaling benchmark.')
_SKIP_SCALING = flags.DEFINE_bool('skip_scaling', False, 'Only run the step-time ratios.')

SPARSITY = 0.9
EVERY = 100  # dT for RigL/SET/GSE, N for Top-KAST
# Steps per window: the GPT step is ~100x slower than the MLP one.
STEPS = {'mlp': 20, 'gpt': 2}


def run_config(rule: str) -> Any:
  c = config_lib.base_config()
  c.total_steps = 10**6  # every timed step lies inside the update phase
  c.sparsity.rule = rule
  c.sparsity.level = 0.0 if rule == 'dense' else SPARSITY
  c.sparsity.backward_level = 0.8 if rule == 'topkast' else 0.0
  c.sparsity.update_every_steps = EVERY
  c.sparsity.topkast_every_steps = EVERY
  return c


def model_case(name: str):
  """(model, variables, x, y, optimizer) of one benchmark model."""
  c = config_lib.base_config()
  key = jax.random.PRNGKey(0)
  if name == 'mlp':
    c.model = models.model_config('mlp', hidden=(1024, 1024))
    meta = {'num_classes': 10, 'image_shape': (28, 28, 1)}
    x = jax.random.normal(key, (256, 28, 28, 1))
    y = jax.random.randint(key, (256,), 0, 10)
    tx = optax.sgd(0.01, momentum=0.9)
  elif name == 'gpt':
    c.model = models.model_config(
      'gpt', num_layers=4, d_model=256, num_heads=4, d_ff=1024, context_length=128, dropout=0.0
    )
    meta = {'vocab_size': 256, 'seq_len': 128}
    x = jax.random.randint(key, (16, 128), 0, 256)
    y = jnp.roll(x, -1, axis=1)
    tx = optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1)
  else:
    raise ValueError(f'unknown benchmark model {name!r}; allowed: mlp, gpt')
  model = models.build_model(c, meta)
  variables = model.init(jax.random.PRNGKey(1), x, train=False)
  return model, variables, x, y, tx


def loss_of(model, params, perts, x, y):
  v = {'params': params} if perts is None else {'params': params, 'perturbations': perts}
  logits, mutated = model.apply(v, x, train=False, mutable=['intermediates'])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, mutated.get('intermediates', {})


def dense_step(model, tx):
  def step(state, x, y, i):
    params, opt_state = state
    g = jax.grad(lambda p: loss_of(model, p, None, x, y)[0])(params)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(step, donate_argnums=0)


def sparse_step(model, tx, rule, perts):
  """The train step of DESIGN.md's data flow (GSE: with the capture and output gradients)."""

  def step(state, x, y, i):
    params, opt_state, sstate = state
    fwd = rule.forward_params(sstate, params)
    with rule.capture():
      (_, inter), (g, gp) = jax.value_and_grad(
        lambda f, q: loss_of(model, f, q, x, y), (0, 1), has_aux=True
      )(fwd, perts)
    aux = {'intermediates': inter, 'perturbations': gp} if rule.needs_aux else None
    grads = rule.param_grads(sstate, params, g)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, rule.mask_updates(sstate, updates))
    sstate, params, opt_state = rule.update(sstate, params, g, opt_state, i, None, aux)
    return params, opt_state, sstate

  return jax.jit(step, donate_argnums=0)


def timed(fn, state, x, y, step: int, n: int):
  """(mean seconds per call over n calls at schedule step `step`, final state)."""
  i = jnp.asarray(step, jnp.int32)
  start = time.perf_counter()
  for _ in range(n):
    state = fn(state, x, y, i)
  jax.block_until_ready(state)
  return (time.perf_counter() - start) / n, state


def overhead(name: str, rules: list[str], windows: int) -> dict[str, float]:
  model, variables, x, y, tx = model_case(name)
  params = variables['params']
  paths = models.sparse_kernel_paths(variables)
  d_fn = dense_step(model, tx)
  own = lambda t: jax.tree.map(jnp.copy, t)  # steps donate their state: no shared buffers
  d_state = own((params, tx.init(params)))
  cases = {}
  for r in rules:
    rule = sparsity.make_rule(run_config(r), params, paths)
    sstate, p = rule.init(params, jax.random.PRNGKey(2))
    perts = (
      rule.zero_perturbations(model, {'params': p}, x, train=False) if rule.needs_aux else None
    )
    cases[r] = [rule, sparse_step(model, tx, rule, perts), own((p, tx.init(p), sstate))]
  n = STEPS[name]
  _, d_state = timed(d_fn, d_state, x, y, 1, 1)  # compile
  for case in cases.values():
    _, case[2] = timed(case[1], case[2], x, y, EVERY, 1)
  ratios = {r: [] for r in rules}
  for _ in range(windows):
    t_dense, d_state = timed(d_fn, d_state, x, y, 1, n)
    for r, case in cases.items():
      t_plain, case[2] = timed(case[1], case[2], x, y, 1, n)
      t_step = t_plain
      if case[0].updates_masks:
        t_update, case[2] = timed(case[1], case[2], x, y, EVERY, max(1, n // 4))
        t_step = ((EVERY - 1) * t_plain + t_update) / EVERY
      ratios[r].append(t_step / t_dense)
  print(f'{name}: dense step {t_dense * 1e3:.1f} ms')
  out = {}
  for r, rs in ratios.items():
    out[r] = statistics.median(rs)
    print(f'  {r:8s} step-time ratio {out[r]:.3f}  (windows: {", ".join(f"{v:.3f}" for v in rs)})')
  return out


def update_time(rule_name: str, n: int) -> float:
  """Seconds of one mask update of `rule_name` on a (1000, n / 1000) kernel (median of 3)."""
  d_in, d_out = 1000, n // 1000
  params = {'layer': {'kernel': jax.random.normal(jax.random.PRNGKey(0), (d_in, d_out))}}
  g = {'layer': {'kernel': jax.random.normal(jax.random.PRNGKey(1), (d_in, d_out))}}
  rule = sparsity.make_rule(run_config(rule_name), params, [('layer', 'kernel')])
  sstate, params = jax.jit(rule.init)(params, jax.random.PRNGKey(2))
  opt_state = optax.sgd(0.1, momentum=0.9).init(params)
  aux = None
  if rule.needs_aux:
    aux = {
      'intermediates': {
        'layer': {'gse_inputs': (jax.random.normal(jax.random.PRNGKey(3), (64, d_in)),)}
      },
      'perturbations': {
        'layer': {'gse_outputs': jax.random.normal(jax.random.PRNGKey(4), (64, d_out))}
      },
    }
  fn = jax.jit(rule.update)
  step = jnp.asarray(EVERY, jnp.int32)
  jax.block_until_ready(fn(sstate, params, g, opt_state, step, None, aux))
  times = []
  for _ in range(1 if n >= 5 * 10**7 else 3):
    start = time.perf_counter()
    jax.block_until_ready(fn(sstate, params, g, opt_state, step, None, aux))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def scaling(rules: list[str], sizes: list[int]) -> dict[str, float]:
  print('mask update time (s) against kernel size n:')
  print('  rule     ' + ''.join(f'{n:>10.0e}' for n in sizes) + '  exponent')
  out = {}
  for r in rules:
    ts = [update_time(r, n) for n in sizes]
    slope = float(np.polyfit(np.log(sizes), np.log(ts), 1)[0])
    out[r] = slope
    print(f'  {r:8s} ' + ''.join(f'{t:10.3f}' for t in ts) + f'  {slope:8.3f}')
  return out


def main(argv: list[str]) -> None:
  del argv
  print(
    f'machine: {platform.processor() or platform.machine()}, {jax.device_count()} '
    f'{jax.devices()[0].platform} device(s), jax {jax.__version__}'
  )
  if not _SKIP_OVERHEAD.value:
    for name in _MODELS.value:
      overhead(name, _RULES.value, _WINDOWS.value)
  if not _SKIP_SCALING.value:
    scaling(_SCALE_RULES.value, [int(float(s)) for s in _SIZES.value])


if __name__ == '__main__':
  app.run(main)
