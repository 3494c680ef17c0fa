"""Multi-process runs: join a JAX cluster, and start N local CPU processes as one.

    python -m sift_jax.launch --processes=2 --devices_per_process=4 -- \\
        --config=configs/gpt_small_dense.py:local --workdir=runs/two_hosts

starts `python -m sift_jax.main <flags after -->` N times on this machine, each process a
host of one jax.distributed cluster whose coordinator is process 0 on localhost; collectives
between processes go through gloo (JAX's CPU default). It is the multi-host code path of a
TPU/GPU pod, minus the hardware. SIGTERM/SIGINT to the launcher reach every process as SIGTERM
(they agree on a step, save there and exit 0); if one process fails the others are stopped.

On a real cluster nothing is launched from here: each host runs sift_jax.main itself and
`initialize` joins it to the others, from the config's `distributed` group or the environment.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import ml_collections
from absl import app, flags, logging

# Set by the launcher for each process (JAX_COORDINATOR_ADDRESS is JAX's own variable).
ENV_NUM_PROCESSES = 'SIFT_NUM_PROCESSES'
ENV_PROCESS_ID = 'SIFT_PROCESS_ID'
ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'
# How long the surviving processes get to exit by themselves after one failed.
_GRACE_S = 20.0
# Gloo prints one line per collective context it connects, on std::cout with no switch to turn it
# off (gloo/transport/tcp/context.cc); a complete connection says nothing worth reading. A partial
# one (fewer peers than expected, and gloo's "is NOT connected to" line) is kept.
_GLOO_CONNECTED = re.compile(
  r'\[Gloo\] Rank \d+ is connected to (\d+) peer ranks\. '
  r'Expected number of connected peer ranks is : (\d+)\s*$'
)


def is_chatter(line: str) -> bool:
  """True for a collective library's routine line that the launcher does not relay."""
  m = _GLOO_CONNECTED.match(line)
  return bool(m) and m.group(1) == m.group(2)


def initialize(config: ml_collections.ConfigDict) -> None:
  """jax.distributed.initialize() when the config or the environment asks for a cluster.

  Must run before anything touches a device. Config values win over the environment; unset
  ones are left to JAX's cluster auto-detection (TPU pods, SLURM, Open MPI, Kubernetes).
  A no-op for single-process runs and when already initialized.
  """
  d = config.distributed
  env_n = os.environ.get(ENV_NUM_PROCESSES)
  if not (d.initialize or d.num_processes or d.coordinator_address or env_n):
    return
  if jax.distributed.is_initialized():
    return
  num = d.num_processes or (int(env_n) if env_n else None)
  if num is not None and num < 1:
    raise ValueError(f'distributed.num_processes={num} must be >= 1')
  env_id = os.environ.get(ENV_PROCESS_ID)
  pid = d.process_id if d.process_id >= 0 else (int(env_id) if env_id else None)
  if num is not None and pid is not None and not 0 <= pid < num:
    raise ValueError(f'distributed.process_id={pid} must be in [0, {num})')
  jax.distributed.initialize(
    coordinator_address=d.coordinator_address or os.environ.get(ENV_COORDINATOR) or None,
    num_processes=num,
    process_id=pid,
  )
  logging.info('process %d of %d joined the cluster', jax.process_index(), jax.process_count())


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def process_env(
  process_id: int, processes: int, coordinator: str, devices_per_process: int
) -> dict[str, str]:
  """The environment of one local process: cluster coordinates and its CPU device count."""
  xla = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'device_count' not in f]
  xla.append(f'--xla_force_host_platform_device_count={devices_per_process}')
  return {
    # XLA's and the coordination service's C++ INFO lines (one per connection and barrier).
    'TF_CPP_MIN_LOG_LEVEL': '1',
    **os.environ,
    ENV_NUM_PROCESSES: str(processes),
    ENV_PROCESS_ID: str(process_id),
    ENV_COORDINATOR: coordinator,
    'JAX_PLATFORMS': 'cpu',
    'XLA_FLAGS': ' '.join(xla),
  }


def _relay(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ''):
    if is_chatter(line):
      continue
    out.write(prefix + line)
    out.flush()
  stream.close()


def run_local(command: list[str], processes: int, devices_per_process: int = 1) -> int:
  """Runs `command` as `processes` cluster members on this machine; returns the exit code.

  Output lines are prefixed with `[p<i>]`. The code is 0 when every process exits 0, else the
  first non-zero code seen.
  """
  if processes < 1:
    raise ValueError(f'--processes={processes} must be >= 1')
  if devices_per_process < 1:
    raise ValueError(f'--devices_per_process={devices_per_process} must be >= 1')
  coordinator = f'localhost:{free_port()}'
  procs, relays = [], []
  for i in range(processes):
    p = subprocess.Popen(
      command,
      env=process_env(i, processes, coordinator, devices_per_process),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      bufsize=1,
      start_new_session=True,  # a terminal's Ctrl-C reaches the launcher only, which forwards
    )
    procs.append(p)
    for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
      t = threading.Thread(target=_relay, args=(stream, f'[p{i}] ', out), daemon=True)
      t.start()
      relays.append(t)

  def forward(signum, frame):
    del signum, frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)  # JAX's preemption service listens for SIGTERM

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    code = _wait_all(procs)
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
    for t in relays:
      t.join(timeout=5)
  return code


def _wait_all(procs: list[subprocess.Popen]) -> int:
  """Waits for every process; after the first failure, stops the rest (TERM, then KILL)."""
  first_failure = 0
  deadline = None
  while any(p.poll() is None for p in procs):
    failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
    if failed and not first_failure:
      first_failure = failed[0]
      logging.error('a process exited with code %d; stopping the others', first_failure)
      deadline = time.monotonic() + _GRACE_S
      for p in procs:
        if p.poll() is None:
          p.terminate()
    if deadline is not None and time.monotonic() > deadline:
      for p in procs:
        if p.poll() is None:
          p.kill()
    time.sleep(0.1)
  codes = [p.returncode for p in procs]
  return first_failure or next((c for c in codes if c), 0)


def main(argv: list[str]) -> None:
  command = [sys.executable, '-m', flags.FLAGS.module, *argv[1:]]
  sys.exit(run_local(command, flags.FLAGS.processes, flags.FLAGS.devices_per_process))


if __name__ == '__main__':
  # Defined here, not at import: the trainer imports this module for `initialize`.
  flags.DEFINE_integer('processes', 2, 'Local processes (hosts) to start.')
  flags.DEFINE_integer('devices_per_process', 1, 'Emulated CPU devices per process.')
  flags.DEFINE_string('module', 'sift_jax.main', 'Module each process runs.')
  app.run(main)
