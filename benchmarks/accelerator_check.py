"""One command that checks a GPU: kernel numerics, the Sparse Wide layer, train steps, ResNet-18.

  python benchmarks/accelerator_check.py                 # on the accelerator (budgets: 7 min)
  python benchmarks/accelerator_check.py --smoke         # the same code at tiny shapes, CPU

Writes <out>/accelerator_check.json (every number, the device, jax version, errors) and
<out>/accelerator_check.md (the tables), default out = benchmarks/results. Every section and
every case in it runs in its own try/except (the error is recorded and the next one runs), and
each section has a time budget (BUDGETS x --budget_scale, 420 s in all, so that the check ends
within 8 minutes on one H100; not yet run on one): once a section has used it, its remaining
cases are recorded as skipped (a compile already running is not interrupted). Sections:

1. numerics: the Pallas block-sparse kernel (`sparse_layers.block_matmul(impl='pallas')`,
   interpreted on the CPU) against the XLA formulation at the Sparse Wide layer, per block size,
   float32 and bfloat16: max abs error of the output, d input and d values (jax.vjp with a
   random cotangent), and that error over the reference's max abs.
2. layer: fwd + bwd time (value and gradients of sum(y^2), block_sparse_layer.py's measurement)
   of GPT-3 Small's MLP layer, dense 768 x 3072 against Sparse Wide s = 0.75 1536 x 6144 masked,
   block-sparse XLA and block-sparse Pallas per block size, bfloat16, --tokens rows.
3. train_step: the trainer's own jitted step (experiment.build_experiment from the config's
   dataset meta, random batches: no data is read) of GPT-3 Small dense, Sparse Wide 0.75 masked
   and block-sparse (balanced 128 x 128 blocks), and dense with model.dropout = 0 (the paper
   config's attention dropout 0.1 keeps the explicit T x T attention; without it the step runs
   jax's fused attention, cuDNN on a GPU), --gpt_batch sequences of 1024 tokens per device.
   MFU = 3 x the FLOP report's forward FLOPs per example of the dense GPT-3 Small (which Sparse
   Wide matches: iso-FLOP) x batch / step time / peak, against the device's bf16 dense peak where
   known (H100 / H200: 989 TFLOP/s) and against the bf16 matmul peak measured in this process.
4. resnet: the CIFAR ResNet-18 dense train step (configs/resnet18_cifar100.py, --resnet_batch
   images per device) in images/s, and the same network in PyTorch on the same device
   (torch_resnet_step.torch_resnet18) when torch is importable.

Timings are medians of --windows windows of --repeats calls after compilation and a warm-up.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from sift_jax import (  # noqa: E402
  config_lib,
  data,
  experiment,
  flops,
  metrics,
  models,
  sharding,
  sparse_layers,
  steps,
  train,
)
from sift_jax.models import gpt  # noqa: E402
from sift_jax.sift import sizes  # noqa: E402
from sift_jax.sparsity import select  # noqa: E402

SECTIONS = ('numerics', 'layer', 'train_step', 'resnet')
# Seconds each section may use (420 in all, inside the 8 minutes the check must fit on one H100).
BUDGETS = {'numerics': 60, 'layer': 60, 'train_step': 210, 'resnet': 90}
# Dense bf16 tensor-core peaks (NVIDIA's datasheets, SXM, without sparsity), by device_kind word.
PEAK_BF16 = {'H100': 989e12, 'H200': 989e12}

_OUT = flags.DEFINE_string('out', os.path.join(REPO, 'benchmarks', 'results'), 'Output folder.')
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny shapes, CPU-sized (Pallas interpreted).')
_SECTIONS = flags.DEFINE_list('sections', list(SECTIONS), f'Sections to run, from {SECTIONS}.')
_BUDGET_SCALE = flags.DEFINE_float(
  'budget_scale', 1.0, f"Multiplies each section's time budget (seconds: {BUDGETS})."
)
_TOKENS = flags.DEFINE_integer('tokens', 16384, 'Rows of the layer benchmark (16 x 1024).')
_BLOCKS = flags.DEFINE_list('blocks', ['64', '128'], 'Block sizes of the block-sparse cases.')
_GPT_BATCH = flags.DEFINE_integer('gpt_batch', 16, 'GPT sequences per device per step.')
_RESNET_BATCH = flags.DEFINE_integer('resnet_batch', 128, 'ResNet images per device per step.')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Calls per timing window.')
_WINDOWS = flags.DEFINE_integer('windows', 3, 'Timing windows; the median is reported.')

LEVEL = 0.75  # the Sparse Wide sparsity the targets are stated at


class Budget:
  """A section's clock: `spent` once it has run longer than its budget."""

  def __init__(self, seconds: float):
    self.seconds = seconds
    self.start = time.perf_counter()

  @property
  def spent(self) -> bool:
    return time.perf_counter() - self.start > self.seconds


