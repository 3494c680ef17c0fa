"""CIFAR ResNet-18 train step: sift_jax's options against an equivalent PyTorch step, same CPUs.

  pip install -r benchmarks/requirements.txt          # CPU torch, for this benchmark only
  SIFT_DATA_DIR=... python benchmarks/torch_resnet_step.py
  python benchmarks/torch_resnet_step.py --options=jax:xla,jax:im2col,jax:xla:ynn_off,torch:nhwc
  python benchmarks/torch_resnet_step.py --batch=2 --steps=1 --windows=1 --width=8   # smoke run

Both sides train the same network: 3x3 stride-1 stem, no max-pool, BasicBlocks [2, 2, 2, 2] of
widths 64..512 (times --width / 64), BatchNorm, float32, SGD with Nesterov momentum 0.9 and
weight decay 5e-4, batch --batch of 32x32x3 images. The JAX side is the trainer's own jitted step
(configs/resnet18_cifar100.py:local at --width; its CIFAR-10 images, so 10 classes against
torch's 100: a 0.01% FLOP difference); the torch side is this file's own model on random data.

Each option runs in its own worker process, pinned to the same CPUs (--cpus) with as many
threads. The workers build and warm up, then this process asks them in turns for a window of
--steps steps, --windows times, so every option sees the same load: compare the ratios within a
run, not absolute images/s across runs. An option is `jax:<conv_impl>[:<XLA variant>]`
(conv_impl from sift_jax.sparse_layers.conv.IMPLS, variant from step_time_xla.VARIANTS) or
`torch:<nchw|nhwc>` (nhwc = torch.channels_last). Prints one line per option: median images/s,
step ms and the ratio to the first torch option, then a summary line.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_LAYOUTS = ('nchw', 'nhwc')

_OPTIONS = flags.DEFINE_list(
  'options', ['torch:nchw', 'torch:nhwc', 'jax:xla', 'jax:im2col'], 'Options to time, in turns.'
)
_BATCH = flags.DEFINE_integer('batch', 128, 'Images per step.')
_WIDTH = flags.DEFINE_integer('width', 64, 'Channels of the first stage (64 = ResNet-18).')
_STEPS = flags.DEFINE_integer('steps', 5, 'Steps per timing window.')
_WINDOWS = flags.DEFINE_integer('windows', 3, 'Windows per option; the median is reported.')
_CPUS = flags.DEFINE_string('cpus', '', "CPUs to pin every worker to, e.g. '0,1' (default: all).")
_WORKER = flags.DEFINE_string('worker', '', 'Internal: run as the worker of this option.')


def parse_option(option: str) -> tuple[str, str, str]:
  """'jax:im2col:ynn_off' -> ('jax', 'im2col', 'ynn_off'); 'torch:nhwc' -> ('torch', 'nhwc', '')."""
  from step_time_xla import VARIANTS

  from sift_jax.sparse_layers.conv import IMPLS

  parts = option.split(':')
  if parts[0] == 'jax' and len(parts) in (2, 3) and parts[1] in IMPLS:
    variant = parts[2] if len(parts) == 3 else 'default'
    if variant in VARIANTS:
      return 'jax', parts[1], variant
  if parts[0] == 'torch' and len(parts) == 2 and parts[1] in TORCH_LAYOUTS:
    return 'torch', parts[1], ''
  raise ValueError(
    f'option {option!r}; allowed: jax:<{"|".join(IMPLS)}>[:<{"|".join(VARIANTS)}>] or '
    f'torch:<{"|".join(TORCH_LAYOUTS)}>'
  )


def jax_step(conv_impl: str, variant: str):
  """sift_jax's compiled train step and its first state and batches: () -> runs --steps steps."""
  import jax
  from step_time_xla import VARIANTS

  from sift_jax import config_lib, experiment, hostmem, sharding

  hostmem.keep_freed_memory()  # as the trainer does on CPU
  c = config_lib.load_config(os.path.join(REPO, 'configs/resnet18_cifar100.py'), 'local')
  c.model.width = _WIDTH.value
  c.model.conv_impl = conv_impl
  c.batch_size = _BATCH.value
  c.total_steps = 10**6  # keeps every step inside the schedule's warm part
  exp = experiment.build_experiment(c)
  batches = [
    sharding.global_batch(exp.mesh, exp.dataset.train_batch(i)) for i in range(_STEPS.value)
  ]
  state = exp.new_state()
  step = exp.train_step().lower(state, batches[0]).compile(compiler_options=VARIANTS[variant])
  box = [state]

  def run() -> None:
    m = None
    for b in batches:
      box[0], m = step(box[0], b)
    jax.block_until_ready(m)

  return run


