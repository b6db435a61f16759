#!/usr/bin/env bash
# Inference and evaluation of a trained run, every stage sharded over NGPUS processes (scripts/launch.sh) and
# resumable: CAMs -> their mIoU with a background-threshold sweep -> pseudo labels -> their mIoU -> segmentation
# with DenseCRF -> seg and seg_crf mIoU. Dataset settings come from the run's config.yaml; results go to RUN/eval/.
# Usage: NGPUS=2 scripts/infer_pipeline.sh RUN_DIR [key=value ...]    (each key=value reaches every stage)
set -euo pipefail
if [[ $# -lt 1 || "$1" == *=* ]]; then
    echo "usage: NGPUS=N $0 RUN_DIR [key=value ...]" >&2
    exit 2
fi
run="$1"
shift
if [[ ! -f "${run}/config.yaml" ]]; then
    echo "$0: ${run} is not a run folder (no config.yaml); train first" >&2
    exit 2
fi
launch="$(dirname "$0")/launch.sh"
run_args=(--run-dir "${run}")
"${launch}" tools.make_cam "${run_args[@]}" "$@"
"${launch}" tools.evaluate --source cams --sweep "${run_args[@]}" "$@"
"${launch}" tools.evaluate --source cams --cam-key cam_aux "${run_args[@]}" "$@"
"${launch}" tools.make_pseudo_labels "${run_args[@]}" "$@"
"${launch}" tools.evaluate --source pseudo_labels "${run_args[@]}" "$@"
"${launch}" tools.infer_seg "${run_args[@]}" eval.crf=true "$@"
"${launch}" tools.evaluate --source seg "${run_args[@]}" "$@"
"${launch}" tools.evaluate --source seg_crf "${run_args[@]}" "$@"
