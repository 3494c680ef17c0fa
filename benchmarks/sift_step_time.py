"""Train-step time of each Sparse-IFT member relative to the dense model, with its FLOP ratio.

  python benchmarks/sift_step_time.py                        # GPT and ResNet local configs
  python benchmarks/sift_step_time.py --models=gpt --levels=0.5 --steps=5
  python benchmarks/sift_step_time.py --models=gpt,mlp --executions=masked,block_sparse --blocks=64,128

Every member at every level runs in this one process, timed like benchmarks/step_time.py (median
of windows after compilation). Masks are simulated (dense matmuls on masked weights), so a wide
member costs about 1/(1-s) x dense here while its FLOP ratio is ~1: the baseline sparse kernels
must beat. `--executions=block_sparse` adds rows with the sparse Dense kernels stored and run as
balanced blocks of each `--blocks` size (sparsity.execution=block_sparse; ResNet has no
block-sparse form, and a block that does not tile a member's kernels is reported as n/a).
`--remat` rematerialises the sparse members' blocks (model.remat=True) against the dense model
without: for GPU/TPU, since XLA:CPU compiles it away (the footprint does not move;
docs/block_sparse.md).

The GPT is the issue's benchmark shape (the `local` config widened to d_model 256, d_ff 1024:
4 layers, context 128, batch 16); the MLP is `mlp_fashion_mnist.py:local` (784-1024-1024-10,
batch 256). `memory/dense` is the compiled train step's footprint (XLA's memory analysis:
arguments + outputs + temporaries - donated aliases, i.e. params, optimizer and sparsity state,
the batch and the activations) over the dense model's: a property of the program, not a timing.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_time  # noqa: E402  (the shared timing loop and case table of the dense benchmark)

from sift_jax import data, hostmem, train  # noqa: E402
from sift_jax.sift import report  # noqa: E402

CONFIGS = {
  'gpt': 'configs/gpt_small_dense.py',
  'mlp': 'configs/mlp_fashion_mnist.py',
  'resnet': 'configs/resnet18_cifar100.py',
}
# The benchmark GPT: the local shape at twice the width (Sparse Wide 0.75 gives d_model 512).
SHAPES = {'gpt': {'model.d_model': 256, 'model.d_ff': 1024}}

_MODELS = flags.DEFINE_list('models', ['gpt', 'mlp'], f'Models, from {list(CONFIGS)}.')
_LEVELS = flags.DEFINE_list('levels', ['0.5', '0.75'], 'Sparsity levels.')
_MEMBERS = flags.DEFINE_list('members', list(report.MEMBERS), 'Sparse-IFT members.')
_EXECUTIONS = flags.DEFINE_list('executions', ['masked'], 'masked and/or block_sparse.')
_BLOCKS = flags.DEFINE_list('blocks', ['32', '64', '128'], 'Square block sizes (block_sparse).')
_REMAT = flags.DEFINE_bool(
  'remat', False, "Rematerialise the Sparse-IFT models' blocks (model.remat; dense runs without)."
)


def add_case(model: str, member: str, level: float, block: int = 0) -> str:
  """Registers a case in step_time's table and returns its name; block > 0 runs block-sparse."""
  name = f'{model}_{member}_{level:g}' + (f'_block{block}' if block else '')
  arg = 'local' if member == 'dense' else f'local,sift={member},sparsity={level}'
  overrides = dict(SHAPES.get(model, {}))
  if _REMAT.value and member != 'dense':
    overrides['model.remat'] = True
  if block:
    overrides |= {'sparsity.execution': 'block_sparse', 'sparsity.block_shape': (block, block)}
  step_time.CASES[name] = (CONFIGS[model], arg, overrides)
  return name


def executions(model: str, member: str) -> list[tuple[str, int]]:
  """(label, block) of each execution row of a member: masked is block 0."""
  rows = [('masked', 0)] if 'masked' in _EXECUTIONS.value else []
  if 'block_sparse' in _EXECUTIONS.value and member != 'dense' and model != 'resnet':
    rows += [(f'block {b}', int(b)) for b in _BLOCKS.value]
  return rows


def flop_ratio(name: str) -> float:
  c = step_time.case_config(name)
  r = report.sift_flops(c, data.dataset_meta(c))
  return r.forward / r.dense_forward


def step_cost(name: str, peak: float) -> tuple[float, int]:
  """Step time (s) and compiled footprint (bytes) of a case under step_time's first variant."""
  r = next(iter(step_time.measure(name, peak).values()))
  return r['step_time_s'], r['step_bytes']


def main(argv):
  del argv
  train.use_compilation_cache()
  heap = hostmem.keep_freed_memory()  # as the trainer does on CPU
  peak = 1.0  # MFU is not reported here; only ratios measured in this process
  print(f'device: {jax.devices()[0].device_kind} x {jax.device_count()}, heap kept: {heap}')
  print(
    f'{"model":<7} {"member":<11} {"s":>5} {"execution":<10} {"step ms":>9} {"time/dense":>11} '
    f'{"FLOPs/dense":>12} {"memory/dense":>13} {"MiB":>8}'
  )
  for model in _MODELS.value:
    if model not in CONFIGS:
      raise ValueError(f'unknown model {model!r}; known: {", ".join(CONFIGS)}')
    dense, dense_bytes = step_cost(add_case(model, 'dense', 0.0), peak)
    print(
      f'{model:<7} {"dense":<11} {0:5g} {"masked":<10} {1e3 * dense:9.1f} {1:11.2f} {1:12.3f} '
      f'{1:13.2f} {dense_bytes / 2**20:8.1f}',
      flush=True,
    )
    for level in map(float, _LEVELS.value):
      for member in _MEMBERS.value:
        for label, block in executions(model, member):
          name = add_case(model, member, level, block)
          head = f'{model:<7} {member:<11} {level:5g} {label:<10}'
          try:
            t, nbytes = step_cost(name, peak)
          except ValueError as e:  # a block that does not tile this member's kernels
            print(f'{head} n/a: {e}', flush=True)
            continue
          print(
            f'{head} {1e3 * t:9.1f} {t / dense:11.2f} {flop_ratio(name):12.3f} '
            f'{nbytes / dense_bytes:13.2f} {nbytes / 2**20:8.1f}',
            flush=True,
          )


if __name__ == '__main__':
  app.run(main)
