#!/usr/bin/env bash
# Every GPU measurement of bench/README.md in one run, sized to finish in about 8 minutes on one
# H200, writing JSON and logs to $OUT (the device tool brings back at most 8 files):
#   1. the GPU device tests of tests/finetune (bf16 job on CUDA, varlen kernel == per-sequence loop);
#   2. finetune, TinyLlama-1.1B shape: baseline, padding-free default, token budget, and the
#      default with `compile` (decoder layers; last, as its compile time is the least known);
#   3. finetune, OPT-125m shape: the same four;
#   4. host, 1.1B and OPT-125m shapes: ops, host ms and device-busy ms per optimizer step,
#      baseline vs default (is the default step bound by the host or by the GPU?);
#   5. load, 1.1B shape (bf16), 3 rounds: the store's fast path (pinned buffers, overlapped
#      copies) vs its from_pretrained path vs from_pretrained + .to, and the pinned copy bandwidth.
# Each step gets what is left of BUDGET_S and is killed at its share, so a slow step costs only its
# own result. Wheels the image lacks (bench/gpu/fetch_wheels.sh puts them in .whl/) are installed
# into /tmp/site first.
#
# Dry run on a CPU (same code path, tiny shapes, a minute or two):
#   . .venv/bin/activate
#   OUT=/tmp/gpu-dry DEVICE=cpu SIZE_LLAMA=tiny SIZE_OPT=tiny-opt SKIP_WHEELS=1 \
#     VARIANTS=baseline,padding_free,token_budget bash bench/gpu/run_all.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/sllm-gpu-out}"
DEVICE="${DEVICE:-cuda}"
SIZE_LLAMA="${SIZE_LLAMA:-llama-1.1b}"
SIZE_OPT="${SIZE_OPT:-opt-125m}"
BUDGET_S="${BUDGET_S:-500}"
WORK="${WORK:-/tmp/sllm-gpu-work}"
mkdir -p "$OUT" "$WORK/results"
LOG="$OUT/run.log"
START=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - START))); }
say() { echo "[$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

if [ -z "${SKIP_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  wheels=$(ls .whl/*.whl | grep -v pyarrow)
  # pyarrow only where the image's is older than datasets' floor (24)
  if ! python3 -c 'import sys, pyarrow; sys.exit(int(pyarrow.__version__.split(".")[0]) < 24)' \
    2>/dev/null; then
    wheels="$wheels $(ls .whl/pyarrow-*.whl 2>/dev/null)"
  fi
  # shellcheck disable=SC2086
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site $wheels >>"$LOG" 2>&1 || say "wheel install FAILED"
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:$PWD:${PYTHONPATH:-}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

{
  nvidia-smi 2>&1 | head -20
  python3 -c 'import torch, transformers, peft, datasets, pydantic, pyarrow, accelerate
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for m in (transformers, peft, datasets, pydantic, pyarrow, accelerate):
    print(m.__name__, m.__version__)
from torch.nn.attention import varlen
import inspect; print("varlen_attn", inspect.signature(varlen.varlen_attn))' 2>&1
} >"$OUT/env.txt"
say "env: $(tr '\n' ' ' <"$OUT/env.txt" | cut -c1-600)"

say "device tests"
timeout 150 python3 -m pytest tests/finetune -q -p no:cacheprovider -k "gpu or cuda" \
  >"$OUT/tests.log" 2>&1
say "device tests exit $? : $(tail -1 "$OUT/tests.log")"

bench() {  # bench WHAT NAME SHARE_S ARGS...: one `python -m bench WHAT`, killed at its share
  local what=$1 name=$2 share=$3
  shift 3
  local limit
  limit=$(($(left) < share ? $(left) : share))
  if [ "$limit" -lt 20 ]; then
    say "$name: skipped, ${limit}s left"
    return
  fi
  say "$name: up to ${limit}s"
  local extra=()
  [ "$what" = finetune ] && extra=(--name "$name" --deadline-s $((limit * 6 / 10)))
  timeout --signal=INT --kill-after=10 "$limit" python3 -m bench "$what" --device "$DEVICE" \
    --out "$WORK/results" ${extra[@]+"${extra[@]}"} "$@" >>"$LOG" 2>&1
  say "$name: exit $?"
  cp "$WORK/results/$name.json" "$OUT/" 2>/dev/null || say "$name: no result file"
}

VARIANTS="${VARIANTS:-baseline,padding_free,token_budget,padding_free_compile}"
bench finetune "finetune-$SIZE_LLAMA" 260 --size "$SIZE_LLAMA" --workdir "$WORK/llama" \
  --variants "$VARIANTS"
bench finetune "finetune-$SIZE_OPT" 150 --size "$SIZE_OPT" --workdir "$WORK/opt" \
  --variants "$VARIANTS"
bench host "host-$SIZE_LLAMA" 90 --size "$SIZE_LLAMA" --workdir "$WORK/llama"
bench host "host-$SIZE_OPT" 60 --size "$SIZE_OPT" --workdir "$WORK/opt"
bench load "load-$SIZE_LLAMA" 70 --size "$SIZE_LLAMA"
say "done; tables:"
grep -A8 "^| variant" "$LOG" | tail -40 >>"$LOG"
grep -A7 "^| load (model" "$LOG" | tail -8 >>"$LOG"
tail -45 "$LOG"
