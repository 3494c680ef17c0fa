"""sift_jax.hostmem: a freed large block is reused, not unmapped and re-faulted."""

import subprocess
import sys

import pytest

# Allocates, touches and frees a 64 MiB block 8 times; prints minor page faults per cycle after
# the first (which always faults).
CYCLES = """
import resource, sys
import numpy as np
from sift_jax import hostmem
applied = hostmem.keep_freed_memory() if sys.argv[1] == '1' else False
def cycle():
  a = np.empty(64 << 20, np.uint8)
  a[:] = 1
  del a
cycle()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
  cycle()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 8)
"""


def faults_per_cycle(keep: bool) -> tuple[bool, float]:
  out = subprocess.run(
    [sys.executable, '-c', CYCLES, '1' if keep else '0'],
    capture_output=True,
    text=True,
    check=True,
  ).stdout.split()
  return out[0] == 'True', float(out[1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc only')
def test_keep_freed_memory_stops_refaulting():
  applied, kept = faults_per_cycle(keep=True)
  assert applied
  _, default = faults_per_cycle(keep=False)
  # glibc's default unmaps the block on free, so every cycle faults its pages in again (at
  # least 32 faults even with 2 MiB transparent huge pages); kept, the pages stay mapped.
  assert default >= 32
  assert kept < 4


def test_env_turns_it_off(monkeypatch):
  from sift_jax import hostmem

  monkeypatch.setenv(hostmem.ENV, '0')
  assert hostmem.keep_freed_memory() is False
