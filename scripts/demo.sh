#!/usr/bin/env bash
# The whole seed workflow, offline, on SmolLM2-135M-Instruct: save -> serve -> fine-tune -> deploy
# -> chat. Storage defaults to ./.sllm/demo (set STORAGE_PATH to move it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${SLLM_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m sllm.demo "$@"
