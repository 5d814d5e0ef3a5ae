#!/usr/bin/env bash
# The FixMatch/LayerMatch CIFAR protocol: 2^20 steps, B=64, mu=7, tau=0.95, WRN-28-2 (CIFAR-10) and
# WRN-28-8 with weight decay 1e-3 (CIFAR-100), EMA 0.999, reported accuracy = median of the last 20
# evaluations (also best and final, in runs/*/summary.json). Extra arguments pass through to every run:
#   bash run_cifar.sh                                        # LayerMatch, 3 seeds, 6 settings: 18 runs
#   ALGORITHMS="layermatch fixmatch" bash run_cifar.sh       # and the baseline beside it: 36 runs
#   SEEDS=0 bash run_cifar.sh --device cuda --compile
#   AUGMENT=usb bash run_cifar.sh                            # USB's/TorchSSL's RandAugment: runs/*-usb-s*
# Rerun it after an interruption: finished runs (summary.json) are skipped, interrupted ones (checkpoint.pt)
# resumed, the rest started. At the end it prints the results table of everything under runs/.
# Expected accuracy: the FixMatch paper (Sohn et al. 2020, Table 2, FixMatch-RA) reports test error
# 13.81 / 5.07 / 4.26 % on CIFAR-10 with 40 / 250 / 4000 labels and 48.85 / 28.29 / 22.60 % on CIFAR-100
# with 400 / 2500 / 10000 labels; LayerMatch (arXiv 2406.14207) reports gains over FixMatch (see its
# tables). We have not reproduced any of these yet (no GPU was available to us); see README "Results".
# Expected time: 2^20 steps / (steps/s from `python bench.py --device cuda`); see README.
set -euo pipefail
cd "$(dirname "$0")"
for seed in ${SEEDS:-0 1 2}; do
  for algorithm in ${ALGORITHMS:-layermatch}; do
    for run in cifar10@40 cifar10@250 cifar10@4000 cifar100@400 cifar100@2500 cifar100@10000; do
      out="runs/$run-$algorithm${AUGMENT:+-$AUGMENT}-s$seed"
      if [[ -f $out/summary.json ]]; then
        echo "finished, skipped: $out"
        continue
      fi
      start=()                                     # a new run
      [[ -d $out ]] && start=(--overwrite)         # stopped before its first checkpoint: nothing to keep
      [[ -f $out/checkpoint.pt ]] && start=(--resume)
      python layermatch.py --dataset "${run%@*}" --labels "${run#*@}" --algorithm "$algorithm" --seed "$seed" \
        ${AUGMENT:+--augment "$AUGMENT"} --out "$out" ${start[@]+"${start[@]}"} "$@"
    done
  done
done
python layermatch.py --table runs
