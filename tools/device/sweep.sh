#!/bin/bash
# Device call 2 of 2: the lambda sweep of results/sweep-smollm2 on one GPU (see tools/device/README.md).
# Needs /root/stage from stage.sh and the second half of the GGUF carried in .dev2/.
# Nine workers run side by side, one per lambda, seeds 0, 1, 2 in that order (so a deadline cuts
# seeds, never whole arms); each worker then analyses its own runs. The flags are those of
# results/README.md's sweep command; only the machine differs.
set -u
T0=$SECONDS
DEADLINE=${DEADLINE:-470}
. tools/device/setup.sh
W=/root/sweep-smollm2 && mkdir -p "$W"
echo "setup done at $((SECONDS - T0)) s"
for R in 1/16 1/8 1/4 1/2 1 2 4 8 16; do
  n=w$(echo "$R" | tr / _)
  (python3 -m oloraplus sweep --models smollm2-135m --methods olora-plus --ratios "$R" --seeds 3 \
     --n-train 1000 --n-eval 500 --max-new-tokens 128 --track-dynamics 25 --track-seeds 1 --no-progress \
     --output "$W/$n" && python3 -m oloraplus analyze "$W/$n"/runs/smollm2-135m/* --output "$W/$n/analysis") > "$W/$n.log" 2>&1 &
done
while [ -n "$(jobs -r)" ] && [ $((SECONDS - T0)) -lt "$DEADLINE" ]; do sleep 5; done
echo "workers stopped at $((SECONDS - T0)) s; still running: $(jobs -r | wc -l)"
for j in $(jobs -p); do pkill -P "$j"; kill "$j" 2>/dev/null; done; sleep 2  # this call's workers only
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$W/machine.txt"
tail -n 4 "$W"/*.log
tar czf "$OUT/runs.tgz" --exclude=adapter --exclude=checkpoints --exclude=analysis -C /root sweep-smollm2
tar czf "$OUT/analysis.tgz" --exclude=plots -C /root $(cd /root && ls -d sweep-smollm2/*/analysis 2>/dev/null)
ls -la "$OUT"
echo "total $((SECONDS - T0)) s"
