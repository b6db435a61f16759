#!/usr/bin/env bash
# Train MSFC on MS-COCO 2014 (configs/coco.yaml). GPUs, machines: NGPUS, NNODES, RDZV_ENDPOINT, RDZV_ID
# (scripts/launch.sh, below); on SLURM, ENTRY=train_run_COCO.sh sbatch scripts/slurm_train.sbatch sets them.
# Usage: NGPUS=4 ./train_run_COCO.sh data.root=/data/MSCOCO run.out_dir=runs/coco [key=value ...]
#   --config FILE (repeatable) layers FILE over configs/coco.yaml: base.yaml <- coco.yaml <- FILE <- key=value.
#   Runs from any folder; --help adds the launcher's variables and every option of tools.train.
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
MSFC_WRAPPER="${BASH_SOURCE[0]}" \
    exec "${here}/scripts/launch.sh" tools.train --config "${here}/configs/coco.yaml" "$@"
