#!/usr/bin/env bash
# The FixMatch/LayerMatch CIFAR protocol: 2^20 steps, B=64, mu=7, tau=0.95, WRN-28-2 (CIFAR-10) and
# WRN-28-8 with weight decay 1e-3 (CIFAR-100), EMA 0.999, reported accuracy = median of the last 20
# evaluations (also best and final, in runs/*/summary.json). Any grid of runs, every one seed x algorithm x
# dataset@labels; extra arguments pass through to every run:
#   bash run_cifar.sh                                        # LayerMatch, 3 seeds, 6 settings: 18 runs
#   ALGORITHMS="layermatch fixmatch" bash run_cifar.sh       # and the baseline beside it: 36 runs
#   SEEDS=0 bash run_cifar.sh --device cuda --compile
#   AUGMENT=usb bash run_cifar.sh                            # USB's/TorchSSL's RandAugment: runs/*-usb-s*
#   RUNS="digits@10 digits@20" ALGORITHMS="layermatch fixmatch gradrelu avgclustering supervised" \
#     SEEDS="0 1 2 3 4" JOBS=2 bash run_cifar.sh             # the offline ablations, two runs at a time
# JOBS=N runs N at a time: each on its own GPU (shared in turn when there are fewer than N), the CPU cores split
# between them (OMP_NUM_THREADS), each one's output in its run folder's log.txt. Ctrl-C stops them all, each
# saving its checkpoint. Rerun it after an interruption: finished runs (summary.json) are skipped, interrupted
# ones (checkpoint.pt) resumed, the rest started. A run that fails (a crash, the out-of-memory killer) does not stop
# the others; two sweeps over one grid at once share it out. At the end it prints the results table of everything
# under runs/, then what did not finish (exit 2).
# Expected accuracy: the FixMatch paper (Sohn et al. 2020, Table 2, FixMatch-RA) reports test error
# 13.81 / 5.07 / 4.26 % on CIFAR-10 with 40 / 250 / 4000 labels and 48.85 / 28.29 / 22.60 % on CIFAR-100
# with 400 / 2500 / 10000 labels; LayerMatch (arXiv 2406.14207) reports gains over FixMatch (see its
# tables). We have not reproduced any of these yet (no GPU was available to us); see README "Results".
# Expected time: 2^20 steps / (steps/s from `python bench.py --device cuda`); see README.
set -euo pipefail
cd "$(dirname "$0")"
read -r -a runs <<< "${RUNS:-cifar10@40 cifar10@250 cifar10@4000 cifar100@400 cifar100@2500 cifar100@10000}"
read -r -a seeds <<< "${SEEDS:-0 1 2}"
read -r -a algorithms <<< "${ALGORITHMS:-layermatch}"
jobs=${JOBS:-1} extra=("$@")

