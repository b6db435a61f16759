#!/usr/bin/env bash
# Launcher shared by the entry points. Usage: scripts/launch.sh MODULE [ARGS ...]   (MODULE e.g. tools.train)
#   NGPUS          processes (GPUs) per machine, default 1; on a machine without CUDA the processes use gloo on CPU
#   NNODES         machines, default 1; with NNODES > 1 set on every machine:
#   RDZV_ENDPOINT  host:port of the rendezvous (any one of the machines), and optionally RDZV_ID (a job name)
# One process on one machine runs as plain `python -m MODULE`; more go through torchrun (python -m utils.launch), which
# ends a failed run with one line naming the failed ranks instead of its own traceback, and with their exit code (2 for
# a user error, whose one-line message each process prints). Runs from any folder: the repository root goes on
# PYTHONPATH, and paths given in ARGS stay relative to the folder you run from. `MODULE --help` prints this and the
# module's own usage, after the headers of the entry points that called this launcher (MSFC_WRAPPER, see below).
set -euo pipefail
header() { sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$1"; }
# MSFC_WRAPPER: the scripts that called this launcher, ':'-separated, outermost first (train_run_VOC.sh sets it to its
# own path); their headers lead the usage, so each wrapper keeps its --help text in one place. The tools never see it.
IFS=: read -r -a wrappers <<<"${MSFC_WRAPPER:-}"
unset MSFC_WRAPPER
usage() {
    for wrapper in ${wrappers[@]+"${wrappers[@]}"}; do
        header "${wrapper}"
        echo
    done
    header "${BASH_SOURCE[0]}"
}
if [[ $# -lt 1 ]]; then
    usage >&2
    exit 2
fi
if [[ "$1" == -h || "$1" == --help ]]; then
    usage
    exit 0
fi
module="$1"
shift
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${root}${PYTHONPATH:+:${PYTHONPATH}}"
# `python -m` would put the current folder first on sys.path (Python >= 3.11 leaves it off with this), so a tools/ or
# utils/ folder of the user's own would shadow the repository's
export PYTHONSAFEPATH=1
for arg in "$@"; do
    if [[ "${arg}" == -h || "${arg}" == --help ]]; then
        usage
        echo
        exec python -m "${module}" "$@"  # one process: the module's usage, printed once
    fi
done
if [[ "${NGPUS:-1}" == 1 && "${NNODES:-1}" == 1 ]]; then
    exec python -m "${module}" "$@"
fi
if [[ "${NNODES:-1}" == 1 ]]; then
    launch=(--standalone)
else
    launch=(--nnodes="${NNODES}" --rdzv-backend=c10d --rdzv-id="${RDZV_ID:-msfc}"
        --rdzv-endpoint="${RDZV_ENDPOINT:?multi-machine runs need RDZV_ENDPOINT=host:port on every machine}")
fi
exec python -m utils.launch "${launch[@]}" --nproc_per_node="${NGPUS:-1}" -m "${module}" "$@"
