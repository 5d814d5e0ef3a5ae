#!/usr/bin/env bash
# The FixMatch/LayerMatch CIFAR protocol: 2^20 steps, B=64, mu=7, tau=0.95, WRN-28-2 (CIFAR-10) and
# WRN-28-8 with weight decay 1e-3 (CIFAR-100), EMA 0.999, reported accuracy = median of the last 20
# evaluations (also best and final, in runs/*/summary.json). Extra arguments pass through, e.g.
#   bash run_cifar.sh --algorithm fixmatch        # the baseline
#   bash run_cifar.sh --device cuda --compile
# Expected accuracy: the FixMatch paper (Sohn et al. 2020, Table 2, FixMatch-RA) reports test error
# 13.81 / 5.07 / 4.26 % on CIFAR-10 with 40 / 250 / 4000 labels and 48.85 / 28.29 / 22.60 % on CIFAR-100
# with 400 / 2500 / 10000 labels; LayerMatch (arXiv 2406.14207) reports gains over FixMatch (see its
# tables). We have not reproduced any of these yet (no GPU was available to us); see README "Results".
# Expected time: 2^20 steps / (steps/s from `python bench.py --device cuda`); see README.
set -euo pipefail
cd "$(dirname "$0")"
for seed in 0 1 2; do
  python layermatch.py --dataset cifar10 --labels 40 --seed "$seed" "$@"
  python layermatch.py --dataset cifar10 --labels 250 --seed "$seed" "$@"
  python layermatch.py --dataset cifar10 --labels 4000 --seed "$seed" "$@"
  python layermatch.py --dataset cifar100 --labels 400 --seed "$seed" "$@"
  python layermatch.py --dataset cifar100 --labels 2500 --seed "$seed" "$@"
  python layermatch.py --dataset cifar100 --labels 10000 --seed "$seed" "$@"
done
