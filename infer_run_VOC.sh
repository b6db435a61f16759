#!/usr/bin/env bash
# Inference + evaluation of a trained PASCAL VOC run by the protocol of SPEC §8, from the final checkpoint: CAMs and
# pseudo labels scored on train (1,464 images, SegmentationClass) at cam.bkg_thre, segmentation (+ DenseCRF) on val;
# then the protocol table. The CAM threshold sweep is reported apart (GT-tuned threshold, oracle — not a protocol
# number). The run's config.yaml carries the VOC settings (full resolution, scales 1.0/1.25/1.5 + flip); stages in
# scripts/infer_pipeline.sh (eval.cam_split / eval.split / eval.checkpoint), GPUs and machines in scripts/launch.sh.
# Usage: NGPUS=2 ./infer_run_VOC.sh runs/voc [key=value ...]
#   Runs from any folder; --help adds the stages (scripts/infer_pipeline.sh) and the launcher's variables.
#   SPLIT=test ./infer_run_VOC.sh runs/voc: the VOC 2012 test server instead (test images have no masks, so nothing is
#   scored here): segmentation with DenseCRF on eval.split=test, then tools/package_voc_test.py --crf writes
#   RUN/test_server/results.tgz to upload (README, "VOC test server").
set -euo pipefail
MSFC_WRAPPER="${BASH_SOURCE[0]}" exec "$(dirname "${BASH_SOURCE[0]}")/scripts/infer_pipeline.sh" "$@"
