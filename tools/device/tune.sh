#!/bin/bash
# Device call 2 of 2 for the tuned study (results/tuned/PLAN.md): SmolLM2 tuning trials on one GPU,
# many side by side, into a copy of the study's database (see tools/device/README.md).
# Needs /root/stage from stage.sh and, carried in .dev2/: gguf.part2, whl/ (optuna and its stack),
# study.db (the live database, copied while no CPU worker runs) and src.tgz (`git archive` of the
# study's pinned commit, src/ only: the trials run the same code as on the CPU).
# BUDGETS: "method=trials[:workers] ..." (the budget each method's study is brought to, and its
# number of worker processes, PER_METHOD if not given), one compute thread each, all on the GPU. At DEADLINE seconds the workers
# are stopped; a trial they leave RUNNING is failed by the next run's heartbeat check and never counts.
# Returns study.db, trials.tgz (each trial's results.json and log, no adapters) and the logs.
set -u
T0=$SECONDS
DEADLINE=${DEADLINE:-500}
PER_METHOD=${PER_METHOD:-2}
BUDGETS=${BUDGETS:-"lora=12 olora=12 lora-plus=24 olora-plus=24 pissa=12 pissa-plus=24"}
mkdir -p /root/pinned && tar xzf .dev2/src.tgz -C /root/pinned || exit 1
SRC=/root/pinned/src OMP_NUM_THREADS=1 . tools/device/setup.sh
cp .dev2/study.db /root/study.db || exit 1
W=/root/tuned && mkdir -p "$W"
[ "${REQUIRE_GPU:-1}" = 0 ] || python3 -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'" || exit 1
echo "setup done at $((SECONDS - T0)) s"
COMMON=(--model smollm2-135m --n-train 1000 --n-val 100 --eval-steps 28 --data-seed 42
        --lr-range 1e-6 1e-2 --ratio-range 1/64 64 --storage sqlite:////root/study.db)
for B in $BUDGETS; do
  M=${B%%=*}; N=${B#*=}; P=$PER_METHOD
  [ "$N" != "${N#*:}" ] && P=${N#*:} && N=${N%%:*}
  for i in $(seq 1 "$P"); do
    python3 -m oloraplus tune "${COMMON[@]}" --output "$W/$M" --methods "$M" --trials "$N" > "$W/$M-$i.log" 2>&1 &
    sleep 2  # staggered starts: fewer trials started at the same moment over a method's budget
  done
done
while [ -n "$(jobs -r)" ] && [ $((SECONDS - T0)) -lt "$DEADLINE" ]; do sleep 5; done
echo "workers stopped at $((SECONDS - T0)) s; still running: $(jobs -r | wc -l)"
for j in $(jobs -p); do kill "$j" 2>/dev/null; done; sleep 3  # this call's workers only, never a pattern
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$W/machine.txt"
python3 -c "import sys,torch,transformers,peft,optuna; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'optuna', optuna.__version__)" >> "$W/machine.txt"
tail -n 3 "$W"/*.log
sqlite3 /root/study.db ".backup $OUT/study.db" 2>/dev/null || python3 -c "import sqlite3; s=sqlite3.connect('/root/study.db'); d=sqlite3.connect('$OUT/study.db'); s.backup(d); d.close()"
tar czf "$OUT/trials.tgz" --exclude=adapter --exclude=adapter-lora --exclude=checkpoints -C /root tuned
ls -la "$OUT"
echo "total $((SECONDS - T0)) s"
