"""The iso-FLOP size rules of the Sparse-IFT members (docs/methods.md section 1).

All rules take the one sparsity s. With the default rounding ('original', as the released code)
branch count and widening come from the integer b = round(1 / (1 - s)); 'exact' uses 1 / (1 - s)
itself (and then Sparse Parallel needs it to be an integer). Ranks are computed in exact rational
arithmetic from s: in floating point 1 - 0.9 is 0.0999..., which would push a rank that is an
exact integer one above the formula's value.
"""

from __future__ import annotations

import math
from fractions import Fraction

ROUNDINGS = ('original', 'exact')
# s is a config value such as 0.9: its nearest fraction with a small denominator is what was meant.
_MAX_DENOMINATOR = 1_000_000


def check_level(level: float) -> None:
  """Raises ValueError unless the sparsity is in [0, 1)."""
  if not 0.0 <= level < 1.0:
    raise ValueError(f'sparsity level {level!r} is outside [0, 1)')


def _check_rounding(rounding: str) -> None:
  if rounding not in ROUNDINGS:
    raise ValueError(f'sift.rounding {rounding!r}; allowed: {", ".join(ROUNDINGS)}')


def _fraction(level: float) -> Fraction:
  check_level(level)
  return Fraction(level).limit_denominator(_MAX_DENOMINATOR)


def _check_dims(d_in: int, d_out: int) -> None:
  if d_in <= 0 or d_out <= 0:
    raise ValueError(f'layer dimensions must be positive, got D_in={d_in}, D_out={d_out}')


def branch_count(level: float, rounding: str = 'original') -> int:
  """Sparse Parallel's number of branches b = round(1 / (1 - s)): 2, 4, 10 at s = 0.5, 0.75, 0.9.

  With rounding='exact', 1 / (1 - s) must itself be an integer.
  """
  _check_rounding(rounding)
  ratio = 1 / (1 - _fraction(level))  # exact rational
  if rounding == 'original':
    return max(1, round(ratio))
  if ratio.denominator != 1:
    raise ValueError(
      f'Sparse Parallel with sift.rounding=exact needs 1/(1-s) to be an integer; '
      f's={level} gives {float(ratio):.6g} (use rounding=original or s such as 0.5, 0.75, 0.9)'
    )
  return int(ratio)


def width_factor(level: float, rounding: str = 'original') -> float:
  """Sparse Wide's width multiplier: sqrt(b) ('original') or sqrt(1 / (1 - s)) ('exact')."""
  _check_rounding(rounding)
  if rounding == 'original':
    return math.sqrt(branch_count(level, rounding))
  return math.sqrt(1 / (1 - float(_fraction(level))))


def scale_width(width: int, factor: float, multiple_of: int = 1) -> int:
  """`width * factor` truncated (ResNet: 64 -> 90 at b = 2), or rounded up to a multiple
  (GPT d_model to the head count: 768 -> 1092 at b = 2)."""
  if width <= 0 or multiple_of <= 0:
    raise ValueError(f'width and multiple_of must be positive, got {width}, {multiple_of}')
  scaled = width * factor
  if multiple_of == 1:
    # An exact product such as 64 * sqrt(4) must not truncate to 127 through rounding noise.
    return int(math.floor(scaled + 1e-9))
  return int(math.ceil(scaled / multiple_of - 1e-9)) * multiple_of


def factorized_rank(d_in: int, d_out: int, level: float) -> int:
  """Sparse Factorized's inner width d = ceil(D_in D_out / ((1 - s)(D_in + D_out)))."""
  _check_dims(d_in, d_out)
  return math.ceil(Fraction(d_in * d_out) / ((1 - _fraction(level)) * (d_in + d_out)))


def doped_rank(d_in: int, d_out: int, level: float) -> int:
  """Sparse Doped's low-rank width r = floor(s D_in D_out / (D_in + D_out)); 0 at s = 0."""
  _check_dims(d_in, d_out)
  return math.floor(_fraction(level) * d_in * d_out / (d_in + d_out))
