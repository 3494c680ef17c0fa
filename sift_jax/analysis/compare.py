"""Each setting of a study against a baseline setting, with Welch's statistics.

For the study's primary metric (accuracy: higher is better; loss: lower is better), per setting:
the difference of the means over seeds (setting - baseline), its 95% confidence interval (Welch:
each side's own variance, Welch-Satterthwaite degrees of freedom, Student's t quantile) and
Welch's t-test p-value. The verdict says "better" or "worse" only where the interval excludes 0,
"not resolved (n=3 vs 3)" otherwise, and "no interval" where a side has one run (or no spread).

A baseline is picked by a spec (`--baseline`, repeatable; each one adds its comparisons):

- `dense` (the default): sift.name=dense, sparsity.rule=dense, sparsity.level=0, on the keys
  the results have;
- `key=value,...`: keys as table.md's header or results.csv's columns write them (`rule`, `s`,
  `sift`, `sparsity.block_shape`, `model.hidden`), values as results.csv writes them (`0.9`,
  `(1, 1)`), e.g. `--baseline=rule=static` or `--baseline='model.hidden=(1576, 1576)'`.

The settings that match a spec are its baselines, and are not compared themselves. Where one
setting matches, every other setting is compared with it. Where several do, each other setting
is compared with the one that agrees with it on every setting key outside the spec (the same
setting with only the spec's keys changed): `rule=static` compares each rule with static at the
same sparsity level, and a setting without such a baseline is listed in comparisons.md.

`python -m sift_jax.analysis.report` writes comparisons.csv and comparisons.md, and appends them
to table.md. From a committed results.csv alone (the run folders gone), the same three files:

  python -m sift_jax.analysis.compare experiments/<study>/<sub>/results.csv [--baseline=...]
    [--metric=eval/loss] [--out=DIR]

(no plots: they need the eval curves, which results.csv does not hold).
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.stats
from absl import app, flags

from sift_jax.analysis.tables import SHORT_NAMES, group, label, markdown_table

CONFIDENCE = 0.95
DENSE = 'dense'
DENSE_SETTING = {'sift.name': 'dense', 'sparsity.rule': 'dense', 'sparsity.level': 0.0}
FIELDS = (
  'n',
  'mean',
  'baseline_n',
  'baseline_mean',
  'difference',
  'ci95_low',
  'ci95_high',
  'welch_df',
  'p_value',
  'verdict',
)


@dataclasses.dataclass(frozen=True)
class Welch:
  """Mean of a minus mean of b, its confidence interval, the Welch-Satterthwaite degrees of
  freedom and Welch's two-sided t-test p-value."""

  difference: float
  low: float
  high: float
  df: float
  p: float


