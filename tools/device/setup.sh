# Sourced by the device calls that run after stage.sh (sweep.sh, tune.sh; see tools/device/README.md):
# joins and checks the SmolLM2 GGUF (second half carried in .dev2/), installs the staged wheels if
# stage.sh's /tmp/site is gone and any carried in .dev2/whl/, puts the Alpaca file where the default --data looks, converts the
# model exactly as `oloraplus models pull smollm2-135m` does, and exports the environment.
# SRC (default: this tree's src/) is the oloraplus source the calls run.
S=/root/stage
cp .dev2/gguf.part2 "$S/" 2>/dev/null
cat "$S/gguf.part1" "$S/gguf.part2" > "$S/SmolLM2-135M-Instruct.Q4_1.gguf"
(cd "$S" && sha256sum -c gguf.sha256) || exit 1
[ -d /tmp/site/transformers ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$S"/whl/*.whl || exit 1
if [ -d .dev2/whl ]; then  # wheels only this call needs (tune.sh: optuna and its database stack)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev2/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:${SRC:-$PWD/src} PYTHONUNBUFFERED=1 OLORAPLUS_HOME=/root/oloraplus HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p ../shared/data/alpaca && gunzip -c "$S/alpaca_data.json.gz" > ../shared/data/alpaca/alpaca_data.json
(cd ../shared/data/alpaca && sha256sum -c "$S/alpaca.sha256") || exit 1
python3 -c "from oloraplus.models.loading import convert_gguf, oloraplus_home; convert_gguf('$S/SmolLM2-135M-Instruct.Q4_1.gguf', oloraplus_home() / 'models' / 'smollm2-135m')" || exit 1
sha256sum /root/oloraplus/models/smollm2-135m/model.safetensors | tee "$OUT/model.sha256"
