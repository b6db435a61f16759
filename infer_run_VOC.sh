#!/usr/bin/env bash
# Inference + evaluation of a trained PASCAL VOC run: CAMs, pseudo labels, segmentation (+ DenseCRF), each scored.
# The run's config.yaml carries the VOC settings (full resolution, scales 1.0/1.25/1.5 + flip); stages in
# scripts/infer_pipeline.sh, GPUs and machines in scripts/launch.sh.
# Usage: NGPUS=2 ./infer_run_VOC.sh runs/voc [key=value ...]
set -euo pipefail
exec "$(dirname "$0")/scripts/infer_pipeline.sh" "$@"
