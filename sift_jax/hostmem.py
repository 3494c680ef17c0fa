"""Host heap settings that keep XLA:CPU steps from page-faulting on every call.

XLA:CPU mallocs one temporary buffer per executable call and frees it afterwards. glibc serves a
block above its mmap threshold (32 MiB at most) with a fresh mmap and unmaps it on free, so a
step whose temporaries exceed that touches new zero pages on every call: one minor fault per
4 KiB. Measured on the MLP of benchmarks/sparsity_overhead.py: a mask-update branch under
lax.cond (not even taken) raised the step's temporaries from 28 to 57 MiB, which cost ~3,700
faults and +40% time per step. Serving every block from the heap and never trimming it keeps
the pages mapped across calls: the same step then runs at the dense step's time, with no
faults. The price is that the process keeps its peak heap (it does not shrink after a spike).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV = 'SIFT_JAX_KEEP_HEAP'  # '0' leaves malloc as it is

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # bytes; mallopt takes an int


def keep_freed_memory() -> bool:
  """Makes glibc malloc reuse freed memory instead of returning it; True when applied.

  A no-op (False) off Linux/glibc, or with SIFT_JAX_KEEP_HEAP=0 in the environment.
  """
  if os.environ.get(ENV, '1') == '0' or not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
  except OSError:
    return False
  if not hasattr(libc, 'gnu_get_libc_version'):  # the parameters above are glibc's
    return False
  return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
