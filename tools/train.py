"""Train MSFC (SPEC §3–§6), or a second-stage segmentation network on pseudo labels (SPEC §10, ``task: stage2``), or
IRN's boundary network on relation labels (SPEC §9, ``task: irn``). One script for every dataset and stage; VOC and
COCO, stage 1, stage 2 and IRN differ only by config.

Single process:  python -m tools.train --config configs/voc.yaml data.root=... run.out_dir=runs/voc
Several GPUs:    torchrun --nproc_per_node=4 -m tools.train --config configs/voc.yaml ...   (see train_run_VOC.sh)
Resume:          the same command with train.resume=auto (or train.resume=PATH)
Second stage:    python -m tools.train --config configs/voc.yaml --config configs/stage2/voc_deeplabv2.yaml \
                     stage2.labels=RUN1/pseudo_labels/train_aug data.root=... run.out_dir=runs/voc_stage2
IRN boundary:    python -m tools.train --config configs/voc.yaml --config configs/irn/voc.yaml \
                     irn.relations=RUN1/relations/train_aug data.root=... run.out_dir=RUN1/irn

The loop is ``engine.trainer.Trainer`` (run folder, DDP, checkpoints, resume: docs/reliability.md); the method is
the ``task`` key's: ``engine.task.MSFCTask`` (msfc), ``engine.stage2.Stage2Task`` (stage2, docs/stage2.md) or
``engine.boundary.BoundaryTask`` (irn).
"""

from __future__ import annotations

import argparse
import logging
import sys

from engine.boundary import BoundaryTask
from engine.stage2 import Stage2Task
from engine.task import MSFCTask
from engine.trainer import Trainer, TrainingDiverged
from utils import dist
from utils.checkpoint import best_file
from utils.config import add_config_arguments, config_from_args
from utils.errors import exit_on_user_error

logger = logging.getLogger("tools.train")

# config key `task` -> the Task the trainer trains
TASKS = {"msfc": MSFCTask, "stage2": Stage2Task, "irn": BoundaryTask}


def _train(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    cfg = config_from_args(parser.parse_args(argv))
    trainer = None
    try:
        trainer = Trainer(cfg, TASKS[str(cfg.task)])
        best = trainer.fit()
        for metric, entry in best.items():
            if dist.is_main_process() and entry["step"] >= 0:
                logger.info("best %s %.4f at step %d (%s)", metric, entry["score"], entry["step"], best_file(metric))
        return 0
    except TrainingDiverged as err:
        logger.error("%s", err)
        return 3
    finally:
        if trainer is not None:
            trainer.close()
        dist.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Train; a user error (config, files, a busy run folder, a full disk) is one ``error:`` line and exit code 2."""
    return exit_on_user_error(lambda: _train(argv))


if __name__ == "__main__":
    sys.exit(main())
