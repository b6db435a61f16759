#!/usr/bin/env bash
# Train MSFC on MS-COCO 2014 (configs/coco.yaml). GPUs, machines: see scripts/launch.sh.
# Usage: NGPUS=4 ./train_run_COCO.sh data.root=/data/MSCOCO run.out_dir=runs/coco [key=value ...]
set -euo pipefail
exec "$(dirname "$0")/scripts/launch.sh" tools.train --config configs/coco.yaml "$@"