def torch_resnet18(width: int, num_classes: int):
  """PyTorch CIFAR ResNet-18: 3x3 stem, no max-pool, BasicBlocks [2, 2, 2, 2]."""
  from torch import nn

  def conv_bn(c_in: int, c_out: int, k: int, stride: int) -> list:
    return [nn.Conv2d(c_in, c_out, k, stride, (k - 1) // 2, bias=False), nn.BatchNorm2d(c_out)]

  class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
      super().__init__()
      self.body = nn.Sequential(
        *conv_bn(c_in, c_out, 3, stride), nn.ReLU(inplace=True), *conv_bn(c_out, c_out, 3, 1)
      )
      change = stride != 1 or c_in != c_out
      self.shortcut = nn.Sequential(*conv_bn(c_in, c_out, 1, stride)) if change else nn.Identity()

    def forward(self, x):
      return nn.functional.relu(self.body(x) + self.shortcut(x))

  layers = [*conv_bn(3, width, 3, 1), nn.ReLU(inplace=True)]
  c_in = width
  for stage in range(4):
    c_out = width * 2**stage
    layers += [Block(c_in, c_out, 1 if stage == 0 else 2), Block(c_out, c_out, 1)]
    c_in = c_out
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
  return nn.Sequential(*layers)


def torch_step(layout: str):
  """The PyTorch train step on random data: () -> runs --steps steps."""
  import torch

  torch.manual_seed(0)
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  fmt = torch.channels_last if layout == 'nhwc' else torch.contiguous_format
  model = torch_resnet18(_WIDTH.value, 100).to(memory_format=fmt).train()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
  x = torch.randn(_BATCH.value, 3, 32, 32).to(memory_format=fmt)  # (B, 3, 32, 32)
  y = torch.randint(0, 100, (_BATCH.value,))  # (B,)

  def run() -> None:
    for _ in range(_STEPS.value):
      opt.zero_grad(set_to_none=True)
      torch.nn.functional.cross_entropy(model(x), y).backward()
      opt.step()

  return run


def worker(option: str) -> None:
  """Builds the option's step, warms it up, then runs one window per 'run' line on stdin."""
  kind, impl, variant = parse_option(option)
  run = jax_step(impl, variant) if kind == 'jax' else torch_step(impl)
  run()  # compilation and warm-up
  print('ready', flush=True)
  for line in sys.stdin:
    if line.strip() != 'run':
      break
    t = time.perf_counter()
    run()
    print(json.dumps(time.perf_counter() - t), flush=True)


def start_worker(option: str) -> subprocess.Popen:
  cmd = [sys.executable, os.path.abspath(__file__), f'--worker={option}']
  for flag in (_BATCH, _WIDTH, _STEPS):
    cmd.append(f'--{flag.name}={flag.value}')
  cpus = {int(c) for c in _CPUS.value.split(',')} if _CPUS.value else os.sched_getaffinity(0)
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')])}
  return subprocess.Popen(
    cmd,
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
    env=env,
    preexec_fn=lambda: os.sched_setaffinity(0, cpus),
  )


def read_line(proc: subprocess.Popen, option: str) -> str:
  line = proc.stdout.readline()
  if not line:
    raise RuntimeError(f'worker {option!r} exited with code {proc.wait()} (see its stderr above)')
  return line.strip()


def main(argv):
  del argv
  if _WORKER.value:
    worker(_WORKER.value)
    return
  options = _OPTIONS.value
  for option in options:
    parse_option(option)
  workers = {}
  try:
    for option in options:  # one at a time: compilation is not timed but loads the machine
      workers[option] = start_worker(option)
      if read_line(workers[option], option) != 'ready':
        raise RuntimeError(f'worker {option!r} did not start')
    times = {option: [] for option in options}
    for _ in range(_WINDOWS.value):
      for option, proc in workers.items():
        proc.stdin.write('run\n')
        proc.stdin.flush()
        times[option].append(json.loads(read_line(proc, option)) / _STEPS.value)
  finally:
    for proc in workers.values():
      proc.stdin.close()
      proc.wait()
  rates = {option: _BATCH.value / statistics.median(ts) for option, ts in times.items()}
  ref = next((o for o in options if o.startswith('torch:')), options[0])
  print(
    f'CIFAR ResNet-18 train step, width {_WIDTH.value}, batch {_BATCH.value}, float32, '
    f'{_WINDOWS.value} windows x {_STEPS.value} steps per option in turns, CPUs '
    f'{_CPUS.value or sorted(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.2f}'
  )
  print(f'{"option":<24} {"images/s":>9} {"step ms":>9} {"ratio to " + ref:>20}')
  for option, rate in rates.items():
    print(f'{option:<24} {rate:9.2f} {1e3 * _BATCH.value / rate:9.1f} {rate / rates[ref]:20.3f}')
  jax_options = [o for o in options if o.startswith('jax:')]
  if jax_options:
    best = max(jax_options, key=rates.get)
    print(
      f'summary: fastest JAX option {best} at {rates[best]:.2f} images/s, '
      f'{rates[best] / rates[ref]:.3f}x {ref} ({rates[ref]:.2f} images/s)'
    )


if __name__ == '__main__':
  app.run(main)
