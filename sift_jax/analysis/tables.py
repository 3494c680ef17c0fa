"""Settings as a study's tables show them: labels, grouping by setting, mean +- std tables.

Shared by the report (analysis/report.py) and the comparisons (analysis/compare.py). A setting is
a tuple of config values over the study's setting keys; rows are results.csv rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Setting keys first in this order, with their short names in labels.
SHORT_NAMES = {'sift.name': 'sift', 'sparsity.rule': 'rule', 'sparsity.level': 's'}
# What tables and plots call sift.name 'dense' (no Sparse-IFT transformation) on a sparse model,
# so a sparse narrow model is never read as the dense one; configs and results.csv keep 'dense'.
NO_SIFT = 'none'


def sparse(setting: Mapping[str, Any]) -> bool:
  """Whether a setting (or flat config) trains masks: a sparsity level or a sparse rule."""
  return bool(setting.get('sparsity.level')) or setting.get('sparsity.rule', 'dense') != 'dense'


def transformed(setting: Mapping[str, Any]) -> bool:
  """Whether a setting (or flat config) names a Sparse-IFT member."""
  return setting.get('sift.name', 'dense') != 'dense'


def shown(key: str, value: Any, setting: Mapping[str, Any]) -> str:
  """A setting's value as tables and plots show it (NO_SIFT for an untransformed sparse model)."""
  if key == 'sift.name' and value == 'dense' and sparse(setting):
    return NO_SIFT
  return str(value)


def label(setting: dict[str, Any]) -> str:
  if not setting:
    return 'all runs'
  return ', '.join(
    f'{SHORT_NAMES.get(k, k.removeprefix("sparsity."))}={shown(k, v, setting)}'
    for k, v in setting.items()
  )


def setting_order(setting: tuple) -> tuple:
  """Sort key of a setting: dense first, then by each value, numbers as numbers."""

  def number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)

  def value(v: Any) -> tuple:
    if number(v):
      return (0, v, ())
    if isinstance(v, tuple) and all(map(number, v)):  # e.g. model.hidden, block shapes
      return (1, 0, v)
    return (2, 0, (str(v),))

  return ('dense' not in setting, *map(value, setting))


def group(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[tuple, list[dict]]:
  """Finished rows by setting, dense first, then in order of the settings' values."""
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    if row['finished']:
      groups.setdefault(tuple(row[k] for k in keys), []).append(row)
  return dict(sorted(groups.items(), key=lambda item: setting_order(item[0])))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; nan for a single value)."""
  v = np.asarray(values, float)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan


def si(x: float, unit: str = '') -> str:
  """1234567 -> '1.23M'."""
  if not math.isfinite(x):
    return '-'
  for factor, prefix in ((1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if abs(x) >= factor:
      return f'{x / factor:.3g}{prefix}{unit}'
  return f'{x:.3g}{unit}'


def pm(mean: float, std: float, fmt) -> str:
  """'mean ± std'; the mean alone for one run or a value the same in every run."""
  # A spread below float rounding (sums of the same FLOPs in another order) is no spread.
  spread = math.isfinite(std) and std > 1e-9 * abs(mean)
  return f'{fmt(mean)} ± {fmt(std)}' if spread else fmt(mean)


def markdown_table(rows: Sequence[dict[str, Any]], keys: Sequence[str], metric: str) -> str:
  """Per setting: n, metric, params, active params, FLOPs per example, step time (mean ± std)."""
  # A language model's loss comes with its perplexity (the mean of the runs' perplexities), any
  # other metric (accuracy) with the eval loss, which tells apart runs that tie on accuracy.
  perplexity = metric == 'eval/loss' and any(math.isfinite(r['eval/perplexity']) for r in rows)
  loss = metric != 'eval/loss' and any(math.isfinite(r['eval/loss']) for r in rows)
  head = [*(SHORT_NAMES.get(k, k) for k in keys), 'n', metric]
  head += ['eval/perplexity'] * perplexity + ['eval/loss'] * loss
  head += ['params', 'active params', 'forward FLOPs/ex', 'train FLOPs/ex', 'step time (ms)']
  # train FLOPs/ex is the run's mean (run_mean_train_flops), not the last step's rate.
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  columns = (
    (metric, lambda x: f'{x:.4f}'),
    *[('eval/perplexity', lambda x: f'{x:.3f}')] * perplexity,
    *[('eval/loss', lambda x: f'{x:.4f}')] * loss,
    ('params/total', si),
    ('params/active', si),
    ('flops/forward_per_example', si),
    ('flops/train_per_example_run_mean', si),
    ('train/step_time_s', lambda x: f'{1000 * x:.1f}'),
  )
  for setting, members in group(rows, keys).items():
    named = dict(zip(keys, setting, strict=True))
    cells = [shown(k, v, named) for k, v in named.items()] + [str(len(members))]
    cells += [pm(*mean_std([m[c] for m in members]), fmt) for c, fmt in columns]
    lines.append('| ' + ' | '.join(cells) + ' |')
  unfinished = sum(not r['finished'] for r in rows)
  note = f'\n{unfinished} unfinished run(s) left out.\n' if unfinished else ''
  return '\n'.join(lines) + '\n' + note
