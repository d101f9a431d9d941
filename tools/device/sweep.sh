#!/bin/bash
# Device call 2 of 2: the lambda sweep of results/sweep-smollm2 on one GPU (see tools/device/README.md).
# Needs /root/stage from stage.sh and the second half of the GGUF carried in .dev2/.
# Nine workers run side by side, one per lambda, seeds 0, 1, 2 in that order (so a deadline cuts
# seeds, never whole arms); each worker then analyses its own runs. The flags are those of
# results/README.md's sweep command; only the machine differs.
set -u
T0=$SECONDS
DEADLINE=${DEADLINE:-470}
S=/root/stage
cp .dev2/gguf.part2 "$S/" 2>/dev/null
cat "$S/gguf.part1" "$S/gguf.part2" > "$S/SmolLM2-135M-Instruct.Q4_1.gguf"
(cd "$S" && sha256sum -c gguf.sha256) || exit 1
[ -d /tmp/site/transformers ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$S"/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 OLORAPLUS_HOME=/root/oloraplus HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error OMP_NUM_THREADS=2
mkdir -p ../shared/data/alpaca && gunzip -c "$S/alpaca_data.json.gz" > ../shared/data/alpaca/alpaca_data.json
(cd ../shared/data/alpaca && sha256sum -c "$S/alpaca.sha256") || exit 1
python3 -c "from oloraplus.models import convert_gguf, oloraplus_home; convert_gguf('$S/SmolLM2-135M-Instruct.Q4_1.gguf', oloraplus_home() / 'models' / 'smollm2-135m')" || exit 1
sha256sum /root/oloraplus/models/smollm2-135m/model.safetensors | tee "$OUT/model.sha256"
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
pkill -f "oloraplus (sweep|analyze)"; sleep 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$W/machine.txt"
tail -n 4 "$W"/*.log
tar czf "$OUT/runs.tgz" --exclude=adapter --exclude=checkpoints --exclude=analysis -C /root sweep-smollm2
tar czf "$OUT/analysis.tgz" --exclude=plots -C /root $(cd /root && ls -d sweep-smollm2/*/analysis 2>/dev/null)
ls -la "$OUT"
echo "total $((SECONDS - T0)) s"
