#!/usr/bin/env bash
# Train MSFC on PASCAL VOC 2012 + SBD (configs/voc.yaml). GPUs, machines: NGPUS, NNODES, RDZV_ENDPOINT, RDZV_ID
# (scripts/launch.sh, below); on SLURM, sbatch scripts/slurm_train.sbatch sets them from the allocation.
# Usage: NGPUS=2 ./train_run_VOC.sh data.root=/data/VOCdevkit/VOC2012 run.out_dir=runs/voc [key=value ...]
#   --config FILE (repeatable) layers FILE over configs/voc.yaml: base.yaml <- voc.yaml <- FILE <- key=value.
#   Runs from any folder; --help adds the launcher's variables and every option of tools.train.
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
MSFC_WRAPPER="${BASH_SOURCE[0]}" \
    exec "${here}/scripts/launch.sh" tools.train --config "${here}/configs/voc.yaml" "$@"
