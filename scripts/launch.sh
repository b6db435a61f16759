#!/usr/bin/env bash
# torchrun launcher shared by the entry points. Usage: scripts/launch.sh MODULE [ARGS ...]
#   NGPUS          processes (GPUs) per machine, default 1; on a machine without CUDA the processes use gloo on CPU
#   NNODES         machines, default 1; with NNODES > 1 set on every machine:
#   RDZV_ENDPOINT  host:port of the rendezvous (any one of the machines), and optionally RDZV_ID (a job name)
set -euo pipefail
module="$1"
shift
if [[ "${NNODES:-1}" == 1 ]]; then
    launch=(--standalone)
else
    launch=(--nnodes="${NNODES}" --rdzv-backend=c10d --rdzv-id="${RDZV_ID:-msfc}"
        --rdzv-endpoint="${RDZV_ENDPOINT:?multi-machine runs need RDZV_ENDPOINT=host:port on every machine}")
fi
exec torchrun "${launch[@]}" --nproc_per_node="${NGPUS:-1}" -m "${module}" "$@"
