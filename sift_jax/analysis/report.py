"""A study's results: `python -m sift_jax.analysis.report experiments/<study> [--out=DIR]`.

Reads every run folder under the study (any folder holding a config.json, docs/design.md's "Outputs
of a run") and the committed records of runs whose folders are gone (sift_jax/records.py: the
report is the same from either) and writes beside it:

- results.csv: one row per run (its setting, seed, final metrics, sizes, FLOPs, step time);
- table.md: per setting, mean +- std over its finished runs (seeds), with n, then comparisons.md;
- comparisons.csv, comparisons.md: each setting against a baseline setting (`--baseline`, default
  the dense one): the difference of means, its 95% Welch interval, Welch's p, and "better" or
  "worse" only where the interval excludes 0 (sift_jax/analysis/compare.py, which also makes
  them from a committed results.csv alone);
- metric_vs_train_flops.png, metric_vs_sparsity.png, curve_vs_step.png,
  curve_vs_train_flops.png: final metric against training FLOPs per example and against the
  sparsity per member/rule, and the eval curves against step and cumulative training FLOPs,
  mean over seeds with a +-1 std band;
- when the runs logged spectral metrics (`analysis.spectral=True`): spectral.md, the Spearman
  rank correlation of each score's final value with the final metric across the finished runs
  (all of them, and within each sparsity level, where the level does not drive both), and
  spectral_curves.png, each score against step per setting.

A run's setting is the set of config keys that differ between the runs, minus the seed: runs
that differ only in their seed are one setting, whatever made them (a sweep or by hand).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.stats
from absl import app, flags

from sift_jax import records
from sift_jax.analysis import compare
from sift_jax.analysis.spectral import SCORES
from sift_jax.analysis.tables import (
  SHORT_NAMES,
  group,
  markdown_table,
  mean_std,
  setting_order,
  shown,
  sparse,
  transformed,
)
from sift_jax.config_lib import flatten
from sift_jax.workdir import BOOKKEEPING_KEYS

# Keys that say where and how a run was bookkept, not what it trained (the workdir's bookkeeping
# keys, the seed and where the data lies): runs differing only in them are one setting.
IGNORED_PREFIXES = ('seed', 'data.dir', *BOOKKEEPING_KEYS)
TOKEN_UNITS = {
  'python_stdlib': 'byte',
  'tiny_shakespeare': 'char',
  'ptb': 'word',
  'ptb_chars': 'char',
}
COLUMNS = (
  'eval/loss',
  'eval/accuracy',
  'eval/perplexity',
  'params/total',
  'params/active',
  'flops/forward_per_example',
  'flops/train_per_example',
  'flops/train_per_example_run_mean',
  'train/step_time_s',
  'sparsity/density',
  'wall_time_s',
  'eval/loss_change_last_fifth',
)
SKIP_DIRS = ('checkpoints', 'checkpoints_incomplete', 'checkpoints_corrupt', 'tensorboard')


def find_runs(root: str) -> list[str]:
  """One folder per run under `root` and under its records (records.record_path): every folder
  holding a config.json, a run's finished folder preferred to its record (records.pick)."""
  roots = [r for r in (root, records.record_path(root)) if r and os.path.isdir(r)]
  if not roots:
    raise FileNotFoundError(f'{root!r} is not a folder and has no records')
  found = []
  for top in roots:
    for folder, dirs, files in os.walk(top):
      dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
      if 'config.json' in files:
        found.append(folder)
  return records.pick(found)


def read_metrics(folder: str) -> list[dict[str, Any]]:
  """A run's metrics rows by step (from metrics.jsonl, or a record's metrics.jsonl.gz); a resumed
  run logs some steps twice (the later row wins), and a run killed mid-write can leave a partial
  line (skipped)."""
  rows: dict[int, dict[str, Any]] = {}
  f = records.open_metrics(folder)
  if f is not None:
    with f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue
        if isinstance(row, dict) and 'step' in row:
          rows[int(row['step'])] = row
  return [rows[s] for s in sorted(rows)]


def frozen(value: Any) -> Any:
  """JSON lists as tuples (recursively), so a setting such as model.hidden can be a dict key."""
  return tuple(map(frozen, value)) if isinstance(value, list) else value


def load_json(path: str) -> Any:
  """A run's JSON file; a truncated or damaged one is a ValueError naming it."""
  with open(path) as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise ValueError(
        f'{path} is not valid JSON ({e}): the run was cut off while writing it or the file is '
        'damaged; rerun the run (it resumes) or move its folder out of the study'
      ) from None


