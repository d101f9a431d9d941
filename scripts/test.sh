#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the offline test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest tests "$@"
