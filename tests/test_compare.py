"""Each setting against a baseline: Welch's interval and test against scipy, the verdicts, the
baseline's choice, and comparisons from a results.csv alone."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats

from sift_jax.analysis import compare, report
from tests.test_analysis import write_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ['sift.name', 'sparsity.rule', 'sparsity.level']


def rows_of(values: dict[tuple, list[float]], metric: str = 'eval/accuracy') -> list[dict]:
  """results.csv-like rows: one per value, its setting in KEYS; every report column filled."""
  rows = []
  for setting, metric_values in values.items():
    for seed, v in enumerate(metric_values):
      row = {'run': f'{setting}_{seed}', **dict(zip(KEYS, setting, strict=True)), 'seed': seed}
      row.update({c: 1.0 for c in report.COLUMNS}, finished=True, **{metric: v})
      rows.append(row)
  return rows


@pytest.mark.parametrize(
  ('a', 'b'),
  [
    ([0.85, 0.86, 0.87], [0.80, 0.81, 0.83]),
    ([1.0, 2.0, 3.5], [0.1, 0.3, 0.2, 0.4]),  # unequal sizes and variances
    ([0.5, 0.52], [0.49, 0.55, 0.51, 0.53, 0.47]),
  ],
)
def test_welch_interval_df_and_p_match_scipy(a, b):
  result = compare.welch(a, b)
  test = scipy.stats.ttest_ind(a, b, equal_var=False)
  interval = test.confidence_interval(0.95)
  assert result.difference == pytest.approx(np.mean(a) - np.mean(b))
  assert result.df == pytest.approx(test.df)
  assert result.p == pytest.approx(test.pvalue)
  assert (result.low, result.high) == pytest.approx((interval.low, interval.high))


def test_welch_interval_by_hand():
  # Equal variances 1e-4 and sizes 3: se = sqrt(2e-4 / 3), df = 4.
  result = compare.welch([0.85, 0.86, 0.87], [0.80, 0.81, 0.82])
  half = scipy.stats.t.ppf(0.975, 4) * math.sqrt(2e-4 / 3)
  assert result.df == pytest.approx(4)
  assert (result.low, result.high) == pytest.approx((0.05 - half, 0.05 + half))


@pytest.mark.parametrize(
  ('a', 'b'),
  [([0.9], [0.8, 0.81, 0.82]), ([0.9, 0.91], [0.8]), ([0.5, 0.5], [0.4, 0.4])],
)
def test_no_interval_from_a_single_run_or_no_spread(a, b):
  assert compare.welch(a, b) is None


@pytest.mark.parametrize(
  ('a', 'b', 'higher', 'expected'),
  [
    ([0.85, 0.86, 0.87], [0.80, 0.81, 0.82], True, 'better'),
    ([0.85, 0.86, 0.87], [0.80, 0.81, 0.82], False, 'worse'),  # a loss that went up
    ([0.80, 0.81, 0.82], [0.85, 0.86, 0.87], False, 'better'),
    ([0.80, 0.81, 0.82], [0.85, 0.86, 0.87], True, 'worse'),
    ([0.80, 0.85, 0.90], [0.81, 0.84, 0.89], True, 'not resolved (n=3 vs 3)'),
    ([0.9], [0.80, 0.81, 0.82], True, 'no interval (n=1 vs 3)'),
    ([0.5, 0.5], [0.4, 0.4], True, 'no interval (no spread)'),
  ],
)
def test_verdict_only_where_the_interval_excludes_zero(a, b, higher, expected):
  assert compare.verdict(compare.welch(a, b), len(a), len(b), higher) == expected


def test_metric_direction():
  assert compare.higher_is_better('eval/accuracy')
  assert not compare.higher_is_better('eval/loss')
  assert not compare.higher_is_better('eval/perplexity')
  with pytest.raises(ValueError, match='no direction known'):
    compare.higher_is_better('train/step_time_s')


def test_every_setting_against_dense_by_default():
  rows = rows_of(
    {
      ('dense', 'dense', 0.0): [0.80, 0.81, 0.82],
      ('wide', 'rigl', 0.5): [0.85, 0.86, 0.87],
      ('wide', 'static', 0.5): [0.80, 0.82, 0.83],
      ('wide', 'rigl', 0.75): [0.79],
    }
  )
  compared, notes = compare.comparisons(rows, KEYS, 'eval/accuracy', ['dense'])
  assert notes == []
  by = {tuple(c[k] for k in KEYS): c for c in compared}
  assert list(by) == [('wide', 'rigl', 0.5), ('wide', 'rigl', 0.75), ('wide', 'static', 0.5)]
  rigl = by[('wide', 'rigl', 0.5)]
  assert rigl['baseline'] == 'sift=dense, rule=dense, s=0.0'
  assert (rigl['n'], rigl['baseline_n']) == (3, 3)
  assert rigl['difference'] == pytest.approx(0.05)
  test = scipy.stats.ttest_ind([0.85, 0.86, 0.87], [0.80, 0.81, 0.82], equal_var=False)
  assert rigl['p_value'] == pytest.approx(test.pvalue)
  assert rigl['verdict'] == 'better'
  assert by[('wide', 'static', 0.5)]['verdict'] == 'not resolved (n=3 vs 3)'
  single = by[('wide', 'rigl', 0.75)]
  assert single['verdict'] == 'no interval (n=1 vs 3)'
  assert single['difference'] == pytest.approx(0.79 - 0.81)
  assert math.isnan(single['ci95_low']) and math.isnan(single['p_value'])


def test_a_partial_baseline_pairs_settings_equal_outside_the_spec():
  rows = rows_of(
    {
      ('dense', 'dense', 0.0): [0.80, 0.81, 0.82],
      ('wide', 'static', 0.5): [0.80, 0.81, 0.82],
      ('wide', 'static', 0.75): [0.70, 0.71, 0.72],
      ('wide', 'rigl', 0.5): [0.85, 0.86, 0.87],
      ('wide', 'rigl', 0.75): [0.75, 0.76, 0.77],
      ('doped', 'rigl', 0.5): [0.85, 0.86, 0.87],  # another member: no static of its own
    }
  )
  compared, notes = compare.comparisons(rows, KEYS, 'eval/accuracy', ['rule=static'])
  pairs = {(c['sparsity.rule'], c['sparsity.level']): c for c in compared}
  assert set(pairs) == {('rigl', 0.5), ('rigl', 0.75)}  # each against static at its own level
  assert pairs[('rigl', 0.5)]['baseline'] == 'rule=static'
  assert pairs[('rigl', 0.75)]['difference'] == pytest.approx(0.05)
  assert pairs[('rigl', 0.75)]['baseline_mean'] == pytest.approx(0.71)
  assert notes == [
    '`rule=static`: no baseline for sift=dense, rule=dense, s=0.0; sift=doped, rule=rigl, s=0.5.'
  ]


def test_a_baseline_that_one_setting_matches_is_everyone_s():
  rows = rows_of(
    {
      ('wide', 'static', 0.5): [0.80, 0.81, 0.82],
      ('wide', 'rigl', 0.5): [0.85, 0.86, 0.87],
      ('wide', 'rigl', 0.75): [0.75, 0.76, 0.77],
    }
  )
  compared, notes = compare.comparisons(rows, KEYS, 'eval/accuracy', ['rule=static'])
  assert [c['baseline'] for c in compared] == ['rule=static', 'rule=static, s=0.5']
  assert notes == []


def test_baseline_specs_read_short_names_and_tuples():
  columns = ['run', 'sift.name', 'sparsity.rule', 'sparsity.block_shape', 'model.hidden', 'seed']
  spec = 'sift=wide,block_shape=(1, 1),model.hidden=(1576,1576)'
  assert compare.parse_spec(spec, columns) == {
    'sift.name': 'wide',
    'sparsity.block_shape': (1, 1),
    'model.hidden': (1576, 1576),
  }
  assert compare.parse_spec('dense', columns) == {'sift.name': 'dense', 'sparsity.rule': 'dense'}
  with pytest.raises(ValueError, match='is not key=value'):
    compare.parse_spec('width=3', columns)


def test_a_baseline_that_matches_nothing_is_noted():
  rows = rows_of({('wide', 'rigl', 0.5): [0.8, 0.81], ('wide', 'static', 0.5): [0.8, 0.82]})
  compared, notes = compare.comparisons(rows, KEYS, 'eval/accuracy', ['dense'])
  assert compared == [] and notes == [
    '`dense`: no setting matches it, or it matches every setting.'
  ]


def test_loss_comparisons_and_the_markdown(tmp_path):
  rows = rows_of(
    {('dense', 'dense', 0.0): [1.75, 1.76, 1.74], ('wide', 'rigl', 0.5): [1.70, 1.71, 1.72]},
    metric='eval/loss',
  )
  markdown = compare.write_comparisons(rows, KEYS, 'eval/loss', ['dense'], str(tmp_path))
  assert markdown == (tmp_path / 'comparisons.md').read_text()
  assert 'eval/loss (lower is better' in markdown
  line = markdown.splitlines()[4]
  result = compare.welch([1.70, 1.71, 1.72], [1.75, 1.76, 1.74])
  assert line == (
    f'| wide | rigl | 0.5 | sift=dense, rule=dense, s=0.0 | 3 vs 3 | -0.0400 '
    f'[{result.low:+.4f}, {result.high:+.4f}] | {result.p:.2g} | better |'
  )
  with open(tmp_path / 'comparisons.csv') as f:
    (row,) = csv.DictReader(f)
  assert row['verdict'] == 'better' and float(row['welch_df']) == pytest.approx(result.df)


def test_from_results_csv_alone_equals_the_report(tmp_path):
  """The study report's table.md and comparisons, remade from its results.csv by the CLI."""
  for (sift, rule, level), base in {
    ('dense', 'dense', 0.0): 0.80,
    ('wide', 'rigl', 0.5): 0.83,
    ('wide', 'rigl', 0.75): 0.85,
  }.items():
    for seed in range(3):
      folder = tmp_path / 'runs' / f'{sift}_{rule}_{level}_{seed}'
      write_run(folder, sift, rule, level, seed, base + 0.01 * seed)
  out = report.write_report(str(tmp_path / 'runs'), str(tmp_path / 'report'))
  assert '| wide | rigl | 0.5 | sift=dense, rule=dense, s=0.0 | 3 vs 3 | +0.0300' in out['table']
  env = {**os.environ, 'PYTHONPATH': REPO}
  cmd = [sys.executable, '-m', 'sift_jax.analysis.compare', str(tmp_path / 'report/results.csv')]
  done = subprocess.run(
    [*cmd, f'--out={tmp_path}/csv'], env=env, capture_output=True, text=True, check=False
  )
  assert done.returncode == 0, done.stderr
  for name in ('table.md', 'comparisons.md', 'comparisons.csv'):
    assert (tmp_path / 'csv' / name).read_text() == (tmp_path / 'report' / name).read_text(), name
  bad = subprocess.run([*cmd, '--baseline=width=2'], env=env, capture_output=True, text=True)
  assert bad.returncode == 2 and 'error: --baseline=' in bad.stderr
