"""Prints the markdown table of experiments/mlp_rules/run.sh from its run folders (the rules run)."""

import json
import os
import sys


def main(out: str) -> None:
  print(
    '| rule | eval accuracy | density at every log step | churn after the first update (min / max) | wall s |'
  )
  print('|---|---|---|---|---|')
  for rule in ('dense', 'static', 'set', 'rigl', 'topkast', 'gse', 'gmp'):
    folder = os.path.join(out, rule)
    if not os.path.isdir(folder):
      continue
    with open(os.path.join(folder, 'summary.json')) as f:
      summary = json.load(f)
    with open(os.path.join(folder, 'metrics.jsonl')) as f:
      rows = [json.loads(line) for line in f]
    with open(os.path.join(folder, 'config.json')) as f:
      first_update = json.load(f)['sparsity']['update_every_steps']
    densities = sorted({round(r['sparsity/density'], 6) for r in rows if 'sparsity/density' in r})
    churns = [r.get('sparsity/churn', 0.0) for r in rows if r['step'] > first_update]
    dynamic = rule not in ('dense', 'static') and churns
    churn = f'{min(churns):.4f} / {max(churns):.4f}' if dynamic else '-'
    print(
      f'| {rule} | {summary["eval/accuracy"]:.4f} | {", ".join(map(str, densities))} | '
      f'{churn} | {summary["wall_time_s"]:.0f} |'
    )


if __name__ == '__main__':
  main(sys.argv[1])
