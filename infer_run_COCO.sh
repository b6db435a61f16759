#!/usr/bin/env bash
# Inference + evaluation of a trained MS-COCO 2014 run by the protocol of SPEC §8, from the final checkpoint: CAMs,
# pseudo labels and segmentation (+ DenseCRF) all scored on the full val2014 (eval.cam_split = eval.split = val);
# then the protocol table. The CAM threshold sweep is reported apart (GT-tuned threshold, oracle — not a protocol
# number). The run's config.yaml carries the COCO settings (448x448 resize, COCO thresholds and fusion); stages in
# scripts/infer_pipeline.sh, GPUs and machines in scripts/launch.sh.
# Usage: NGPUS=4 ./infer_run_COCO.sh runs/coco [key=value ...]
#   Runs from any folder; --help adds the stages (scripts/infer_pipeline.sh) and the launcher's variables.
set -euo pipefail
MSFC_WRAPPER="${BASH_SOURCE[0]}" exec "$(dirname "${BASH_SOURCE[0]}")/scripts/infer_pipeline.sh" "$@"
