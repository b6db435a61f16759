#!/usr/bin/env bash
# Module ablations on the demo data at an equal budget: every configs/ablations/*.yaml is trained with the demo
# recipe, its val CAMs and segmentation are evaluated, and one markdown table compares them.
# Usage: bash scripts/ablate.sh [key=value ...]        (NGPUS processes, default 2; every key=value reaches every stage)
# Output: runs/ablations/<name>/ per ablation and runs/ablations/ablations.md
set -euo pipefail
cd "$(dirname "$0")/.."
root=data/synthetic_voc
for arg in "$@"; do
    case "${arg}" in data.root=*) root="${arg#data.root=}" ;; esac
done
if [[ ! -f "${root}/ImageSets/Segmentation/val.txt" ]]; then
    python -m tools.make_synthetic "${root}"
fi
export NGPUS="${NGPUS:-2}"
runs=()
for config in configs/ablations/*.yaml; do
    name="$(basename "${config}" .yaml)"
    out="runs/ablations/${name}"
    ./train_run_VOC.sh --config "${config}" "data.root=${root}" "run.out_dir=${out}" train.resume=auto "$@"
    scripts/launch.sh tools.make_cam --run-dir "${out}" "$@"
    scripts/launch.sh tools.evaluate --source cams --sweep --run-dir "${out}" "$@"
    scripts/launch.sh tools.evaluate --source cams --cam-key cam_aux --run-dir "${out}" "$@"
    scripts/launch.sh tools.infer_seg --run-dir "${out}" "$@"
    scripts/launch.sh tools.evaluate --source seg --run-dir "${out}" "$@"
    runs+=("${out}")
done
python -m tools.report --compare "${runs[@]}" --out runs/ablations/ablations.md
