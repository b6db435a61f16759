"""Export multi-scale CAMs of a trained run (SPEC §2.1, §5.1): one compressed file per image, both branches.

    python -m tools.make_cam --run-dir RUN [key=value ...]
    torchrun --nproc_per_node=N -m tools.make_cam --run-dir RUN [key=value ...]

For every image of the split (``eval.split``, else ``data.val_split``) at full resolution, writes
``RUN/cams/<split>/<id>.npz`` with ``classes`` int16 [K] (the image's present class ids 1..C_fg, from its image
labels — the standard protocol for CAM evaluation and pseudo labels), ``cam`` and ``cam_aux`` float16 [K, H, W] in
[0, 1] (multi-scale + flip, ``cam.scales``). Images without a present class get K = 0 arrays.

The file format (its writer and reader) is ``core/camfile.py``.

Optional memory fusion (SPEC §4.5, ``memory.fuse_lambda`` = λ > 0, default off): S = the bank similarity of the
scale-1.0 final tokens (``model.memory.similarity``), bilinearly upsampled to H × W; both branches become
CAM + λ·S (``models.memory.fuse_similarity``), renormalised per class to [0, 1] like §2.1
(``core.cam.normalise_per_class``: subtract the spatial min, divide by max + 1e-5).

Work is sharded over ranks (``ids[rank::world]``); images whose file exists are skipped (an interrupted export
resumes, a finished one does nothing); files are written atomically, and temporary files a killed export left are
swept at start. ``cams/<split>/settings.json`` records the checkpoint, scales and λ, and a later run with other
settings is refused instead of mixing outputs (unless the folder holds no CAM yet: then it is re-claimed).
"""

from __future__ import annotations

import logging
import sys
import time

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from core.cam import multiscale_cam, normalise_per_class, round_to_patch
from core.camfile import write_cams
from datasets import build_dataset, collate_eval
from engine.inference import autocast
from engine.step import label_cam_precision
from models import MSFC, fuse_similarity, load_trained_model
from utils import dist
from utils.checkpoint import checkpoint_identity
from utils.config import ConfigError
from utils.logging import setup_logging
from utils.outputs import output_dir, pending_indices, prepare_outputs, run_tool, split_name

logger = logging.getLogger("tools.make_cam")


@torch.no_grad()
def memory_similarity(model: MSFC, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Bank similarity S of the scale-1.0 final tokens (each side rounded to whole patches, as multiscale_cam does).

    Args:
        model: the trained network (eval mode).
        x: normalised images, [B, 3, H, W].
        labels: multi-hot image labels, [B, C_fg].

    Returns:
        S, [B, C_fg, h, w] at token resolution.
    """
    patch = model.patch_size
    size = [round_to_patch(side, patch) for side in x.shape[-2:]]
    if list(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    tokens = model(x, with_seg=False).tokens.float()
    return model.memory.similarity(tokens, labels.to(tokens.device))


def settings(cfg: DictConfig) -> dict:
    """What determines the exported maps; a resumed export must match it."""
    return {
        "checkpoint": checkpoint_identity(cfg),
        "scales": [float(s) for s in cfg.cam.scales],
        "fuse_lambda": float(cfg.memory.fuse_lambda),
        "precision": label_cam_precision(str(cfg.cam.precision), str(cfg.train.precision)),
    }


def export_cams(cfg: DictConfig) -> dict:
    """Export the split's CAMs into ``RUN/cams/<split>/`` (this rank's share); collective at the end.

    Returns:
        Summary over all ranks: ``split``, ``folder``, ``total``, ``processed``, ``skipped``, ``seconds``,
        ``images_per_s``.
    """
    started = time.time()
    lam = float(cfg.memory.fuse_lambda)
    if lam < 0:
        raise ConfigError(f"memory.fuse_lambda must be >= 0 (0 = no memory fusion), got {lam}")
    device = dist.init_distributed(cfg.run.device, int(cfg.run.num_threads))
    rank = dist.get_rank()
    setup_logging(cfg.run.out_dir, rank, "make_cam.log")
    split = split_name(cfg)
    dataset = build_dataset(cfg, split, "eval")
    folder = output_dir(cfg, "cams", split)
    prepare_outputs([(folder, settings(cfg))], started)
    todo, skipped = pending_indices(dataset.ids, folder, ".npz")
    start = time.time()
    if todo:
        model = load_trained_model(cfg, device)
        loader = DataLoader(Subset(dataset, todo), batch_size=1, num_workers=int(cfg.data.num_workers),
                            collate_fn=collate_eval)  # fmt: skip
        scales, max_batch = tuple(float(s) for s in cfg.cam.scales), int(cfg.cam.max_batch)
        # CAMs become labels: fp32 unless cam.precision=train (SPEC §8); autocast is a no-op on CPU anyway.
        precision = label_cam_precision(str(cfg.cam.precision), str(cfg.train.precision))
        with tqdm(loader, desc=f"cams {split}", disable=rank != 0, dynamic_ncols=True) as progress:
            for item in progress:
                x = model.normalize(item["img"][0].to(device)[None])
                label = item["label"][0].to(device)[None]
                with autocast(device, precision):
                    cam, cam_aux = multiscale_cam(model, x, scales, max_batch)
                    if lam > 0:
                        sim = memory_similarity(model, x, label)
                        cam = normalise_per_class(fuse_similarity(cam, sim, lam))
                        cam_aux = normalise_per_class(fuse_similarity(cam_aux, sim, lam))
                write_cams(folder / f"{item['name'][0]}.npz", cam[0], cam_aux[0], label[0])
    seconds = time.time() - start
    counts = dist.all_gather_object((len(todo), skipped, seconds))  # also the final barrier
    processed, skipped = sum(c[0] for c in counts), sum(c[1] for c in counts)
    seconds = max(c[2] for c in counts)
    summary = {
        "split": split, "folder": str(folder), "total": len(dataset.ids), "processed": processed, "skipped": skipped,
        "seconds": seconds, "images_per_s": processed / seconds if processed and seconds > 0 else 0.0,
    }  # fmt: skip
    logger.info(
        "make_cam %s: %d processed, %d already done (skipped), %d in the split | %.1f s, %.2f images/s | %s",
        split, processed, skipped, summary["total"], seconds, summary["images_per_s"], folder,
    )  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> int:
    return run_tool(__doc__, export_cams, argv)


if __name__ == "__main__":
    sys.exit(main())
