"""Sparse-training overhead against the dense model, and mask-update time against layer size.

  python benchmarks/sparsity_overhead.py
  python benchmarks/sparsity_overhead.py --models=mlp --rules=static,rigl --windows=5
  python benchmarks/sparsity_overhead.py --skip_overhead --sizes=1e6,1e7,1e8

Step-time ratios: an MLP 784-1024-1024-10 at batch 256 (SGD momentum) and a GPT of 4 layers,
d 256, context 128, batch 16, byte vocabulary (AdamW), at 90% sparsity. Every step is
sift_jax.steps' own jitted train step on a fixed batch (dense: the same step with rule dense),
in a process whose heap is kept (sift_jax.hostmem), as the trainer's is. Dense and sparse
steps are timed in interleaved windows (dense, rule 1, dense, rule 2, dense, ...); each
rule's time is divided by the mean of the dense times just before and after it, and the
median of these per-window ratios is printed. A rule that updates masks every dT steps is charged
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

from sift_jax import config_lib, hostmem, models, sparsity, steps
from sift_jax.state import TrainState

_MODELS = flags.DEFINE_list('models', ['mlp', 'gpt'], 'Models to time: mlp, gpt.')
_RULES = flags.DEFINE_list('rules', ['static', 'rigl', 'set', 'topkast', 'gse'], 'Rules to time.')
_WINDOWS = flags.DEFINE_integer('windows', 9, 'Interleaved timing windows (median of ratios).')
_SIZES = flags.DEFINE_list('sizes', ['1e6', '3e6', '1e7', '3e7', '1e8'], 'Kernel sizes n.')
_SCALE_RULES = flags.DEFINE_list(
  'scale_rules', ['set', 'rigl', 'topkast', 'gse', 'gmp'], 'Rules for the scaling fit.'
)
_SKIP_OVERHEAD = flags.DEFINE_bool('skip_overhead', False, 'Only run the scaling benchmark.')
_SKIP_SCALING = flags.DEFINE_bool('skip_scaling', False, 'Only run the step-time ratios.')

SPARSITY = 0.9
EVERY = 100  # dT for RigL/SET/GSE, N for Top-KAST
# Steps per timing: ~1 s each (the GPT step is ~15x slower than the MLP one).
STEPS = {'mlp': 40, 'gpt': 4}


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
  """(config, model, variables, batch, optimizer, task) of one benchmark model."""
  c = config_lib.base_config()
  key = jax.random.PRNGKey(0)
  if name == 'mlp':
    c.model = models.model_config('mlp', hidden=(1024, 1024))
    meta = {'num_classes': 10, 'image_shape': (28, 28, 1)}
    x = jax.random.normal(key, (256, 28, 28, 1))
    batch = {'image': x, 'label': jax.random.randint(key, (256,), 0, 10)}
    tx = optax.sgd(0.01, momentum=0.9)
  elif name == 'gpt':
    c.model = models.model_config(
      'gpt', num_layers=4, d_model=256, num_heads=4, d_ff=1024, context_length=128, dropout=0.0
    )
    meta = {'vocab_size': 256, 'seq_len': 128}
    x = jax.random.randint(key, (16, 128), 0, 256)
    batch = {'inputs': x, 'targets': jnp.roll(x, -1, axis=1)}
    tx = optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1)
  else:
    raise ValueError(f'unknown benchmark model {name!r}; allowed: mlp, gpt')
  model = models.build_model(c, meta)
  variables = model.init(jax.random.PRNGKey(1), x, train=False)
  return c, model, variables, batch, tx, steps.task_of(meta)


def case(name: str, rule_name: str):
  """(rule, jitted train step of sift_jax.steps, its initial state) for one model and rule."""
  c, model, variables, batch, tx, task = model_case(name)
  variables = dict(variables)
  params = variables.pop('params')
  paths = models.sparse_kernel_paths({'params': params, **variables})
  variables.pop('sparse', None)
  rule = sparsity.make_rule(run_config(rule_name), params, paths)
  sstate, params = rule.init(params, jax.random.PRNGKey(2))
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    model_state=variables,
    opt_state=tx.init(params),
    sparsity=sstate,
    rng=jax.random.PRNGKey(3),
  )
  step = steps.make_train_step(model, tx, optax.constant_schedule(0.0), rule, task, c)
  state = jax.tree.map(jnp.copy, state)  # the step donates its state: no shared buffers
  return rule, jax.jit(step, donate_argnums=0), state, batch


def timed(fn, state, batch, step: int, n: int):
  """(mean seconds per call over n calls, all at schedule step `step`; final state)."""
  start = time.perf_counter()
  for _ in range(n):
    state, _ = fn(state.replace(step=jnp.asarray(step, jnp.int32)), batch)
  jax.block_until_ready(state)
  return (time.perf_counter() - start) / n, state


def overhead(name: str, rules: list[str], windows: int) -> dict[str, float]:
  cases = {r: list(case(name, r)) for r in ['dense', *rules]}
  n = STEPS[name]
  for c in cases.values():  # compile
    _, c[2] = timed(c[1], c[2], c[3], EVERY, 1)
  d = cases['dense']
  ratios = {r: [] for r in rules}
  dense_times = []
  for _ in range(windows):
    t_before, d[2] = timed(d[1], d[2], d[3], 1, n)
    dense_times.append(t_before)
    for r in rules:
      c = cases[r]
      t_step, c[2] = timed(c[1], c[2], c[3], 1, n)
      if c[0].changes_masks:
        t_update, c[2] = timed(c[1], c[2], c[3], EVERY, max(1, n // 4))
        t_step = ((EVERY - 1) * t_step + t_update) / EVERY
      t_after, d[2] = timed(d[1], d[2], d[3], 1, n)
      # Each rule against the dense steps timed just before and after it: slow drifts of a
      # shared machine cancel.
      ratios[r].append(t_step / ((t_before + t_after) / 2))
      t_before = t_after
  print(f'{name}: dense step {statistics.median(dense_times) * 1e3:.1f} ms (median)')
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
  fn = jax.jit(rule.update_masks)
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
  heap = hostmem.keep_freed_memory()
  print(
    f'machine: {platform.processor() or platform.machine()}, {jax.device_count()} '
    f'{jax.devices()[0].platform} device(s), jax {jax.__version__}, '
    f'heap kept (sift_jax.hostmem): {heap}'
  )
  if not _SKIP_OVERHEAD.value:
    for name in _MODELS.value:
      overhead(name, _RULES.value, _WINDOWS.value)
  if not _SKIP_SCALING.value:
    scaling(_SCALE_RULES.value, [int(float(s)) for s in _SIZES.value])


if __name__ == '__main__':
  app.run(main)
