"""The study report: results.csv, table.md (mean ± std by hand) and plots, from run folders."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sift_jax.analysis import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (sift, rule, level): three seeds each; accuracy = base + 0.01 * seed, so std = 0.01 exactly.
SETTINGS = {
  ('dense', 'dense', 0.0): 0.80,
  ('wide', 'rigl', 0.5): 0.83,
  ('wide', 'rigl', 0.75): 0.85,
  ('parallel', 'rigl', 0.5): 0.82,
}
STEPS, BATCH = 40, 8


def write_run(folder, sift, rule, level, seed, accuracy, finished=True, gap=None) -> None:
  """A run folder as the trainer writes it: eval every 10 steps, log every 5; with `gap`, eval
  rows carry spectral scores ending at ramanujan_gap = gap and weighted_gap = -gap."""
  os.makedirs(folder)
  config = {
    'seed': seed,
    'total_steps': STEPS,
    'batch_size': BATCH,
    'model': {'name': 'mlp'},
    'log_every_steps': 5 * (seed + 1),  # ignored, like the data's folder and worker count
    'data': {'name': 'digits', 'dir': f'/data{seed}', 'workers': seed},
    'sift': {'name': sift},
    'sparsity': {'rule': rule, 'level': level},
  }
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config, f)
  flops = 1000.0 * (1 - level) * (4 if sift == 'wide' else 1)
  with open(os.path.join(folder, 'metrics.jsonl'), 'w') as f:
    for step in range(5, STEPS + 1, 5):
      row = {'step': step, 'train/loss': 1.0, 'train/step_time_s': 0.01 * (1 + seed)}
      row['flops/train_per_example'] = flops * (2 if step <= 10 else 1)
      if step % 10 == 0:
        row['eval/accuracy'] = accuracy * step / STEPS
        if gap is not None:
          row['spectral/ramanujan_gap'] = gap * step / STEPS
          row['spectral/weighted_gap'] = -gap * step / STEPS
      f.write(json.dumps(row) + '\n')
      if step == 20:
        # A resume logs steps again after its checkpoint; a SIGKILL can cut a line short.
        f.write(json.dumps({**row, 'eval/accuracy': -1.0}) + '\n{"step": 2')
        f.write('\n' + json.dumps(row) + '\n')
  if finished:
    summary = {
      'eval/accuracy': accuracy,
      'eval/loss': 1 - accuracy,
      'params/total': 1000 * (2 if sift != 'dense' else 1),
      'params/active': 1000 - seed,
      'flops/forward_per_example': flops / 3,
      'flops/train_per_example': flops,
      'sparsity/density': 1 - level,
      'wall_time_s': 10.0,
    }
    with open(os.path.join(folder, 'summary.json'), 'w') as f:
      json.dump(summary, f)


@pytest.fixture(scope='module')
def study(tmp_path_factory):
  root = tmp_path_factory.mktemp('study')
  for (sift, rule, level), base in SETTINGS.items():
    for seed in range(3):
      write_run(
        root / 'runs' / f'{sift}_{rule}_{level}_{seed}', sift, rule, level, seed, base + 0.01 * seed
      )
  write_run(root / 'runs' / 'unfinished', 'wide', 'rigl', 0.5, 7, 0.0, finished=False)
  out = report.write_report(str(root))
  return root, out


def read_csv(path) -> list[dict[str, str]]:
  with open(path) as f:
    return list(csv.DictReader(f))


def test_settings_are_the_varying_keys_minus_seed(study):
  _, out = study
  assert out['setting_keys'] == ['sift.name', 'sparsity.rule', 'sparsity.level']
  assert out['metric'] == 'eval/accuracy'
  assert out['runs'] == 13


def test_results_csv_has_one_row_per_run(study):
  root, _ = study
  rows = read_csv(root / 'results.csv')
  assert len(rows) == 13
  assert list(rows[0])[:8] == [
    'run',
    'sift.name',
    'sparsity.rule',
    'sparsity.level',
    'seed',
    'finished',
    'step',
    'total_steps',
  ]
  for column in report.COLUMNS:
    assert column in rows[0]
  by_run = {r['run']: r for r in rows}
  wide = by_run['wide_rigl_0.75_2']
  assert float(wide['eval/accuracy']) == pytest.approx(0.87)
  assert float(wide['train/step_time_s']) == pytest.approx(0.03)  # median of log windows
  assert by_run['unfinished']['finished'] == 'False'
  assert by_run['unfinished']['step'] == str(STEPS)


def test_table_values_are_mean_and_std_over_seeds(study):
  root, out = study
  table = (root / 'table.md').read_text()
  assert table == out['table']
  lines = table.splitlines()
  assert lines[0] == (
    '| sift | rule | s | n | eval/accuracy | eval/loss | params | active params | '
    'forward FLOPs/ex | train FLOPs/ex | step time (ms) |'
  )
  rows = {tuple(c.strip() for c in line.strip('|').split('|')[:3]): line for line in lines[2:6]}
  # Dense first, then by value (numbers as numbers).
  assert list(rows) == [
    ('dense', 'dense', '0.0'),
    ('parallel', 'rigl', '0.5'),
    ('wide', 'rigl', '0.5'),
    ('wide', 'rigl', '0.75'),
  ]
  wide = [c.strip() for c in rows[('wide', 'rigl', '0.75')].strip('|').split('|')]
  accuracies = [0.85, 0.86, 0.87]
  active = [1000, 999, 998]
  step_ms = [10, 20, 30]
  assert wide[3] == '3'  # the unfinished run is left out
  assert wide[4] == f'{np.mean(accuracies):.4f} ± {np.std(accuracies, ddof=1):.4f}'
  assert wide[4] == '0.8600 ± 0.0100'
  assert wide[5] == '0.1400 ± 0.0100'  # the summaries' eval loss, 1 - accuracy
  assert wide[6] == '2k'  # the same in every seed: no ± 0
  assert wide[7] == f'{np.mean(active):.3g} ± {np.std(active, ddof=1):.3g}'
  assert wide[9] == '1.25k'  # the run's mean: 1000 * 0.25 * 4, twice that over steps 1-10 of 40
  assert wide[10] == f'{np.mean(step_ms):.1f} ± {np.std(step_ms, ddof=1):.1f}'
  assert '1 unfinished run(s) left out.' in table


def test_cumulative_flops_charge_each_window_at_its_logged_rate():
  rows = [
    {'step': 5, 'flops/train_per_example': 2.0},
    {'step': 10, 'flops/train_per_example': 2.0},
    {'step': 30, 'flops/train_per_example': 1.0},
  ]
  np.testing.assert_allclose(report.cumulative_train_flops(rows, 4), [40, 80, 160])


@pytest.mark.parametrize(
  ('evals', 'total', 'change'),
  [
    ({40: 2.0, 80: 1.5, 100: 1.47}, 100, -0.02),  # from the eval at 80% of the run
    ({60: 1.6, 90: 1.5, 100: 1.4}, 100, 1.4 / 1.6 - 1),  # no eval at 80%: the one before it
    ({40: 2.0, 80: 1.5}, 100, float('nan')),  # unfinished: no eval at the last step
    ({90: 1.5, 100: 1.4}, 100, float('nan')),  # nothing in the first four fifths
  ],
)
def test_the_last_fifth_change_is_the_plateau_check(evals, total, change):
  rows = [{'step': 10, 'train/loss': 3.0}] + [
    {'step': step, 'eval/loss': loss} for step, loss in evals.items()
  ]
  np.testing.assert_allclose(report.last_fifth_change(rows, total), change)


def test_curves_keep_the_later_row_of_a_resumed_step(study):
  root, _ = study
  runs = [report.read_run(w) for w in report.find_runs(str(root))]
  curves = report.eval_curves(
    runs, ['sift.name', 'sparsity.rule', 'sparsity.level'], 'eval/accuracy'
  )
  steps, flops, values = curves[('wide', 'rigl', 0.75)]
  np.testing.assert_array_equal(steps, [10, 20, 30, 40])
  np.testing.assert_allclose(values[:, 1], np.array([0.85, 0.86, 0.87]) / 2)  # not the -1.0 row
  np.testing.assert_allclose(flops, np.array([20, 30, 40, 50]) * 1000 * BATCH)


def test_plots_exist_and_are_images(study):
  root, _ = study
  for name in report.PLOTS:
    data = (root / name).read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n', name
    assert len(data) > 20_000, name  # axes, lines and legend drawn, not an empty canvas


def test_text_runs_report_loss_in_nats_per_token_unit():
  runs = [{'config': {'model.name': 'gpt', 'data.name': 'python_stdlib'}, 'summary': None}]
  assert report.primary_metric(runs) == ('eval/loss', 'eval loss (nats/byte)', False)


def test_a_loss_table_gives_the_mean_perplexity_beside_the_loss():
  rows = [
    {'sift.name': 'dense', 'eval/loss': loss, 'eval/perplexity': np.exp(loss), 'finished': True}
    for loss in (1.0, 2.0)
  ]
  for row in rows:
    row.update({c: 1.0 for c in report.COLUMNS if c not in row})
  table = report.markdown_table(rows, ['sift.name'], 'eval/loss')
  head, _, line = table.splitlines()[:3]
  assert head.startswith('| sift | n | eval/loss | eval/perplexity | params |')
  assert line.startswith(f'| dense | 2 | 1.5000 ± 0.7071 | {(np.e + np.e**2) / 2:.3f} ± ')


def test_cli_writes_into_out_and_rejects_an_empty_folder(study, tmp_path):
  root, _ = study
  env = {**os.environ, 'PYTHONPATH': REPO}
  cmd = [sys.executable, '-m', 'sift_jax.analysis.report']
  out = subprocess.run(
    [*cmd, str(root), f'--out={tmp_path}/out'], env=env, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr
  assert '13 runs; wrote results.csv' in out.stdout
  assert (tmp_path / 'out' / 'table.md').read_text() == (root / 'table.md').read_text()
  empty = subprocess.run([*cmd, str(tmp_path / 'out')], env=env, capture_output=True, text=True)
  assert empty.returncode == 2
  assert 'error: no run folders (with a config.json) under' in empty.stderr


def test_spectral_scores_rank_correlate_with_the_final_metric(tmp_path):
  # Across levels the gap rises with accuracy; within a level it falls (seed order reversed).
  for level, base in ((0.5, 0.80), (0.75, 0.90)):
    for seed in range(3):
      accuracy = base + 0.01 * seed
      gap = 10 * level - 0.1 * seed
      write_run(tmp_path / f'{level}_{seed}', 'wide', 'rigl', level, seed, accuracy, gap=gap)
  out = report.write_report(str(tmp_path))
  rows = {line.split('|')[1].strip(): line for line in out['spectral'].splitlines() if '|' in line}
  assert '| all runs | s=0.5 | s=0.75 |' in out['spectral']
  cells = [c.strip() for c in rows['ramanujan_gap'].split('|')[2:5]]
  assert cells[0].startswith('+0.54') and cells[0].endswith('n=6)')  # 1 - 6 * 16 / (6 * 35)
  assert cells[1].startswith('-1.00') and cells[2].startswith('-1.00')
  assert rows['weighted_gap'].split('|')[2].strip().startswith('-0.54')
  assert 'im_ramanujan_gap' not in rows  # never logged: no row
  assert (tmp_path / 'spectral.md').read_text() == out['spectral']
  assert (tmp_path / 'spectral_curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_no_spectral_metrics_no_spectral_outputs(study):
  root, out = study
  assert out['spectral'] is None and not (root / 'spectral.md').exists()


def test_list_valued_settings_group_like_any_other(tmp_path):
  # config.json stores tuples such as model.hidden as JSON lists.
  for hidden in ([64, 64], [128, 128]):
    for seed in range(2):
      folder = tmp_path / f'{hidden[0]}_{seed}'
      write_run(folder, 'dense', 'dense', 0.0, seed, 0.8 + hidden[0] / 1000)
      config = json.loads((folder / 'config.json').read_text())
      config['model']['hidden'] = hidden
      (folder / 'config.json').write_text(json.dumps(config))
  out = report.write_report(str(tmp_path))
  assert out['setting_keys'] == ['model.hidden']
  lines = out['table'].splitlines()
  assert lines[2].startswith('| (64, 64) | 2 | 0.8640 |')  # numbers in order, not as text
  assert lines[3].startswith('| (128, 128) | 2 | 0.9280 |')


@pytest.mark.parametrize(
  ('setting', 'expected'),
  [
    (
      {'sift.name': 'wide', 'sparsity.rule': 'rigl', 'sparsity.level': 0.75},
      'wide / rigl / s=0.75',
    ),
    ({'sift.name': 'dense', 'sparsity.rule': 'dense', 'sparsity.level': 0.0}, 'dense'),
    (
      {'sparsity.rule': 'dense', 'sparsity.level': 0.0, 'sparsity.backward_level': 0.0},
      'dense, backward_level=0.0',
    ),
    ({'sparsity.rule': 'gmp', 'sparsity.level': 0.9}, 'gmp / s=0.9'),
    ({'sift.name': 'dense', 'model.hidden': (1576, 1576)}, 'dense, hidden=(1576, 1576)'),
    ({'sift.name': 'wide', 'sparsity.block_shape': (16, 16)}, 'wide, block_shape=(16, 16)'),
    ({}, 'all runs'),
  ],
)
def test_legend_labels_are_member_rule_level(setting, expected):
  assert report.short_label(setting) == expected


def test_one_colour_per_setting_and_one_marker_per_member_rule_line():
  settings = [
    {'sift.name': sift, 'sparsity.rule': rule, 'sparsity.level': level}
    for sift, rule, level in SETTINGS
  ]
  colors = report.Colors(list(reversed(settings)))
  assert report.Colors(settings)(settings[1]) == colors(settings[1])  # not by order of rows
  assert len({colors(s) for s in settings}) == len(settings)
  wide_05, wide_075 = settings[1], settings[2]
  assert colors.marker(wide_05) == colors.marker(wide_075) != colors.marker(settings[3])


@pytest.mark.parametrize(
  ('values', 'log'),
  [([1e6, 9e6], False), ([1e6, 1.1e7], True), ([2e5, 2e5], False), ([], False)],
)
def test_a_flops_axis_is_logarithmic_past_a_decade(values, log):
  assert report.log_scale(values) is log


def test_points_at_equal_flops_move_apart_and_others_stay():
  x = report.spread([100.0, 100.0, 101.0, 200.0], log=False)
  assert x[3] == 200.0  # alone: where it is
  assert len({x[0], x[1], x[2]}) == 3 and np.mean(x[:3]) == pytest.approx(100.0 + 1 / 3)
  assert max(x[:3]) - min(x[:3]) < 0.05 * 100  # a nudge, not a move
  logged = report.spread([1e3, 1e3, 1e5], log=True)
  assert logged[0] < 1e3 < logged[1] and logged[2] == pytest.approx(1e5)


def test_no_sparsity_plot_for_a_single_level_study(tmp_path):
  for (sift, rule, level), base in SETTINGS.items():
    if level != 0.75:
      for seed in range(2):
        write_run(tmp_path / 'runs' / f'{sift}_{level}_{seed}', sift, rule, level, seed, base)
  out = report.write_report(str(tmp_path / 'runs'), str(tmp_path / 'out'))
  assert 'metric_vs_sparsity.png' not in out['plots']
  assert not (tmp_path / 'out' / 'metric_vs_sparsity.png').exists()
  assert set(out['plots']) == set(report.PLOTS) - {'metric_vs_sparsity.png'}
  for name in out['plots']:
    assert (tmp_path / 'out' / name).stat().st_size > 20_000
