#!/usr/bin/env bash
# Zero-shot GQA (balanced test-dev) of a pretrained EVLGen OPT-2.7B checkpoint.
#
#   CKPT=output/evlgen/pretrain_opt2.7b/<job>/checkpoint_250000.pth \
#     run_scripts/evlgen/eval_gqa_zeroshot.sh [--options key=value ...]
#
# Config: projects/evlgen/eval/gqa_zeroshot_opt2.7b_eval.yaml.
# Environment: NPROC, default 8; NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT; PYTHON; CKPT
# (see run_scripts/evlgen/_launch.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source run_scripts/evlgen/_launch.sh
evlgen_checkpoint_args "$@"
evlgen_launch evaluate.py projects/evlgen/eval/gqa_zeroshot_opt2.7b_eval.yaml "${EVLGEN_ARGS[@]}"
