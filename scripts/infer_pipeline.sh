#!/usr/bin/env bash
# Inference and evaluation of a trained run by the protocol of SPEC §8, every stage sharded over NGPUS processes
# (scripts/launch.sh) and resumable. On eval.cam_split (VOC train; COCO val): CAMs -> CAM and aux-CAM mIoU at
# cam.bkg_thre, with the threshold sweep (GT-tuned threshold, oracle — not a protocol number) -> pseudo labels ->
# their mIoU -> with an IRN boundary network (RUN/irn/checkpoints/last.pth, or rw.checkpoint=IRN_RUN|FILE given),
# random-walk pseudo labels (pseudo.refine=[rw], RUN/pseudo_labels_rw) -> their mIoU. On eval.split (null =
# data.val_split): segmentation with DenseCRF -> seg and seg_crf mIoU. Last, the protocol table (tools/report.py,
# also in RUN/results/). Dataset settings come from the run's config.yaml.
# Usage: NGPUS=2 scripts/infer_pipeline.sh RUN_DIR [key=value ...]    (each key=value reaches every stage)
#   eval.split=S moves the segmentation stages only and eval.cam_split=S the CAM and pseudo-label stages (the CAM
#   stages are given eval.split=<cam split>); eval.checkpoint=last (the final checkpoint) | best_cam | best_seg | PATH.
#   Runs from any folder (the repository root goes on PYTHONPATH; RUN_DIR stays relative to yours).
#   Several machines: run.num_shards=N run.shard_index=i on machine i runs the producing stages only (CAMs, pseudo
#   labels, random-walk pseudo labels, segmentation) over its ids[i::N]; then, with every shard's outputs in one run
#   folder (shared, or copied together), rerun without the shard keys: finished stages skip their work and the
#   evaluations and table run.
#   A second-stage run (task: stage2, docs/stage2.md) has no CAMs: its segmentation stages and the table only.
#   SPLIT=test (VOC): segmentation with DenseCRF on eval.split=test only, then the test-server archive
#   (tools/package_voc_test.py --crf -> RUN/test_server/results.tgz); nothing is scored, the test split has no masks.
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
launch="${here}/launch.sh"
usage() { sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"; }
for arg in "$@"; do
    if [[ "${arg}" == -h || "${arg}" == --help ]]; then
        # the launcher prints the callers' headers (an infer_run_*.sh wrapper's, then this one's), then its own
        MSFC_WRAPPER="${MSFC_WRAPPER:+${MSFC_WRAPPER}:}${BASH_SOURCE[0]}" exec "${launch}" --help
    fi
done
if [[ $# -lt 1 || "$1" == *=* ]]; then
    usage >&2
    exit 2
fi
run="$1"
shift
shards=1
rw_given=""
for arg in "$@"; do
    if [[ "${arg}" == run.num_shards=* ]]; then
        shards="${arg#run.num_shards=}"
    elif [[ "${arg}" == rw.checkpoint=* ]]; then # the last one wins, as in utils.config
        rw_given="${arg#rw.checkpoint=}"
        [[ "${rw_given}" != null ]] || rw_given=""
    fi
done
if [[ ! -f "${run}/config.yaml" ]]; then
    echo "$0: ${run} is not a run folder (no config.yaml); train first" >&2
    exit 2
fi
if [[ "${SPLIT:-test}" != test ]]; then
    echo "$0: SPLIT must be test or unset, got '${SPLIT}'" >&2
    exit 2
elif [[ -n "${SPLIT:-}" ]]; then # the VOC test server (README, "VOC test server")
    "${launch}" tools.infer_seg --run-dir "${run}" "$@" eval.crf=true eval.split=test
    NGPUS=1 NNODES=1 exec "${launch}" tools.package_voc_test --run-dir "${run}" --crf "$@"
fi
root="$(cd "${here}/.." && pwd)"
# for the python -m tools.report calls below, as in launch.sh: the repository first, never the current folder
export PYTHONPATH="${root}${PYTHONPATH:+:${PYTHONPATH}}" PYTHONSAFEPATH=1
splits="$(python -m tools.report --print-splits --run-dir "${run}" "$@")"
read -r cam_split seg_split <<<"${splits}"
task="$(python -m tools.report --print-task --run-dir "${run}" "$@")"
cam=(--run-dir "${run}" "$@" "eval.split=${cam_split}")
# the random walk (SPEC §9): with the boundary network given (rw.checkpoint=...) or one trained into the run's irn/
# folder; its labels go to RUN/pseudo_labels_rw (where tools.evaluate looks) whatever pseudo.folder says
rw=()
rw_source="${rw_given:-${run}/irn/checkpoints/last.pth}"
if [[ -n "${rw_given}" || -f "${rw_source}" ]]; then
    rw=("${cam[@]}" "pseudo.refine=[rw]" pseudo.folder=null "rw.checkpoint=${rw_source}")
fi
if [[ "${task}" == stage2 ]]; then # a second-stage segmenter (docs/stage2.md) has no CAMs: its segmentation only
    echo "a second-stage run (task: stage2): segmentation on ${seg_split}, no CAM stages"
else
    echo "protocol (SPEC §8): CAMs and pseudo labels scored on ${cam_split}, segmentation on ${seg_split}"
    "${launch}" tools.make_cam "${cam[@]}"
fi
if [[ "${shards}" != 1 ]]; then
    if [[ "${task}" != stage2 ]]; then
        "${launch}" tools.make_pseudo_labels "${cam[@]}"
        [[ ${#rw[@]} -eq 0 ]] || "${launch}" tools.make_pseudo_labels "${rw[@]}"
    fi
    "${launch}" tools.infer_seg --run-dir "${run}" eval.crf=true "$@" "eval.split=${seg_split}"
    echo "this shard is done (run.num_shards=${shards}); once every shard's outputs are in one run folder, score them" \
        "with: $0 RUN_DIR (without run.num_shards / run.shard_index)"
    exit 0
fi
if [[ "${task}" != stage2 ]]; then
    echo "CAM threshold sweep on ${cam_split}: GT-tuned threshold, oracle — not a protocol number"
    "${launch}" tools.evaluate --source cams --sweep "${cam[@]}"
    "${launch}" tools.evaluate --source cams --cam-key cam_aux "${cam[@]}"
    "${launch}" tools.make_pseudo_labels "${cam[@]}"
    "${launch}" tools.evaluate --source pseudo_labels "${cam[@]}"
    if [[ ${#rw[@]} -gt 0 ]]; then
        echo "random-walk pseudo labels on ${cam_split} (boundary network rw.checkpoint=${rw_source})"
        "${launch}" tools.make_pseudo_labels "${rw[@]}"
        "${launch}" tools.evaluate --source pseudo_labels_rw "${cam[@]}"
    fi
fi
seg=(--run-dir "${run}" "$@" "eval.split=${seg_split}")
"${launch}" tools.infer_seg --run-dir "${run}" eval.crf=true "$@" "eval.split=${seg_split}"
"${launch}" tools.evaluate --source seg "${seg[@]}"
"${launch}" tools.evaluate --source seg_crf "${seg[@]}"
python -m tools.report --run-dir "${run}" "$@"
