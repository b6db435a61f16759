#!/usr/bin/env bash
# Module ablations on the demo data at an equal budget: every configs/ablations/*.yaml is trained with the demo
# recipe (train_run_VOC.sh layers it over configs/voc.yaml); its CAMs are scored (at cam.bkg_thre, plus the sweep:
# GT-tuned threshold, oracle — not a protocol number) on the protocol's eval.cam_split (SPEC §8) and on the
# segmentation split (eval.split, null = data.val_split), its segmentation head on the segmentation split without
# DenseCRF; one markdown table compares them (tools/report.py).
# Usage: bash scripts/ablate.sh [key=value ...]        (NGPUS processes, default 2; every key=value reaches every stage)
#        ABLATIONS="full toco baseline" bash scripts/ablate.sh    runs only these configs/ablations/<name>.yaml, in order
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
if [[ -n "${ABLATIONS:-}" ]]; then
    configs=()
    for name in ${ABLATIONS}; do
        configs+=("configs/ablations/${name}.yaml")
        [[ -f "${configs[-1]}" ]] || { echo "$0: no ablation config ${configs[-1]}" >&2; exit 2; }
    done
else
    configs=(configs/ablations/*.yaml)
fi
for config in "${configs[@]}"; do
    name="$(basename "${config}" .yaml)"
    out="runs/ablations/${name}"
    ./train_run_VOC.sh --config "${config}" "data.root=${root}" "run.out_dir=${out}" train.resume=auto "$@"
    splits="$(python -m tools.report --print-splits --run-dir "${out}" "$@")"  # an assignment, so set -e sees a failure
    read -r cam_split seg_split <<<"${splits}"
    for split in $(printf '%s\n' "${cam_split}" "${seg_split}" | uniq); do
        scripts/launch.sh tools.make_cam --run-dir "${out}" "$@" "eval.split=${split}"
        scripts/launch.sh tools.evaluate --source cams --sweep --run-dir "${out}" "$@" "eval.split=${split}"
        scripts/launch.sh tools.evaluate --source cams --cam-key cam_aux --run-dir "${out}" "$@" "eval.split=${split}"
    done
    scripts/launch.sh tools.infer_seg --run-dir "${out}" "$@" "eval.split=${seg_split}"
    scripts/launch.sh tools.evaluate --source seg --run-dir "${out}" "$@" "eval.split=${seg_split}"
    runs+=("${out}")
done
python -m tools.report --compare "${runs[@]}" --out runs/ablations/ablations.md
