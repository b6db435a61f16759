#!/usr/bin/env bash
# Inference + evaluation of a trained MS-COCO 2014 run: CAMs, pseudo labels, segmentation (+ DenseCRF), each scored.
# The run's config.yaml carries the COCO settings (eval.split val, long side resized to 448, COCO thresholds);
# stages in scripts/infer_pipeline.sh, GPUs and machines in scripts/launch.sh.
# Usage: NGPUS=4 ./infer_run_COCO.sh runs/coco [key=value ...]
set -euo pipefail
exec "$(dirname "$0")/scripts/infer_pipeline.sh" "$@"