def read_run(workdir: str) -> dict[str, Any]:
  config = {
    k: frozen(v) for k, v in flatten(load_json(os.path.join(workdir, 'config.json'))).items()
  }
  summary_path = os.path.join(workdir, 'summary.json')
  summary = load_json(summary_path) if os.path.exists(summary_path) else None
  return {
    'workdir': workdir,
    'config': config,
    'summary': summary,
    'metrics': read_metrics(workdir),
  }


def setting_keys(runs: Sequence[dict[str, Any]]) -> list[str]:
  """Config keys whose values differ between runs, minus the seed and bookkeeping keys."""
  keys = set().union(*(r['config'] for r in runs)) if runs else set()
  varying = [
    k
    for k in keys
    if not k.startswith(IGNORED_PREFIXES)
    and len({json.dumps(r['config'].get(k)) for r in runs}) > 1
  ]
  if 'sift.name' in varying and any(
    sparse(r['config']) for r in runs if not transformed(r['config'])
  ):
    # Untransformed runs that are sparse: their labels need the rule and level to say so.
    varying += [k for k in ('sparsity.rule', 'sparsity.level') if k in keys and k not in varying]
  first = [k for k in SHORT_NAMES if k in varying]
  return first + sorted(k for k in varying if k not in SHORT_NAMES)


def primary_metric(runs: Sequence[dict[str, Any]]) -> tuple[str, str, bool]:
  """(metric key, axis label with unit, higher is better): accuracy for images, loss for text."""
  text = any('eval/perplexity' in (r['summary'] or {}) for r in runs) or any(
    r['config'].get('model.name') == 'gpt' for r in runs
  )
  if not text:
    return 'eval/accuracy', 'eval accuracy (fraction correct)', True
  units = {TOKEN_UNITS.get(r['config'].get('data.name'), 'token') for r in runs}
  unit = units.pop() if len(units) == 1 else 'token'
  return 'eval/loss', f'eval loss (nats/{unit})', False


def step_time(rows: Sequence[dict[str, Any]]) -> float:
  """Median seconds per step; the first logged window holds compilation and is left out."""
  times = [r['train/step_time_s'] for r in rows[1:] if 'train/step_time_s' in r]
  return float(np.median(times)) if times else math.nan


def last_fifth_change(rows: Sequence[dict[str, Any]], total_steps: int | None) -> float:
  """The studies' plateau check: the relative change of the eval loss over the last fifth of
  training, from the last eval at or before 80% of total_steps to the eval at total_steps (nan
  for an unfinished run or one without an eval in its first four fifths)."""
  evals = [(r['step'], r['eval/loss']) for r in rows if 'eval/loss' in r]
  if not total_steps or not evals or evals[-1][0] != total_steps:
    return math.nan
  before = [loss for step, loss in evals if 0 < step <= 0.8 * total_steps]
  return float(evals[-1][1] / before[-1] - 1) if before else math.nan


def cumulative_train_flops(rows: Sequence[dict[str, Any]], batch_size: int) -> np.ndarray:
  """Training FLOPs spent up to each logged step: each window at the rate logged at its end."""
  steps = np.array([r['step'] for r in rows], float)
  rate = np.array([r.get('flops/train_per_example', math.nan) for r in rows], float)
  return np.cumsum(rate * np.diff(steps, prepend=0.0) * batch_size)


def run_mean_train_flops(rows: Sequence[dict[str, Any]]) -> float:
  """Training FLOPs per example averaged over the steps run: what a rule whose cost changes
  during training (RigL's dense gradients while it updates, GMP's shrinking density) spent, where
  summary.json holds the rate at the last step."""
  if not rows or not rows[-1]['step']:
    return math.nan
  return float(cumulative_train_flops(rows, 1)[-1] / rows[-1]['step'])