def welch(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Welch | None:
  """Welch's interval and test for mean(a) - mean(b); None where a side has under two values or
  neither side has any spread (no variance to build an interval from)."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  if len(a) < 2 or len(b) < 2:
    return None
  va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)  # squared standard errors
  se = math.sqrt(va + vb)
  if se == 0:
    return None
  df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
  half = scipy.stats.t.ppf(0.5 + confidence / 2, df) * se
  difference = float(a.mean() - b.mean())
  p = float(scipy.stats.ttest_ind(a, b, equal_var=False).pvalue)
  return Welch(difference, difference - half, difference + half, float(df), p)


def higher_is_better(metric: str) -> bool:
  if 'accuracy' in metric:
    return True
  if 'loss' in metric or 'perplexity' in metric:
    return False
  raise ValueError(f'no direction known for {metric!r}: accuracy (higher) or loss (lower)')


def verdict(result: Welch | None, n: int, baseline_n: int, higher: bool) -> str:
  if result is None:
    why = f'n={n} vs {baseline_n}' if min(n, baseline_n) < 2 else 'no spread'
    return f'no interval ({why})'
  if result.low <= 0 <= result.high:
    return f'not resolved (n={n} vs {baseline_n})'
  return 'better' if (result.difference > 0) == higher else 'worse'


def parse_value(cell: str) -> Any:
  """A results.csv cell or spec value as report.py wrote it: numbers, booleans, tuples such as
  '(1, 1)', nan; anything else is text, '' is None."""
  if cell == '':
    return None
  try:
    return ast.literal_eval(cell)
  except (ValueError, SyntaxError):
    pass
  try:
    return float(cell)  # nan and inf, which literal_eval does not read
  except ValueError:
    return cell


def parse_spec(spec: str, columns: Sequence[str]) -> dict[str, Any]:
  """`dense` or `key=value,...` as {results column: value}; commas inside a value such as
  '(1, 1)' stay in it (a new pair starts only at `,key=`)."""
  if spec == DENSE:
    return {k: v for k, v in DENSE_SETTING.items() if k in columns}
  aliases = {short: key for key, short in SHORT_NAMES.items()}
  out = {}
  for pair in re.split(r',(?=\s*[\w.]+=)', spec):
    name, sep, value = pair.partition('=')
    name = name.strip()
    key = next(
      (k for k in (name, aliases.get(name), f'sparsity.{name}') if k in columns),
      None,
    )
    if not sep or key is None:
      raise ValueError(f'--baseline={spec!r}: {pair!r} is not key=value with a key among {columns}')
    out[key] = parse_value(value.strip())
  return out


def match_baselines(
  settings: Sequence[tuple], keys: Sequence[str], first_rows: dict[tuple, dict], spec: dict
) -> tuple[dict[tuple, tuple], list[tuple]]:
  """({setting: its baseline}, settings without one) for one parsed spec; first_rows holds a row
  of each setting (for spec keys that are the same in every run, so not setting keys)."""
  bases = [s for s in settings if all(first_rows[s].get(k) == v for k, v in spec.items())]
  others = [i for i, k in enumerate(keys) if k not in spec]
  chosen, missing = {}, []
  for s in settings:
    if s in bases or not bases:
      continue
    # Two bases cannot agree on every key outside the spec (they would be one setting).
    same = [b for b in bases if len(bases) == 1 or all(s[i] == b[i] for i in others)]
    if same:
      chosen[s] = same[0]
    else:
      missing.append(s)
  return chosen, missing


def comparisons(
  rows: Sequence[dict[str, Any]], keys: Sequence[str], metric: str, specs: Sequence[str]
) -> tuple[list[dict[str, Any]], list[str]]:
  """(one comparison row per setting and spec, notes on settings left without a baseline)."""
  groups = group(rows, keys)
  columns = list(rows[0]) if rows else []
  higher = higher_is_better(metric)
  first_rows = {s: members[0] for s, members in groups.items()}
  out, notes = [], []
  for spec in specs:
    chosen, missing = match_baselines(list(groups), keys, first_rows, parse_spec(spec, columns))
    if not chosen and not missing:
      notes.append(f'`{spec}`: no setting matches it, or it matches every setting.')
    if missing:
      names = '; '.join(label(dict(zip(keys, s, strict=True))) for s in missing)
      notes.append(f'`{spec}`: no baseline for {names}.')
    for s, b in chosen.items():
      a_values = finite([m[metric] for m in groups[s]])
      b_values = finite([m[metric] for m in groups[b]])
      result = welch(a_values, b_values)
      differ = {k: bv for k, sv, bv in zip(keys, s, b, strict=True) if sv != bv}
      stats = [
        len(a_values),
        np.mean(a_values),
        len(b_values),
        np.mean(b_values),
        *(
          dataclasses.astuple(result)
          if result
          else (np.mean(a_values) - np.mean(b_values), *[math.nan] * 4)
        ),
        verdict(result, len(a_values), len(b_values), higher),
      ]
      out.append(
        {
          **dict(zip(keys, s, strict=True)),
          'baseline': label(differ),
          'metric': metric,
          **dict(zip(FIELDS, stats, strict=True)),
        }
      )
  return out, notes


def finite(values: Sequence[float]) -> list[float]:
  return [float(v) for v in values if math.isfinite(float(v))]


def comparisons_markdown(
  compared: Sequence[dict[str, Any]], notes: Sequence[str], keys: Sequence[str], metric: str
) -> str:
  direction = 'higher' if higher_is_better(metric) else 'lower'
  lines = [
    f'Each setting against its baseline: the difference of the mean final {metric} ({direction} '
    f"is better; setting - baseline), its {CONFIDENCE:.0%} Welch confidence interval and Welch's "
    f't-test p-value over seeds; "better" or "worse" only where the interval excludes 0.',
    '',
  ]
  head = [*(SHORT_NAMES.get(k, k) for k in keys), 'against', 'n', 'difference [95% CI]', 'p']
  lines += ['| ' + ' | '.join([*head, 'verdict']) + ' |', '|' + '---|' * (len(head) + 1)]
  for c in compared:
    interval = (
      f' [{c["ci95_low"]:+.4f}, {c["ci95_high"]:+.4f}]' if math.isfinite(c['p_value']) else ''
    )
    cells = [str(c[k]) for k in keys] + [c['baseline'], f'{c["n"]} vs {c["baseline_n"]}']
    cells += [f'{c["difference"]:+.4f}{interval}', number(c['p_value'], '.2g'), c['verdict']]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines + ['', *notes]).rstrip() + '\n'


def number(x: float, fmt: str) -> str:
  return format(x, fmt) if math.isfinite(x) else '-'


def write_comparisons(
  rows: Sequence[dict[str, Any]],
  keys: Sequence[str],
  metric: str,
  specs: Sequence[str],
  out: str,
) -> str:
  """Writes comparisons.csv and comparisons.md into `out`; returns the markdown."""
  compared, notes = comparisons(rows, keys, metric, specs)
  with open(os.path.join(out, 'comparisons.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=[*keys, 'baseline', 'metric', *FIELDS])
    writer.writeheader()
    writer.writerows(compared)
  markdown = comparisons_markdown(compared, notes, keys, metric)
  with open(os.path.join(out, 'comparisons.md'), 'w') as f:
    f.write(markdown)
  return markdown


def read_results(path: str) -> tuple[list[dict[str, Any]], list[str]]:
  """(results.csv's rows with their values parsed, the setting keys): the columns between `run`
  and `seed` (report.py writes the setting keys there) whose values differ between rows."""
  with open(path, newline='') as f:
    rows = [{k: parse_value(v) for k, v in row.items()} for row in csv.DictReader(f)]
  if not rows or 'run' not in rows[0] or 'seed' not in rows[0]:
    raise ValueError(f'{path!r} is not a report results.csv (no rows, or no run and seed columns)')
  columns = list(rows[0])
  candidates = columns[columns.index('run') + 1 : columns.index('seed')]
  keys = [k for k in candidates if len({repr(r[k]) for r in rows}) > 1]
  return rows, keys


def text_results(rows: Sequence[dict[str, Any]]) -> bool:
  """A language model's rows (a perplexity logged), whose metric is the loss; as
  report.primary_metric decides from the runs' summaries."""
  return any(math.isfinite(r.get('eval/perplexity') or math.nan) for r in rows)


def write_from_results(
  path: str, out: str | None, specs: Sequence[str], metric: str | None = None
) -> str:
  """table.md, comparisons.csv and comparisons.md from a results.csv; returns table.md."""
  rows, keys = read_results(path)
  metric = metric or ('eval/loss' if text_results(rows) else 'eval/accuracy')
  out = out or os.path.dirname(path)
  os.makedirs(out, exist_ok=True)
  table = (
    markdown_table(rows, keys, metric) + '\n' + write_comparisons(rows, keys, metric, specs, out)
  )
  with open(os.path.join(out, 'table.md'), 'w') as f:
    f.write(table)
  return table


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError('usage: python -m sift_jax.analysis.compare <results.csv> [--baseline=]')
  try:
    table = write_from_results(argv[1], _OUT.value, _BASELINE.value, _METRIC.value)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)
  print(table)


if __name__ == '__main__':
  _OUT = flags.DEFINE_string('out', None, "Folder for the outputs (default: the csv's folder).")
  _BASELINE = flags.DEFINE_multi_string('baseline', [DENSE], 'Baseline spec(s), see the docstring.')
  _METRIC = flags.DEFINE_string('metric', None, 'Metric (default: accuracy, or loss for text).')
  app.run(main)