def median_time(run: Callable[[], Any]) -> float:
  """Seconds per call of `run`, the median of --windows windows of --repeats calls, after one
  warm-up call (--smoke: one window of one call: it checks the code, not the speed)."""
  repeats, windows = (1, 1) if _SMOKE.value else (_REPEATS.value, _WINDOWS.value)
  jax.block_until_ready(run())
  times = []
  for _ in range(windows):
    start = time.perf_counter()
    out = None
    for _ in range(repeats):
      out = run()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / repeats)
  return statistics.median(times)


def pallas_impl() -> str:
  """The Pallas kernel compiled on GPU / TPU, interpreted elsewhere."""
  return 'pallas' if jax.default_backend() in ('gpu', 'tpu') else 'pallas_interpret'


def layer_shapes() -> tuple[int, int, int]:
  """(D_in, D_out, tokens) of the dense layer: GPT-3 Small's MLP, or a tiny one for --smoke."""
  return (64, 128, 64) if _SMOKE.value else (768, 3072, _TOKENS.value)


def blocks() -> list[int]:
  return [32] if _SMOKE.value else [int(b) for b in _BLOCKS.value]


@functools.cache
def sparse_wide_layer(b: int, dtype) -> dict[str, jax.Array]:
  """Sparse Wide's layer at s = LEVEL with balanced b x b blocks: the input, the masked kernel
  and mask, and the block-sparse values and rows (K = round((1 - s) R) blocks per column)."""
  d_in, d_out, n = layer_shapes()
  wide = sizes.width_factor(LEVEL)
  w_in, w_out = sizes.scale_width(d_in, wide), sizes.scale_width(d_out, wide)
  sparse_layers.check_dense_kernel((w_in, w_out), (b, b), 'the Sparse Wide layer')
  key_x, key_w, key_m = jax.random.split(jax.random.key(0), 3)
  k = max(1, round((1 - LEVEL) * (w_in // b)))
  mask = select.from_blocks(select.balanced_random_mask(key_m, (w_in // b, w_out // b), k), (b, b))
  kernel = (jax.random.normal(key_w, (w_in, w_out)) / np.sqrt(w_in) * mask).astype(dtype)
  values, rows = sparse_layers.from_masked(kernel, mask, (b, b), k)
  x = jax.random.normal(key_x, (n, w_in), dtype)  # (N, k D_in)
  return {'x': x, 'kernel': kernel, 'mask': mask, 'values': values, 'rows': rows}


def max_abs(a: jax.Array) -> float:
  return float(jnp.max(jnp.abs(a.astype(jnp.float32))))


Case = Callable[[], dict[str, Any]]


def run_cases(budget: Budget, cases: dict[str, Case], ratio_of: str = '') -> list[dict[str, Any]]:
  """One row per case: its fields, or its error (the next case runs: one kernel that does not
  fit or lower must not hide the others), or 'skipped' once the section's budget is spent.
  With `ratio_of`, each row also gets that field over the first case's as 'time_over_dense'."""
  rows = []
  for name, case in cases.items():
    row: dict[str, Any] = {'case': name}
    if budget.spent:
      row['skipped'] = 'section budget spent'
    else:
      try:
        row.update(case())
      except Exception as e:  # recorded; e.g. out of memory, or a kernel that fails to lower
        row['error'] = one_line(e)
    rows.append(row)
  first = rows[0].get(ratio_of) if ratio_of and rows else None
  for row in rows:
    if first and row.get(ratio_of):
      row['time_over_dense'] = row[ratio_of] / first
  return rows


def kernel_errors(b: int, dtype) -> dict[str, Any]:
  """Max abs error of the Pallas kernel's output, d input and d values against the XLA
  formulation's (jax.vjp with a random cotangent), and each over the reference's max abs."""
  layer = sparse_wide_layer(b, dtype)
  x, values, rows = layer['x'], layer['values'], layer['rows']
  cot = jax.random.normal(jax.random.key(1), (x.shape[0], layer['kernel'].shape[1]), dtype)

  def fwd_bwd(impl: str):
    f = lambda x, v: sparse_layers.block_matmul(x, v, rows, impl)
    y, vjp = jax.vjp(f, x, values)
    return (y, *vjp(cot))

  got = jax.jit(lambda: fwd_bwd(pallas_impl()))()
  want = jax.jit(lambda: fwd_bwd('xla'))()
  out: dict[str, Any] = {'dtype': jnp.dtype(dtype).name, 'block': b}
  for name, g, w in zip(('out', 'dx', 'dvalues'), got, want, strict=True):
    err, scale = max_abs(g.astype(jnp.float32) - w.astype(jnp.float32)), max_abs(w)
    out[f'{name}_max_abs_err'] = err
    out[f'{name}_rel_err'] = err / scale if scale else err
  return out


def numerics(budget: Budget) -> list[dict[str, Any]]:
  """Pallas against XLA: output and both gradients, per dtype and block size."""
  cases = {
    f'{jnp.dtype(dtype).name} b={b}': functools.partial(kernel_errors, b, dtype)
    for dtype in (jnp.float32, jnp.bfloat16)
    for b in blocks()
  }
  return run_cases(budget, cases)


def value_and_grads(apply: Callable) -> Callable:
  """jit(x, w -> (sum(apply(x, w)^2), d/dx, d/dw)): block_sparse_layer.py's measured function."""
  return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.square(apply(x, w))), (0, 1)))


def timed_layer(apply: Callable, make_args: Callable[[], tuple]) -> Case:
  def case() -> dict[str, Any]:
    fn, args = value_and_grads(apply), make_args()
    return {'tokens': args[0].shape[0], 'ms': 1e3 * median_time(lambda: fn(*args))}

  return case


def layer(budget: Budget) -> list[dict[str, Any]]:
  """fwd + bwd ms of the dense layer and of Sparse Wide's, masked and block-sparse, bf16."""
  d_in, d_out, n = layer_shapes()
  key_x, key_w = jax.random.split(jax.random.key(0))
  bf16 = jnp.bfloat16
  dense_args = lambda: (
    jax.random.normal(key_x, (n, d_in), bf16),
    jax.random.normal(key_w, (d_in, d_out), bf16),
  )
  cases = {f'dense {d_in}x{d_out}': timed_layer(lambda x, w: x @ w, dense_args)}
  wide = sizes.width_factor(LEVEL)
  w_in, w_out = sizes.scale_width(d_in, wide), sizes.scale_width(d_out, wide)
  wl = lambda b: sparse_wide_layer(b, bf16)
  b0 = blocks()[0]  # the masked layer's cost does not depend on its blocks
  cases[f'masked {w_in}x{w_out}'] = timed_layer(
    lambda x, w: x @ (w * wl(b0)['mask'].astype(w.dtype)), lambda: (wl(b0)['x'], wl(b0)['kernel'])
  )
  for b in blocks():
    for impl in ('xla', pallas_impl()):
      apply = lambda x, v, b=b, impl=impl: sparse_layers.block_matmul(x, v, wl(b)['rows'], impl)
      cases[f'block_sparse {impl.split("_")[0]} b={b}'] = timed_layer(
        apply, lambda b=b: (wl(b)['x'], wl(b)['values'])
      )
  return run_cases(budget, cases, ratio_of='ms')


def random_batch(exp: experiment.Experiment) -> dict[str, jax.Array]:
  """A training batch placed as the trainer places its batches (sharding.global_batch), of random
  values: tokens and labels below the vocabulary or class count, normal images."""
  rng = np.random.default_rng(0)
  c = exp.config
  x = models.example_input(c, exp.meta, batch_size=c.batch_size)  # (B, T) or (B, H, W, C)
  high = exp.meta.get('vocab_size') or exp.meta['num_classes']
  if jnp.issubdtype(x.dtype, jnp.integer):
    inputs = rng.integers(0, high, x.shape, dtype=np.int32)
  else:
    inputs = rng.standard_normal(x.shape, dtype=np.float32).astype(x.dtype)
  # The next token at every position, or one class per image.
  labels = rng.integers(0, high, x.shape if exp.task == steps.TOKENS else x.shape[:1], np.int32)
  return sharding.global_batch(exp.mesh, {exp.task.inputs: inputs, exp.task.labels: labels})


def device_peak() -> float | None:
  kind = jax.devices()[0].device_kind
  return next((p for word, p in PEAK_BF16.items() if word in kind), None)


def load(path: str, arg: str | None, overrides: dict[str, Any]):
  c = config_lib.load_config(os.path.join(REPO, path), arg)
  for key, value in overrides.items():
    group, _, leaf = key.rpartition('.')
    (c[group] if group else c)[leaf] = value
  return c


def dense_forward_flops(c) -> float:
  """Forward FLOPs per example of the config's model with every weight dense (the FLOP report)."""
  meta = data.dataset_meta(c)
  return flops.count_forward_flops(models.build_model(c, meta), c, meta).forward_dense


def timed_step(c, per_device_batch: int, flops_per_example: float, matmul_peak: float) -> Case:
  """Step time, throughput, MFU (of `flops_per_example` x 3 per example) and compiled footprint
  of the config's train step."""

  def case() -> dict[str, Any]:
    c.batch_size = per_device_batch * jax.device_count()
    c.total_steps = 10**6  # every step inside the schedule's warm part
    exp = experiment.build_experiment(c, data.dataset_meta(c))
    batch = random_batch(exp)
    state = exp.new_state()
    compiled = exp.train_step().lower(state, batch).compile()
    mem = compiled.memory_analysis()
    box = [state]

    def run():
      box[0], m = compiled(box[0], batch)  # the step donates its state: carry it forward
      return m

    s = median_time(run)
    per_device = 3 * flops_per_example * per_device_batch / s
    peak = device_peak()
    row: dict[str, Any] = {
      'dtype': c.model.dtype,
      'per_device_batch': per_device_batch,
      'step_ms': 1e3 * s,
      'examples_per_s': c.batch_size / s,
      'tflops_per_s_per_device': per_device / 1e12,
      'mfu_vs_spec_peak': per_device / peak if peak else None,
      'mfu_vs_measured_matmul': per_device / matmul_peak,
      'compiled_bytes': None,
    }
    if mem is not None:
      row['compiled_bytes'] = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
      )
    if 'seq_len' in exp.meta:
      row['tokens_per_s'] = row['examples_per_s'] * exp.meta['seq_len']
    return row

  return case


GPT_SMOKE = {
  'data.name': 'python_stdlib',  # vocabulary 256 instead of GPT-2's 50,257
  'model.num_layers': 1,
  'model.d_model': 64,
  'model.num_heads': 2,
  'model.context_length': 16,
}
BLOCK_SPARSE = {'sparsity.execution': 'block_sparse', 'sparsity.balanced': True}


def gpt_configs() -> dict[str, Any]:
  """name -> config of the GPT-3 Small train steps (tiny with --smoke)."""
  small = GPT_SMOKE if _SMOKE.value else {}
  b = 32 if _SMOKE.value else 128
  wide = f'sparsity={LEVEL}'
  block = {**small, **BLOCK_SPARSE, 'sparsity.block_shape': (b, b)}
  return {
    'GPT-3 Small dense': load('configs/gpt_small_dense.py', None, small),
    f'Sparse Wide {LEVEL} masked': load('configs/gpt_small_wide.py', wide, small),
    f'Sparse Wide {LEVEL} block_sparse b={b}': load('configs/gpt_small_wide.py', wide, block),
    # Without attention dropout the attention is jax's fused one (cuDNN on the GPU).
    'GPT-3 Small dense, dropout 0': load(
      'configs/gpt_small_dense.py', None, {**small, 'model.dropout': 0.0}
    ),
  }


def attention_path(c) -> str:
  """Which attention the train step runs (models/gpt.py's CausalAttentionCore)."""
  if c.model.dropout > 0:
    return f'explicit T x T (attention dropout {c.model.dropout})'
  q = jax.ShapeDtypeStruct((1, 1, 1, 1), jnp.dtype(c.model.dtype))
  return f'dot_product_attention ({gpt.attention_implementation(q)})'


def train_step(budget: Budget) -> list[dict[str, Any]]:
  """The GPT-3 Small steps; MFU of all counts the dense model's FLOPs, which Sparse Wide at
  s = 0.75 matches (iso-FLOP), so its MFU is the dense-equivalent useful work."""
  matmul_peak = metrics.matmul_peak_flops(256 if _SMOKE.value else 8192, dtype=jnp.bfloat16)
  configs = gpt_configs()
  dense_flops = dense_forward_flops(configs['GPT-3 Small dense'])
  per_device = 2 if _SMOKE.value else _GPT_BATCH.value
  cases = {}
  for name, c in configs.items():
    step = timed_step(c, per_device, dense_flops, matmul_peak)
    cases[name] = lambda step=step, c=c: {'attention': attention_path(c), **step()}
  rows = run_cases(budget, cases, ratio_of='step_ms')
  for row in rows:
    row['matmul_peak_tflops_bf16'] = matmul_peak / 1e12
  return rows


def torch_images_per_s(width: int, batch: int) -> dict[str, Any]:
  """The same ResNet-18 (torch_resnet_step.torch_resnet18) in PyTorch on this device."""
  try:
    import torch
  except ImportError:
    return {'skipped': 'torch not importable'}
  sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
  from torch_resnet_step import torch_resnet18

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model = torch_resnet18(width, 100).to(device, memory_format=torch.channels_last).train()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
  x = torch.randn(batch, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
  y = torch.randint(0, 100, (batch,), device=device)

  def step():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    if device == 'cuda':
      torch.cuda.synchronize()  # median_time's block_until_ready does not see torch's queue

  s = median_time(step)
  return {'device': device, 'step_ms': 1e3 * s, 'images_per_s': batch / s}


def resnet(budget: Budget) -> list[dict[str, Any]]:
  """The CIFAR ResNet-18 dense step in images/s, JAX and (when importable) PyTorch."""
  width = 4 if _SMOKE.value else 64
  per_device = 2 if _SMOKE.value else _RESNET_BATCH.value
  c = load('configs/resnet18_cifar100.py', None, {'model.width': width})
  peak = metrics.matmul_peak_flops(256 if _SMOKE.value else 8192)  # float32, as the config
  step = timed_step(c, per_device, dense_forward_flops(c), peak)

  def jax_case() -> dict[str, Any]:
    row = step()
    row['images_per_s'] = row.pop('examples_per_s')
    return row

  cases = {
    f'ResNet-18 CIFAR-100 width {width}, JAX': jax_case,
    'the same in PyTorch': lambda: torch_images_per_s(width, per_device * jax.device_count()),
  }
  return run_cases(budget, cases)


def one_line(e: BaseException) -> str:
  return f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:500]


@contextlib.contextmanager
def recorded(results: dict[str, Any], name: str) -> Iterator[Budget]:
  """Runs a section: its rows or its error land in results[name], then the next one runs."""
  budget = Budget(BUDGETS[name] * _BUDGET_SCALE.value)
  entry: dict[str, Any] = {}
  results['sections'][name] = entry
  try:
    yield budget
  except Exception as e:  # recorded in the JSON; the check goes on with the next section
    entry['error'] = one_line(e)
    entry['traceback'] = traceback.format_exc()[-4000:]
  entry['seconds'] = time.perf_counter() - budget.start


def fmt(v: Any) -> str:
  if isinstance(v, float):
    return f'{v:.3g}' if abs(v) < 1e-2 or abs(v) >= 1e4 else f'{v:.3f}'
  return '' if v is None else str(v)


def markdown(results: dict[str, Any]) -> str:
  """One table per section (its rows' keys as columns), errors and skips as text."""
  lines = [
    f'# accelerator_check: {results["device"]} x {results["device_count"]}',
    '',
    f'jax {results["jax"]}, backend {results["backend"]}, smoke={results["smoke"]}, '
    f'{results["seconds"]:.0f} s in all.',
  ]
  for name, entry in results['sections'].items():
    lines += ['', f'## {name} ({entry["seconds"]:.0f} s)', '']
    rows = entry.get('rows', [])
    columns = list(dict.fromkeys(k for r in rows for k in r))
    if rows:
      lines += ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
      lines += ['| ' + ' | '.join(fmt(r.get(k)) for k in columns) + ' |' for r in rows]
    if 'error' in entry:
      lines.append(f'ERROR: {entry["error"]}')
  return '\n'.join(lines) + '\n'


RUNNERS = {'numerics': numerics, 'layer': layer, 'train_step': train_step, 'resnet': resnet}


def main(argv):
  del argv
  unknown = sorted(set(_SECTIONS.value) - set(SECTIONS))
  if unknown:
    raise app.UsageError(f'--sections: unknown {unknown}; known: {", ".join(SECTIONS)}')
  train.use_compilation_cache()  # reruns (and the smoke test) skip the compiles
  start = time.perf_counter()
  results: dict[str, Any] = {
    'device': jax.devices()[0].device_kind,
    'device_count': jax.device_count(),
    'backend': jax.default_backend(),
    'jax': jax.__version__,
    'smoke': _SMOKE.value,
    'sections': {},
  }
  for name in _SECTIONS.value:
    print(f'accelerator_check: {name} ...', flush=True)
    with recorded(results, name) as budget:
      results['sections'][name]['rows'] = RUNNERS[name](budget)
  results['seconds'] = time.perf_counter() - start
  os.makedirs(_OUT.value, exist_ok=True)
  base = os.path.join(_OUT.value, 'accelerator_check')
  with open(base + '.json', 'w') as f:
    json.dump(results, f, indent=1)
  table = markdown(results)
  with open(base + '.md', 'w') as f:
    f.write(table)
  print(table)
  print(f'wrote {base}.json and {base}.md')


if __name__ == '__main__':
  app.run(main)
