#!/usr/bin/env bash
# Train MSFC on PASCAL VOC 2012 + SBD (configs/voc.yaml). GPUs, machines: see scripts/launch.sh.
# Usage: NGPUS=2 ./train_run_VOC.sh data.root=/data/VOCdevkit/VOC2012 run.out_dir=runs/voc [key=value ...]
set -euo pipefail
exec "$(dirname "$0")/scripts/launch.sh" tools.train --config configs/voc.yaml "$@"
