#!/usr/bin/env bash
# EVLGen pretraining with Vicuna-7B, the authors' run (8 GPUs; CCS-14M + COCO, 60k iterations).
#
#   run_scripts/evlgen/pretrain_vicuna7b.sh [--options key=value ...]
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 run_scripts/evlgen/pretrain_vicuna7b.sh
#     (on every node, with that node's NODE_RANK)
#
# Config: projects/evlgen/pretrain_vicuna7b.yaml.
# Environment: NPROC, default 8; NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT; PYTHON
# (see run_scripts/evlgen/_launch.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source run_scripts/evlgen/_launch.sh
evlgen_launch train.py projects/evlgen/pretrain_vicuna7b.yaml "$@"
