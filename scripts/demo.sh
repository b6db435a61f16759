#!/usr/bin/env bash
# The main job on built-in data, on CPU: generate the synthetic VOC-layout dataset (unless data.root=DIR is given),
# train MSFC (configs/voc.yaml <- configs/demo.yaml), export CAMs, make pseudo labels, segment with and without
# DenseCRF, evaluate every stage and print a results table — through the same entry points as a real run
# (train_run_VOC.sh, infer_run_VOC.sh). Then the second stage (docs/stage2.md; STAGE2=0 skips it): CAMs and hard +
# soft pseudo labels on train_aug, a small segmentation network trained on them from scratch in one process
# (configs/stage2/demo.yaml, into RUN/stage2), its segmentation with and without DenseCRF on val, scored by the same
# tools; the table then has its two rows too. With IRN=1, before the inference: CAMs and relation labels on train_aug,
# IRN's boundary network trained on them (configs/irn/demo.yaml, into RUN/irn, docs/irn.md), after which the
# inference also makes and scores random-walk pseudo labels (the table's "pseudo labels + RW" row).
# Usage: bash scripts/demo.sh [key=value ...]          every key=value reaches every stage (run.out_dir: stage 1's)
#   NGPUS (default 2) processes; on a CPU-only machine they are single-threaded gloo processes, one per core.
#   STAGE2=1 (default) | 0; STAGE2_ARGS="key=value ..." overrides for the second stage only (e.g. stage2.target=soft).
#   IRN=0 (default) | 1; IRN_ARGS="key=value ..." overrides for the boundary network's training only.
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
split=train_aug
args=()
for arg in "$@"; do
    [[ "${arg}" == run.out_dir=* ]] || args+=("${arg}")  # stage 2 and the boundary network have run folders of their own
done
if [[ "${IRN:-0}" == 1 ]]; then
    irn_start=${SECONDS}
    read -r -a extra <<<"${IRN_ARGS:-}"
    scripts/launch.sh tools.make_cam --run-dir "${out}" "$@" "eval.split=${split}"
    scripts/launch.sh tools.make_relations --run-dir "${out}" "$@" "eval.split=${split}"
    # one process: a small ResNet from scratch, minutes (configs/irn/demo.yaml); infer_run_VOC.sh then finds RUN/irn
    NGPUS=1 ./train_run_VOC.sh --config configs/irn/demo.yaml "data.root=${root}" \
        "irn.relations=${out}/relations/${split}" train.resume=auto ${args[@]+"${args[@]}"} \
        ${extra[@]+"${extra[@]}"} "run.out_dir=${out}/irn"
    echo "IRN (CAMs and relation labels on ${split}, boundary network): $((SECONDS - irn_start)) s"
fi
./infer_run_VOC.sh "${out}" "$@"
if [[ "${STAGE2:-1}" == 1 ]]; then
    stage2_start=${SECONDS}
    stage2="${out}/stage2"
    read -r -a extra <<<"${STAGE2_ARGS:-}"
    # the pseudo labels stage 2 trains on: the final stage-1 weights' CAMs on the training split, hard and soft
    scripts/launch.sh tools.make_cam --run-dir "${out}" "$@" "eval.split=${split}"
    scripts/launch.sh tools.make_pseudo_labels --run-dir "${out}" "$@" "eval.split=${split}" pseudo.soft=true
    # one process of 8 images: BatchNorm over 4 images per process left this network at 43 val mIoU (docs/stage2.md)
    NGPUS=1 ./train_run_VOC.sh --config configs/stage2/demo.yaml "data.root=${root}" \
        "stage2.labels=${out}/pseudo_labels/${split}" train.resume=auto ${args[@]+"${args[@]}"} \
        ${extra[@]+"${extra[@]}"} "run.out_dir=${stage2}"
    ./infer_run_VOC.sh "${stage2}" ${args[@]+"${args[@]}"}  # a stage-2 run: segmentation with and without DenseCRF
    echo "second stage (CAMs and pseudo labels on ${split}, training, inference, evaluation): $((SECONDS - stage2_start)) s"
fi
python -m tools.report --run-dir "${out}" --seconds $((SECONDS - start)) "$@"
