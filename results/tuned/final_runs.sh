#!/usr/bin/env bash
# The final runs of one model (PLAN.md "Final runs"): each method's best setting, SEEDS seeds, from the tuned
# study, at the commit of the git worktree WT (PLAN.md, session 14: checked to train a finished trial bit for
# bit first). Every method's study already has its budget, so `--trials 0` runs no trial and writes nothing to
# the study; the final runs go seed-major into MAIN/runs/tuned/MODEL/final/, each claimed by one process, so
# run one copy per core side by side, one compute thread each, each in its own session:
#   for w in 1 2; do
#     setsid bash -c "echo \$\$ > /tmp/final-$w.pid; exec nice -n 19 results/tuned/final_runs.sh /work/final-wt smollm2-135m 5" \
#       > /tmp/final-$w.log 2>&1 &
#     sleep 60
#   done
# The process that finishes the last run writes MAIN/runs/tuned/MODEL/report.md (also: oloraplus report DIR --tuned).
# LR_RANGE and RATIO_RANGE are the studies' searched ranges (default SmolLM2's; Gemma 3 270M: RATIO_RANGE="1/640 64",
# PLAN.md, session 26).
# A killed copy leaves its run unfinished (no results.json); the next copy reruns it from the start.
set -u
WT=$1; MODEL=$2; SEEDS=$3
MAIN=${MAIN:-$(cd "$(dirname "$0")/../.." && pwd)}
DB=${DB:-/work/study-db/$MODEL.db}
cd "$WT" || exit 1
export PYTHONPATH="$WT/src" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$MAIN/.venv/bin/python" -m oloraplus tune --model "$MODEL" --data "$MAIN/../shared/data/alpaca/alpaca_data.json" \
    --n-train 1000 --n-val 100 --eval-steps 28 --data-seed 42 --lr-range ${LR_RANGE:-1e-6 1e-1} --ratio-range ${RATIO_RANGE:-1/64 64} \
    --methods lora lora-plus olora olora-plus pissa pissa-plus --trials 0 --final-seeds "$SEEDS" \
    --storage "sqlite:///$DB" --output "$MAIN/runs/tuned/$MODEL"
