#!/usr/bin/env bash
# Issue 3's acceptance run: every rule at 90% sparsity vs dense, MLP on Fashion-MNIST (local).
# Usage: SIFT_DATA_DIR=../shared/datasets bash experiments/mlp_rules/run.sh [OUT_DIR [FLAGS...]]
# FLAGS go to every run, e.g. `runs/quick --config.total_steps=300`; RULES="static rigl" picks
# the sparse rules (default: all six; dense always runs).
set -euo pipefail
out=${1:-runs/mlp_rules}
shift || true
here=$(dirname "$0")
python -m sift_jax.main --config=configs/mlp_fashion_mnist.py:local --workdir="$out/dense" "$@"
for rule in ${RULES:-static set rigl topkast gse gmp}; do
  python -m sift_jax.main --config="configs/mlp_fashion_mnist.py:local,rule=$rule,sparsity=0.9" \
    --workdir="$out/$rule" "$@"
done
python "$here/table.py" "$out"