# Every entry is checked before any run starts, against layermatch.py's own tables.
probe=$(python -c 'import os, torch, layermatch as m
print(torch.cuda.device_count(), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
print(*m.DATASET_DEFAULTS); print(*m.ALGORITHM_DEFAULTS); print(*m.DOWNLOAD_HINTS)
print(*m.Config.__dataclass_fields__["augment"].metadata["choices"])')
{ read -r gpus cores; read -r datasets; read -r known; read -r downloads; read -r augments; } <<< "$probe"
error() { echo "run_cifar.sh: error: $*" >&2; exit 2; }
[[ $jobs =~ ^[1-9][0-9]*$ ]] || error "JOBS must be a positive integer (got '$jobs')"
for i in "${!seeds[@]}"; do  # layermatch.py's --seed range; 00 is 0
  [[ ${seeds[i]} =~ ^0*([0-9]{1,10})$ ]] && (( 10#${BASH_REMATCH[1]} < 2**32 )) ||
    error "SEEDS entry '${seeds[i]}' is not a seed (0 to $(( 2**32 - 1 )))"
  seeds[i]=$(( 10#${BASH_REMATCH[1]} ))
done
for algorithm in "${algorithms[@]}"; do
  [[ " $known " == *" $algorithm "* ]] || error "unknown algorithm '$algorithm' in ALGORITHMS (choose from $known)"
done
for run in "${runs[@]}"; do
  [[ $run =~ ^(.+)@[1-9][0-9]*$ ]] || error "RUNS entry '$run' is not dataset@labels (labels >= 1), e.g. cifar10@40"
  [[ " $datasets " == *" ${BASH_REMATCH[1]} "* ]] ||
    error "unknown dataset '${BASH_REMATCH[1]}' in RUNS entry '$run' (choose from $datasets)"
done
augment=${AUGMENT:-}
[[ -z $augment || " $augments " == *" $augment "* && $augment != *[[:space:]]* ]] ||
  error "unknown AUGMENT '$augment' (choose from $augments)"
todo=() fetch=()  # "dataset@labels algorithm seed out", each once; datasets to download for a run not finished
for seed in "${seeds[@]}"; do for algorithm in "${algorithms[@]}"; do for run in "${runs[@]}"; do
  out=runs/$run-$algorithm${augment:+-$augment}-s$seed dataset=${run%@*}
  [[ " ${todo[*]-} " == *" $out "* ]] && continue  # named twice in the grid: trained once
  todo+=("$run $algorithm $seed $out")
  [[ -f $out/summary.json || " $downloads " != *" $dataset "* || " ${fetch[*]-} " == *" $dataset "* ]] ||
    fetch+=("$dataset")
done; done; done

# Downloads come first, one at a time: runs started together would each download into the same --data-dir.
download='import os, sys, layermatch as m
try:
    cfg = m.parse_args(sys.argv[1:])
    try:  # a lock in --data-dir: another sweep that downloads the same files waits for this one
        import fcntl
        os.makedirs(cfg.data_dir, exist_ok=True)
        fcntl.flock(lock := open(os.path.join(cfg.data_dir, f".{cfg.dataset}.download-lock"), "a"), fcntl.LOCK_EX)
    except (ImportError, OSError):
        pass  # Windows, a read-only --data-dir (its files must be there), NFS without its lock service
    m.load_data(cfg)
except m.UserError as e:
    sys.exit(f"run_cifar.sh: error: {e}")'
trap 'kill -TERM ${!-} 2> /dev/null || true; wait; echo "run_cifar.sh: interrupted while downloading" >&2; exit 130' \
  INT TERM
for dataset in ${fetch[@]+"${fetch[@]}"}; do
  python -c "$download" --dataset "$dataset" ${extra[@]+"${extra[@]}"} &  # (waited for: the trap reaches it)
  wait $! || exit 2
done
trap - INT TERM

# A run is claimed by its folder's sweep.lock, held by the run's process until it ends (the system releases it if the
# process dies): a second sweep over the same grid skips it (exit 75). The lock is held before the start is decided:
# --resume where a checkpoint is, else --overwrite, never over a run another sweep has trained meanwhile. Sweeps on
# several nodes need locks that reach every node (NFS with its lock service; Lustre mounted with flock, not localflock).
claim='import os, sys
out, cmd = sys.argv[1], sys.argv[2:]
path = os.path.join(out, "sweep.lock")
try:
    import errno, fcntl
    try:
        lock = open(path, "a")
    except PermissionError:  # a lock file of another user in a shared folder: a read-only descriptor takes it too
        lock = open(path)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # kept across exec (its decoding processes end with the run)
    os.set_inheritable(lock.fileno(), True)
except BlockingIOError:
    sys.exit(75)
except (ImportError, OSError) as e:  # only where the system has no locks does the run start unclaimed
    if isinstance(e, OSError) and e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
        sys.exit(f"run_cifar.sh: cannot lock {path} ({e}): not started, as another sweep may be training it")
    print(f"run_cifar.sh: note: no lock in {out} ({e}): a second sweep over this grid would train it too",
          file=sys.stderr)
os.execvp(cmd[0], cmd + ["--resume" if os.path.exists(os.path.join(out, "checkpoint.pt")) else "--overwrite"])'

# With JOBS > 1, slot i trains on GPU i (in turn when there are fewer) with its share of the cores.
devices=()
if (( jobs > 1 && gpus > 0 )); then
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then IFS=, read -r -a devices <<< "$CUDA_VISIBLE_DEVICES"
  else for ((i = 0; i < gpus; i++)); do devices+=("$i"); done; fi
fi

train() {  # train RUN ALGORITHM SEED OUT SLOT: skip, resume or start one run
  local run=$1 algorithm=$2 seed=$3 out=$4 slot=$5 status=0 what=started
  if [[ -f $out/summary.json ]]; then
    echo "finished, skipped: $out"
    return
  fi
  if ! mkdir -p "$out"; then
    echo "failed (no folder): $out"
    return
  fi
  [[ -f $out/checkpoint.pt ]] && what=resumed
  local cmd=(python -c "$claim" "$out" python layermatch.py --dataset "${run%@*}" --labels "${run#*@}"
             --algorithm "$algorithm" --seed "$seed" ${augment:+--augment "$augment"} --out "$out"
             ${extra[@]+"${extra[@]}"})
  # in the background and waited for, so that the worker's TERM reaches it at once
  if (( jobs == 1 )); then
    echo "$what: $out"
    "${cmd[@]}" &
  else
    (( ${#devices[@]} )) && export CUDA_VISIBLE_DEVICES=${devices[slot % ${#devices[@]}]}
    echo "$what: $out${CUDA_VISIBLE_DEVICES:+ on GPU $CUDA_VISIBLE_DEVICES} (log: $out/log.txt)"
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / jobs > 1 ? cores / jobs : 1 ))} "${cmd[@]}" >> "$out/log.txt" 2>&1 &
  fi
  wait $! || status=$?
  case $status in
    0) echo "finished: $out" ;;
    75) echo "skipped, another sweep trains it: $out" ;;
    *) echo "failed (exit $status): $out" ;;  # a crash, the OOM killer (137), a signal not sent to the sweep: go on
  esac
}

# Ctrl-C: every run gets one TERM, saves its checkpoint and stops (a second Ctrl-C kills at once: layermatch.py's rule).
worker() {  # slot $1: every run, in order, that no other slot has claimed (mkdir is atomic); stops when interrupted
  trap 'trap "" INT TERM; kill -TERM $(jobs -p) 2> /dev/null || true; wait; exit 143' INT TERM
  for i in "${!todo[@]}"; do
    if mkdir "$claims/$i" 2> /dev/null; then train ${todo[$i]} "$1"; fi  # (the entry split into 4 words)
  done
}
claims=$(mktemp -d)
workers=()
trap 'rm -rf "$claims"' EXIT
trap 'trap "" INT TERM; kill -TERM ${workers[@]+"${workers[@]}"} 2> /dev/null || true; wait
      echo "interrupted: each run stopped at a checkpoint; the same command continues them" >&2; exit 130' INT TERM
for ((slot = 0; slot < jobs; slot++)); do
  worker "$slot" &
  workers+=($!)
done
wait
table=0
python layermatch.py --table runs || table=2  # (its one line when no run has finished: the count below still comes)
unfinished=()
for entry in "${todo[@]}"; do [[ -f ${entry##* }/summary.json ]] || unfinished+=("${entry##* }"); done
(( ${#unfinished[@]} == 0 )) || error "${#unfinished[@]} of ${#todo[@]} runs did not finish: ${unfinished[*]}"
exit $table
