#!/usr/bin/env bash
# Issue 3's acceptance run: every rule at 90% sparsity vs dense, MLP on Fashion-MNIST (local).
# Usage: SIFT_DATA_DIR=../shared/datasets bash experiments/mlp_rules/run.sh [OUT_DIR]
set -euo pipefail
out=${1:-runs/mlp_rules}
python -m sift_jax.main --config=configs/mlp_fashion_mnist.py:local --workdir="$out/dense"
for rule in static set rigl topkast gse gmp; do
  python -m sift_jax.main --config="configs/mlp_fashion_mnist.py:local,rule=$rule,sparsity=0.9" \
    --workdir="$out/$rule"
done
python experiments/mlp_rules/table.py "$out"