def results_rows(runs: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
  """One flat row per run for results.csv."""
  out = []
  for r in runs:
    summary = r['summary'] or {}
    last = r['metrics'][-1] if r['metrics'] else {}
    row = {
      'run': os.path.basename(r['workdir']),
      **{k: r['config'].get(k) for k in [*keys, *(k for k in SHORT_NAMES if k not in keys)]},
      'seed': r['config'].get('seed'),
      'finished': r['summary'] is not None,
      'step': last.get('step', 0),
      'total_steps': r['config'].get('total_steps'),
    }
    computed = {  # from the whole metrics log, not the last step's summary
      'train/step_time_s': step_time(r['metrics']),
      'flops/train_per_example_run_mean': run_mean_train_flops(r['metrics']),
      'eval/loss_change_last_fifth': last_fifth_change(r['metrics'], row['total_steps']),
    }
    row.update({c: computed[c] if c in computed else summary.get(c, math.nan) for c in COLUMNS})
    out.append(row)
  return out


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


# --------------------------------------------------------------------------- plots


def _figure(title: str):
  """A pyplot-free Figure: writing a report never changes the caller's matplotlib backend
  (a notebook keeps showing its own plots)."""
  from matplotlib.figure import Figure

  fig = Figure(figsize=(9, 5.4), dpi=120, layout='constrained')
  ax = fig.subplots()
  ax.set_title(title, fontsize=10)
  ax.grid(True, alpha=0.3)
  return fig, ax


def _save(fig, ax, path: str) -> None:
  # Below the axes, so long setting labels never squeeze the plot.
  handles, labels = ax.get_legend_handles_labels()
  if handles:
    ncol = 1 if max(map(len, labels)) > 60 else 2
    fig.legend(handles, labels, fontsize=8, loc='outside lower center', ncol=ncol)
  fig.savefig(path)


def log_scale(values: Sequence[float]) -> bool:
  """Whether FLOPs on an axis span more than a decade (a linear axis squeezes the small ones)."""
  v = [x for x in values if x > 0 and math.isfinite(x)]
  return bool(v) and max(v) / min(v) > 10


def _flops_axis(ax, values: Sequence[float]) -> None:
  """FLOP ticks with SI prefixes (200k, 2M), on a log scale where `values` span over a decade."""
  from matplotlib.ticker import EngFormatter, MaxNLocator

  if log_scale(values):
    ax.set_xscale('log')
  else:
    ax.xaxis.set_major_locator(MaxNLocator(5))
  ax.xaxis.set_major_formatter(EngFormatter(sep=''))


def short_label(setting: dict[str, Any]) -> str:
  """A legend label: member / rule / s (just 'dense' for the dense model), then any other
  setting key by its last name ('hidden=(1576, 1576)', 'block_shape=(16, 16)')."""
  member = setting.get('sift.name')
  rule = setting.get('sparsity.rule')
  level = setting.get('sparsity.level')
  dense = (member == 'dense' or (member is None and rule == 'dense')) and not sparse(setting)
  if dense:
    head = ['dense']
  else:
    head = [f'sift={shown("sift.name", member, setting)}'] * (member == 'dense')
    head += [str(member)] * (member not in (None, 'dense'))
  if rule is not None and rule != 'dense':
    head.append(str(rule))
  if level is not None and not (dense and not level):
    head.append(f's={level}')
  rest = [f'{k.rsplit(".", 1)[-1]}={v}' for k, v in setting.items() if k not in SHORT_NAMES]
  return ', '.join([' / '.join(head), *rest] if head else rest) or 'all runs'


def line_key(setting: dict[str, Any]) -> dict[str, Any]:
  """A setting without its sparsity level: the member/rule line it lies on over the levels."""
  return {k: v for k, v in setting.items() if k != 'sparsity.level'}


MARKERS = ('o', 's', '^', 'D', 'v', 'P', 'X', '*', '<', '>', 'h', 'p')


class Colors:
  """One colour per setting and one marker per member/rule line (the setting without its level),
  the same in every plot of a report; settings are named by short_label."""

  def __init__(self, settings: Sequence[dict[str, Any]]):
    import matplotlib

    names = sorted({short_label(s) for s in settings})
    lines = sorted({short_label(line_key(s)) for s in settings})
    cmap = matplotlib.colormaps['tab10' if len(names) <= 10 else 'tab20']
    self._colors = {n: cmap(i % cmap.N) for i, n in enumerate(names)}
    self._markers = {n: MARKERS[i % len(MARKERS)] for i, n in enumerate(lines)}

  def __call__(self, setting: dict[str, Any]):
    return self._colors[short_label(setting)]

  def marker(self, setting: dict[str, Any]) -> str:
    return self._markers[short_label(line_key(setting))]


def spread(xs: Sequence[float], log: bool, step: float = 0.015) -> list[float]:
  """xs with points that lie within 2% of each other moved apart by `step` of the axis' span
  (in decades on a log axis) around their place, so equal-FLOPs settings do not hide each other."""
  x = np.asarray(xs, float)
  pos = np.log10(x) if log else x
  span = (np.ptp(pos) if len(pos) > 1 else 0.0) or (1.0 if log else abs(pos[0]) or 1.0)
  out = pos.copy()
  order = np.argsort(pos, kind='stable')
  clusters: list[list[int]] = []
  for i in order:
    if clusters and abs(x[i] - x[clusters[-1][0]]) <= 0.02 * abs(x[clusters[-1][0]]):
      clusters[-1].append(i)
    else:
      clusters.append([i])
  for members in clusters:
    for j, i in enumerate(members):
      out[i] = pos[i] + step * span * (j - (len(members) - 1) / 2)
  return list(10**out if log else out)


def plot_metric_vs_flops(rows, keys, metric, ylabel, path, colors: Colors) -> None:
  fig, ax = _figure(f'final {metric} vs training FLOPs per example (mean ± std over seeds)')
  points = []
  for setting, members in group(rows, keys).items():
    s = dict(zip(keys, setting, strict=True))
    x, xe = mean_std([m['flops/train_per_example_run_mean'] for m in members])
    y, ye = mean_std([m[metric] for m in members])
    points.append((s, x, xe, y, ye))
  xs = [p[1] for p in points]
  shifted = spread(xs, log_scale(xs)) if points else []
  for (s, _, xe, y, ye), x in zip(points, shifted, strict=True):
    ax.errorbar(
      x,
      y,
      yerr=np.nan_to_num(ye),
      xerr=np.nan_to_num(xe),
      fmt=colors.marker(s),
      ms=7,
      capsize=3,
      color=colors(s),
      label=short_label(s),
    )
  _flops_axis(ax, xs)
  ax.set_xlabel(
    'training FLOPs per example, mean over the run (FLOPs; points within 2% moved apart slightly)'
  )
  ax.set_ylabel(ylabel)
  _save(fig, ax, path)


def several_levels(rows, keys) -> bool:
  """Whether some member/rule line has finished settings at two or more sparsity levels: only
  then does a plot over the sparsity level show more than the FLOPs plot does."""
  if 'sparsity.level' not in keys:
    return False
  levels: dict[str, set] = {}
  for setting in group(rows, keys):
    s = dict(zip(keys, setting, strict=True))
    levels.setdefault(short_label(line_key(s)), set()).add(s['sparsity.level'])
  return any(len(v) > 1 for v in levels.values())


def plot_metric_vs_sparsity(rows, keys, metric, ylabel, path, colors: Colors) -> None:
  """One line per member/rule (and any other setting key) over the sparsity level, in its
  marker, each point in its setting's colour; settings at s = 0 alone on their line (dense) are
  drawn as a dashed reference across the plot."""
  fig, ax = _figure(f'final {metric} vs sparsity (mean ± std over seeds)')
  lines: dict[str, list[tuple[float, float, float, dict]]] = {}
  for setting, members in group(rows, keys).items():
    s = dict(zip(keys, setting, strict=True))
    level = float(s['sparsity.level'] or 0.0)
    lines.setdefault(short_label(line_key(s)), []).append(
      (level, *mean_std([m[metric] for m in members]), s)
    )
  for i, (name, pts) in enumerate(lines.items()):
    pts.sort(key=lambda p: p[0])
    x, y, ye = (np.array(v, float) for v in list(zip(*pts, strict=True))[:3])
    x += 0.006 * (i - (len(lines) - 1) / 2)  # lines apart, so points at one level stay visible
    first = pts[0][3]
    if len(pts) == 1 and pts[0][0] == 0:
      ax.axhline(y[0], ls='--', lw=1.2, color=colors(first), label=f'{name} (s=0)')
      if np.isfinite(ye[0]):
        ax.axhspan(y[0] - ye[0], y[0] + ye[0], color=colors(first), alpha=0.12)
      continue
    # The line in grey with its marker (the legend's entry), each point over it in its colour.
    ax.plot(x, y, color='0.5', lw=1, marker=colors.marker(first), ms=7, label=name, zorder=1)
    for xi, yi, ei, s in zip(x, y, ye, (p[3] for p in pts), strict=True):
      ax.errorbar(
        xi, yi, yerr=np.nan_to_num(ei), fmt=colors.marker(s), ms=7, capsize=3, color=colors(s)
      )
  levels = [p[0] for pts in lines.values() for p in pts]
  ax.set_xlim(-0.02, max([*levels, 0.5]) + 0.05)
  ax.set_xlabel(
    'sparsity s (fraction of sparse weights that are zero); colours as in the other plots'
  )
  ax.set_ylabel(ylabel)
  _save(fig, ax, path)


def eval_curves(runs, keys, metric) -> dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Per setting: the eval steps all its finished runs logged, the mean cumulative training
  FLOPs at them, and the metric per run (runs, steps)."""
  by_setting: dict[tuple, list[dict]] = {}
  for r in runs:
    if r['summary'] is not None:
      by_setting.setdefault(tuple(r['config'].get(k) for k in keys), []).append(r)
  out = {}
  for setting, members in sorted(by_setting.items(), key=lambda kv: setting_order(kv[0])):
    curves = []
    for r in members:
      rows = r['metrics']
      cum = cumulative_train_flops(rows, r['config'].get('batch_size', 1))
      curves.append(
        {row['step']: (c, row[metric]) for row, c in zip(rows, cum, strict=True) if metric in row}
      )
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    flops = np.array([[c[s][0] for s in steps] for c in curves])  # (runs, steps)
    values = np.array([[c[s][1] for s in steps] for c in curves])  # (runs, steps)
    out[setting] = (np.array(steps), flops.mean(0), values)
  return out


def plot_band(ax, x: np.ndarray, values: np.ndarray, name: str, color, marker: str = '.') -> None:
  """The mean over runs of `values` (runs, steps) against x, with a ±1 std band over seeds."""
  mean = values.mean(0)  # (steps,)
  ax.plot(x, mean, marker=marker, ms=4, color=color, label=name)
  if len(values) > 1:
    std = values.std(0, ddof=1)  # (steps,)
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, lw=0)


def plot_curves(runs, keys, metric, ylabel, path, against: str, colors: Colors) -> None:
  what = 'step' if against == 'step' else 'cumulative training FLOPs'
  fig, ax = _figure(f'{metric} during training vs {what} (mean ± std over seeds)')
  totals = []  # each setting's FLOPs at its last eval: the runs' spread decides the axis
  for setting, (steps, flops, values) in eval_curves(runs, keys, metric).items():
    if not len(steps):
      continue
    s = dict(zip(keys, setting, strict=True))
    x = steps if against == 'step' else flops
    plot_band(ax, x, values, short_label(s), colors(s), colors.marker(s))
    totals.append(flops[-1])
  if against == 'step':
    ax.set_xlabel('training step')
  else:
    _flops_axis(ax, totals)
    ax.set_xlabel('cumulative training FLOPs, all examples so far (FLOPs)')
  ax.set_ylabel(ylabel)
  _save(fig, ax, path)


def final_values(run: dict[str, Any], key: str) -> float:
  """The last logged value of `key` in a run's metrics (nan if never logged)."""
  values = [row[key] for row in run['metrics'] if key in row]
  return float(values[-1]) if values else math.nan


def spectral_table(runs, keys, metric) -> str | None:
  """Markdown: per spectral score, Spearman's rho (and p) of its final value with the final
  metric over the finished runs, overall and per sparsity level; None without spectral metrics."""
  done = [r for r in runs if r['summary'] is not None]
  scores = [k for k in SCORES if any(math.isfinite(final_values(r, f'spectral/{k}')) for r in done)]
  if not scores:
    return None
  levels = sorted(
    {r['config'].get('sparsity.level') for r in done}, key=lambda v: setting_order((v,))
  )
  pools = [('all runs', done)]
  if 'sparsity.level' in keys:
    pools += [
      (f's={v}', [r for r in done if r['config'].get('sparsity.level') == v]) for v in levels
    ]
  lines = [
    f'Spearman rank correlation of each spectral score (final value, mean over the sparse '
    f'layers) with the final {metric}, over finished runs: rho (p-value, n).',
    '',
    '| score | ' + ' | '.join(name for name, _ in pools) + ' |',
    '|---' * (len(pools) + 1) + '|',
  ]
  for k in scores:
    cells = []
    for _, pool in pools:
      x = np.array([final_values(r, f'spectral/{k}') for r in pool])  # (runs,)
      y = np.array([r['summary'].get(metric, math.nan) for r in pool])  # (runs,)
      ok = np.isfinite(x) & np.isfinite(y)
      if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        cells.append(f'- (n={int(ok.sum())})')
        continue
      rho, p = scipy.stats.spearmanr(x[ok], y[ok])
      cells.append(f'{rho:+.2f} (p={p:.2g}, n={int(ok.sum())})')
    lines.append(f'| {k} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def plot_spectral_curves(runs, keys, path, colors: Colors) -> None:
  """One panel per spectral score: its value against step per setting, mean ± std over seeds."""
  from matplotlib.figure import Figure

  fig = Figure(figsize=(12, 8), dpi=120, layout='constrained')
  axes = fig.subplots(2, 2)
  fig.suptitle('spectral scores of the sparse layers during training (mean ± std over seeds)')
  for ax, k in zip(axes.flat, SCORES, strict=True):
    for setting, (steps, _, values) in eval_curves(runs, keys, f'spectral/{k}').items():
      if not len(steps):
        continue
      s = dict(zip(keys, setting, strict=True))
      plot_band(ax, steps, values, short_label(s), colors(s), colors.marker(s))
    ax.set_title(k)
    ax.set_xlabel('training step')
    ax.set_ylabel(f'{k} (mean over sparse layers)')
    ax.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=7)
  fig.savefig(path)


PLOTS = (
  'metric_vs_train_flops.png',
  'metric_vs_sparsity.png',
  'curve_vs_step.png',
  'curve_vs_train_flops.png',
)


def write_report(
  study: str,
  out: str | None = None,
  metric: str | None = None,
  baselines: Sequence[str] = ('dense',),
) -> dict[str, Any]:
  """Writes results.csv, table.md, comparisons.csv/.md (each setting against `baselines`, see
  compare.py) and the plots of `study` into `out` (default: the study)."""

  out = out or study
  runs = [read_run(w) for w in find_runs(study)]
  if not runs:
    raise FileNotFoundError(f'no run folders (with a config.json) under {study!r}')
  keys = setting_keys(runs)
  key, ylabel, _ = primary_metric(runs)
  if metric:
    key, ylabel = metric, metric
  rows = results_rows(runs, keys)
  if metric and not any(metric in (r['summary'] or {}) for r in runs):
    raise ValueError(f'--metric={metric!r} is in no summary.json; known: {", ".join(COLUMNS[:3])}')
  os.makedirs(out, exist_ok=True)
  write_csv(os.path.join(out, 'results.csv'), rows)
  table = markdown_table(rows, keys, key)
  table += '\n' + compare.write_comparisons(rows, keys, key, baselines, out)
  with open(os.path.join(out, 'table.md'), 'w') as f:
    f.write(table)
  colors = Colors([{k: r[k] for k in keys} for r in rows])
  plots = [p for p in PLOTS if p != 'metric_vs_sparsity.png' or several_levels(rows, keys)]
  plot_metric_vs_flops(rows, keys, key, ylabel, os.path.join(out, PLOTS[0]), colors)
  sparsity_plot = os.path.join(out, PLOTS[1])
  if PLOTS[1] in plots:
    plot_metric_vs_sparsity(rows, keys, key, ylabel, sparsity_plot, colors)
  elif os.path.exists(sparsity_plot):
    os.remove(sparsity_plot)  # an earlier report's, from before the study had one level
  plot_curves(runs, keys, key, ylabel, os.path.join(out, PLOTS[2]), 'step', colors)
  plot_curves(runs, keys, key, ylabel, os.path.join(out, PLOTS[3]), 'flops', colors)
  spectral = spectral_table(runs, keys, key)
  if spectral:
    with open(os.path.join(out, 'spectral.md'), 'w') as f:
      f.write(spectral)
    plot_spectral_curves(runs, keys, os.path.join(out, 'spectral_curves.png'), colors)
  return {
    'runs': len(runs),
    'setting_keys': keys,
    'metric': key,
    'table': table,
    'spectral': spectral,
    'plots': plots,
  }


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError('usage: python -m sift_jax.analysis.report experiments/<study> [--out=]')
  try:
    report = write_report(argv[1], _OUT.value, _METRIC.value, _BASELINE.value)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)
  print(report['table'])
  if report['spectral']:
    print(report['spectral'])
  print(
    f'{report["runs"]} runs; wrote results.csv, table.md, comparisons.csv, comparisons.md, '
    f'{", ".join(report["plots"])} to '
    f'{_OUT.value or argv[1]}'
  )


if __name__ == '__main__':
  _OUT = flags.DEFINE_string('out', None, 'Folder for the outputs (default: the study folder).')
  _METRIC = flags.DEFINE_string('metric', None, 'Metric to report (default: accuracy or loss).')
  _BASELINE = flags.DEFINE_multi_string(
    'baseline',
    ['dense'],
    'Baseline spec(s) for comparisons.csv: dense or key=value,... (compare.py).',
  )
  app.run(main)
