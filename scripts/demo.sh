#!/usr/bin/env bash
# The main job on built-in data, on CPU: generate the synthetic VOC-layout dataset (unless data.root=DIR is given),
# train MSFC (configs/voc.yaml <- configs/demo.yaml), export CAMs, make pseudo labels, segment with and without
# DenseCRF, evaluate every stage and print a results table — through the same entry points as a real run
# (train_run_VOC.sh, infer_run_VOC.sh).
# Usage: bash scripts/demo.sh [key=value ...]          every key=value reaches every stage
#   NGPUS (default 2) processes; on a CPU-only machine they are single-threaded gloo processes, one per core.
set -euo pipefail
cd "$(dirname "$0")/.."
start=${SECONDS}
root=data/synthetic_voc
out=runs/demo
for arg in "$@"; do
    case "${arg}" in
        data.root=*) root="${arg#data.root=}" ;;
        run.out_dir=*) out="${arg#run.out_dir=}" ;;
    esac
done
if [[ ! -f "${root}/ImageSets/Segmentation/val.txt" ]]; then
    python -m tools.make_synthetic "${root}"
fi
export NGPUS="${NGPUS:-2}"
# train.resume=auto: a second invocation reuses the finished run instead of retraining over it
./train_run_VOC.sh --config configs/demo.yaml "data.root=${root}" "run.out_dir=${out}" train.resume=auto "$@"
./infer_run_VOC.sh "${out}" "$@"
python -m tools.report --run-dir "${out}" --seconds $((SECONDS - start)) "$@"
