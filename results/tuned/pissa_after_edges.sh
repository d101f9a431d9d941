#!/usr/bin/env bash
# Session 17's order (PLAN.md, session 17): after the edge rounds of the four issue methods, one worker brings
# METHOD's study to its budget BUDGET in the old range, widens it (tune --widen --trials 0, from MAIN's code:
# it runs no trial), and runs its EDGE more trials in the widened range, at the pinned worktree WT.
# One copy per method, side by side, one thread each (pid files /tmp/loop-*.pid keep save_progress.sh saving):
#   setsid bash -c 'echo $$ > /tmp/loop-pissa.pid; exec nice -n 19 results/tuned/pissa_after_edges.sh /work/study-wt smollm2-135m pissa 12' > /tmp/loop-pissa.log 2>&1 &
#   setsid bash -c 'echo $$ > /tmp/loop-pissa-plus.pid; exec nice -n 19 results/tuned/pissa_after_edges.sh /work/study-wt smollm2-135m pissa-plus 24' > /tmp/loop-pissa-plus.log 2>&1 &
# (two workers on one method's study would wait for each other's last trial; one per method does not).
# The ranges before and after the widening default to SmolLM2's (lr_A [1e-6, 1e-2] -> [1e-6, 1e-1], lambda
# [1/64, 64] both times); Gemma 3 270M's (PLAN.md, session 26) widen lambda's low side instead:
#   OLD_LR="1e-6 1e-1" NEW_RATIO="1/640 64" results/tuned/pissa_after_edges.sh /work/final-wt gemma3-270m pissa-plus 24
set -u
WT=$1; MODEL=$2; METHOD=$3; BUDGET=$4; EDGE=${EDGE:-6}
OLD_LR=${OLD_LR:-1e-6 1e-2}; NEW_LR=${NEW_LR:-1e-6 1e-1}; OLD_RATIO=${OLD_RATIO:-1/64 64}; NEW_RATIO=${NEW_RATIO:-1/64 64}
MAIN=${MAIN:-$(cd "$(dirname "$0")/../.." && pwd)}
DB=${DB:-/work/study-db/$MODEL.db}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
args() {  # the study's flags with the lr range "$1" and the lambda range "$2"
  echo --model "$MODEL" --data "$MAIN/../shared/data/alpaca/alpaca_data.json" --n-train 1000 --n-val 100 \
       --eval-steps 28 --data-seed 42 --lr-range $1 --ratio-range $2 --storage "sqlite:///$DB" \
       --output "$MAIN/runs/tuned/$MODEL-$METHOD" --methods "$METHOD"
}
cd "$WT" || exit 1
PYTHONPATH="$WT/src" "$MAIN/.venv/bin/python" -m oloraplus tune $(args "$OLD_LR" "$OLD_RATIO") --trials "$BUDGET" || exit $?
cd "$MAIN" || exit 1
PYTHONPATH="$MAIN/src" "$MAIN/.venv/bin/python" -m oloraplus tune $(args "$NEW_LR" "$NEW_RATIO") --trials 0 --widen || exit $?
cd "$WT" || exit 1
PYTHONPATH="$WT/src" "$MAIN/.venv/bin/python" -m oloraplus tune $(args "$NEW_LR" "$NEW_RATIO") --trials $((BUDGET + EDGE)) || exit $?
