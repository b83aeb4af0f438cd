# shellcheck shell=bash
# Shared by the run scripts in this directory (sourced, not run). Defines `evlgen_launch ENTRY CFG [ARGS...]`:
#
#   ${PYTHON:-python} -m torch.distributed.run <rendezvous> ENTRY --cfg-path CFG [ARGS...]
#
# from the repository root. ARGS are the script's own arguments, passed through unchanged (LAVIS's
# `--options key=value ...`). Environment:
#   NPROC        processes (GPUs) per node, default 8 (the paper's pretraining ran on 8 GPUs)
#   NNODES       nodes, default 1 (single node: torchrun --standalone, which picks a free port)
#   NODE_RANK    this node's rank, default 0           } multi-node only (NNODES > 1),
#   MASTER_ADDR  address of node 0 (required)          } passed to torchrun's static
#   MASTER_PORT  port on node 0, default 29500         } rendezvous
#   PYTHON       interpreter, default `python`
#   CKPT         (evaluation scripts) checkpoint to evaluate, added as --options run.checkpoint=$CKPT

evlgen_die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# torchrun's rendezvous arguments from NPROC / NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT.
evlgen_dist_args() {
  local nnodes=${NNODES:-1}
  EVLGEN_DIST=(--nproc_per_node="${NPROC:-8}")
  if [[ "$nnodes" == "1" ]]; then
    EVLGEN_DIST+=(--standalone --nnodes=1)
  else
    [[ -n "${MASTER_ADDR:-}" ]] || evlgen_die "NNODES=$nnodes needs MASTER_ADDR (the address of node 0)"
    EVLGEN_DIST+=(--nnodes="$nnodes" --node_rank="${NODE_RANK:-0}"
                  --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}")
  fi
}

# EVLGEN_ARGS = the given arguments with run.checkpoint=$CKPT added to their --options (when CKPT is set).
# Fails when no checkpoint is given at all: evaluating an untrained connector is never what is meant.
evlgen_checkpoint_args() {
  EVLGEN_ARGS=("$@")
  if [[ -z "${CKPT:-}" ]]; then
    local arg
    for arg in "$@"; do
      case "$arg" in run.checkpoint=*|model.pretrained=*|model.finetuned=*) return 0 ;; esac
    done
    evlgen_die "no checkpoint: set CKPT=path/to/checkpoint.pth (or pass --options run.checkpoint=PATH)"
  fi
  local i
  for i in "${!EVLGEN_ARGS[@]}"; do
    if [[ "${EVLGEN_ARGS[$i]}" == "--options" ]]; then
      EVLGEN_ARGS=("${EVLGEN_ARGS[@]:0:i+1}" "run.checkpoint=$CKPT" "${EVLGEN_ARGS[@]:i+1}")
      return 0
    fi
  done
  EVLGEN_ARGS+=(--options "run.checkpoint=$CKPT")
}

evlgen_launch() {
  local entry=$1 cfg=$2
  shift 2
  [[ -f "$cfg" ]] || evlgen_die "config $cfg not found (run from a checkout of evlgen-lavis)"
  evlgen_dist_args
  exec "${PYTHON:-python}" -m torch.distributed.run "${EVLGEN_DIST[@]}" "$entry" --cfg-path "$cfg" "$@"
}
