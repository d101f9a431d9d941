#!/usr/bin/env bash
# The tuned study's round loop (results/tuned/PLAN.md, results/README.md) for one pair of methods:
# round k brings SINGLE to k trials and PLUS (its -plus method) to 2k, k = 1..ROUNDS (default 12).
# Run one copy per pair side by side, one compute thread each on a 2-core CPU, each in its own session
# so that stop_after_trial.sh can stop it between trials:
#   for P in "lora lora-plus" "olora olora-plus"; do set -- $P
#     setsid bash -c "echo \$\$ > /tmp/loop-$1.pid; exec nice -n 19 results/tuned/loop.sh /work/study-wt smollm2-135m $1 $2" \
#       > /tmp/loop-$1.log 2>&1 &
#   done
# WORKTREE is a git worktree at the study's pinned commit (its src/ is what runs); MAIN, the checkout
# whose .venv and runs/ are used (default: the folder above this script's results/); DB, the live
# study database outside any work tree (default /work/study-db/MODEL.db).
# The plan's edge rule (PLAN.md, session 16), after the ranges were widened by `tune --widen --trials 0`:
# EDGE=6 LR_RANGE="1e-6 1e-1" runs rounds j = 1..EDGE after the budgets, SINGLE to 12 + j and PLUS to 24 + j.
set -u
WT=$1; MODEL=$2; ONE=$3; PLUS=$4; ROUNDS=${5:-12}
MAIN=${MAIN:-$(cd "$(dirname "$0")/../.." && pwd)}
DB=${DB:-/work/study-db/$MODEL.db}
cd "$WT" || exit 1
export PYTHONPATH="$WT/src" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
COMMON=(--model "$MODEL" --data "$MAIN/../shared/data/alpaca/alpaca_data.json" --n-train 1000 --n-val 100
        --eval-steps 28 --data-seed 42 --lr-range ${LR_RANGE:-1e-6 1e-2} --ratio-range ${RATIO_RANGE:-1/64 64}
        --storage "sqlite:///$DB" --output "$MAIN/runs/tuned/$MODEL-$ONE")
round() {  # SINGLE to $1 trials, then PLUS to $2
  "$MAIN/.venv/bin/python" -m oloraplus tune "${COMMON[@]}" --methods "$ONE" --trials "$1" || exit $?
  "$MAIN/.venv/bin/python" -m oloraplus tune "${COMMON[@]}" --methods "$PLUS" --trials "$2" || exit $?
}
for k in $(seq 1 "$ROUNDS"); do round "$k" $((2 * k)); done
for j in $(seq 1 "${EDGE:-0}"); do round $((ROUNDS + j)) $((2 * ROUNDS + j)); done
