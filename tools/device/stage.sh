#!/bin/bash
# Device call 1 of 2 (run from the repo root on a lent GPU machine; see tools/device/README.md).
# Stages the carried .dev/ folder (wheels, the Alpaca file, the first half of the SmolLM2 GGUF)
# under /root/stage, installs the wheels, and runs the whole test suite with CUDA visible, so
# every code path that picks its device by itself (training, generation, analysis) runs on the GPU.
# TESTS=0 skips the test suite (about 70 s of the call) when the call's minutes are for the runs.
set -u
mkdir -p /root/stage && cp -r .dev/. /root/stage/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /root/stage/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import sys,torch,transformers,peft; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/machine.txt"
nproc | sed 's/^/cpu cores /' | tee -a "$OUT/machine.txt"
[ "${TESTS:-1}" = 0 ] || timeout 240 python3 -m pytest -q -n 8 -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest-cuda.log" | tail -40
