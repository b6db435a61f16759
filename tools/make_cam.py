"""Export multi-scale CAMs of a trained run (SPEC §2.1, §5.1): one compressed file per image, both branches.

    python -m tools.make_cam --run-dir RUN [key=value ...]
    torchrun --nproc_per_node=N -m tools.make_cam --run-dir RUN [key=value ...]

For every image of the split (``eval.split``, else ``data.val_split``) at full resolution, writes
``RUN/cams/<split>/<id>.npz`` with ``classes`` int16 [K] (the image's present class ids 1..C_fg, from its image
labels — the standard protocol for CAM evaluation and pseudo labels), ``cam`` and ``cam_aux`` [K, H, W] in [0, 1]
(multi-scale + flip, ``cam.scales``), stored as ``cam.file_dtype``: float16 (default) or uint8 (``round(v·255)``,
30 % of the bytes at COCO size; every reader takes both). Images without a present class get K = 0 arrays.

The file format (its writer and reader) is ``core/camfile.py``.

Optional memory fusion (SPEC §4.5, ``memory.fuse_lambda`` = λ > 0, default off): S = the bank similarity of the
scale-1.0 final tokens (``model.memory.similarity``), bilinearly upsampled to H × W; both branches become
CAM + λ·S (``models.memory.fuse_similarity``), renormalised per class to [0, 1] like §2.1
(``core.cam.normalise_per_class``: subtract the spatial min, divide by max + 1e-5).

Work is sharded over ranks (``ids[rank::world]``) and, with ``run.num_shards=N run.shard_index=i``, over machines
(machine i takes ``ids[i::N]``; ``utils.outputs.Shard``); images whose file exists are skipped (an interrupted export
resumes, a finished one does nothing); files are written atomically, and temporary files a killed export left are
swept at start. The files are compressed and written by ``cam.write_threads`` background threads while the
network works on the next images (zlib releases the GIL; at COCO size one file costs ~0.1 s of CPU, comparable to
the network's time per image on a GPU: docs/coco_eval.md). ``cams/<split>/settings.json`` records the checkpoint,
scales, λ (and a non-default ``cam.file_dtype``), and a later run with other settings is refused instead of mixing
outputs (unless the folder holds no CAM yet: then it is re-claimed; never by a sharded run).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset

from core.cam import multiscale_cam, normalise_per_class, round_to_patch
from core.camfile import FILE_DTYPES, cam_arrays
from datasets import build_dataset, collate_eval
from engine.inference import autocast
from engine.step import label_cam_precision
from models import MSFC, fuse_similarity, load_trained_model
from utils import dist
from utils.checkpoint import checkpoint_identity
from utils.config import ConfigError
from utils.io import save_npz
from utils.logging import progress_bar, setup_logging
from utils.outputs import Shard, output_dir, pending_indices, prepare_outputs, run_tool, split_name

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


def _write(path: Path, arrays: dict[str, np.ndarray]) -> int:
    """Compress and atomically write one CAM file; returns its size in bytes."""
    save_npz(path, arrays)
    return path.stat().st_size


class CamWriter:
    """Writes CAM files (``core.camfile.cam_arrays`` content) in ``threads`` background threads, in order of
    submission, while the caller computes the next maps; ``threads`` = 0 writes in the caller's thread.

    At most ``2 * threads`` files wait to be written (bounded memory). A failed write is raised in the caller at a
    later :meth:`submit` or at :meth:`close`. Leaving the ``with`` block waits for the submitted writes (each is
    atomic, so an error leaves no half-written file behind).
    """

    def __init__(self, threads: int) -> None:
        if threads < 0:
            raise ConfigError(f"cam.write_threads must be >= 0 (0 = write in the main loop), got {threads}")
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="cam-writer") if threads > 0 else None
        self.limit = 2 * threads
        self.pending: deque[Future[int]] = deque()
        self.bytes = 0  # sizes of the files written so far

    def submit(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        if self.pool is None:
            self.bytes += _write(path, arrays)
            return
        while len(self.pending) >= self.limit:
            self.bytes += self.pending.popleft().result()
        self.pending.append(self.pool.submit(_write, path, arrays))

    def close(self) -> None:
        """Wait for every submitted write (raising the first failure) and stop the threads."""
        try:
            while self.pending:
                self.bytes += self.pending.popleft().result()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
                self.pool = None

    def __enter__(self) -> CamWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        elif self.pool is not None:  # already failing: drop the queued writes, let the running ones finish
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def settings(cfg: DictConfig) -> dict:
    """What determines the exported maps; a resumed export must match it.

    ``file_dtype`` is recorded only when it is not the default float16, so folders written before the key existed
    (float16) stay resumable.
    """
    out = {
        "checkpoint": checkpoint_identity(cfg),
        "scales": [float(s) for s in cfg.cam.scales],
        "fuse_lambda": float(cfg.memory.fuse_lambda),
        "precision": label_cam_precision(str(cfg.cam.precision), str(cfg.train.precision)),
    }
    dtype = str(cfg.cam.file_dtype)  # one of FILE_DTYPES: checked when the config loads
    if dtype != FILE_DTYPES[0]:
        out["file_dtype"] = dtype
    return out


def export_cams(cfg: DictConfig) -> dict:
    """Export the split's CAMs into ``RUN/cams/<split>/`` (this rank's share); collective at the end.

    Returns:
        Summary over all ranks (of this machine): ``split``, ``folder``, ``total`` (the split), ``shard``
        (``"i/N"``), ``processed``, ``skipped``, ``seconds``, ``images_per_s``, ``bytes_per_image`` (mean size of the
        files written by this run; None when none was).
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
    shard = Shard.from_config(cfg)
    dtype = str(cfg.cam.file_dtype)  # one of FILE_DTYPES: checked when the config loads
    prepare_outputs([(folder, settings(cfg))], started, shard, dataset.ids)
    todo, skipped = pending_indices(dataset.ids, folder, ".npz", shard)
    start, written = time.time(), 0
    if todo:
        model = load_trained_model(cfg, device)
        loader = DataLoader(Subset(dataset, todo), batch_size=1, num_workers=int(cfg.data.num_workers),
                            collate_fn=collate_eval)  # fmt: skip
        scales, max_batch = tuple(float(s) for s in cfg.cam.scales), int(cfg.cam.max_batch)
        # CAMs become labels: fp32 unless cam.precision=train (SPEC §8); autocast is a no-op on CPU anyway.
        precision = label_cam_precision(str(cfg.cam.precision), str(cfg.train.precision))
        progress = progress_bar(loader, desc=f"cams {split}", disable=rank != 0, dynamic_ncols=True)
        with progress, CamWriter(int(cfg.cam.write_threads)) as writer:
            for item in progress:
                x = model.normalize(item["img"][0].to(device)[None])
                label = item["label"][0].to(device)[None]
                with autocast(device, precision):
                    cam, cam_aux = multiscale_cam(model, x, scales, max_batch)
                    if lam > 0:
                        sim = memory_similarity(model, x, label)
                        cam = normalise_per_class(fuse_similarity(cam, sim, lam))
                        cam_aux = normalise_per_class(fuse_similarity(cam_aux, sim, lam))
                # the maps leave the device here; compressing and writing them overlaps the next images
                writer.submit(folder / f"{item['name'][0]}.npz", cam_arrays(cam[0], cam_aux[0], label[0], dtype))
        written = writer.bytes
    seconds = time.time() - start
    counts = dist.all_gather_object((len(todo), skipped, seconds, written))  # also the final barrier
    processed, skipped = sum(c[0] for c in counts), sum(c[1] for c in counts)
    seconds, written = max(c[2] for c in counts), sum(c[3] for c in counts)
    summary = {
        "split": split, "folder": str(folder), "total": len(dataset.ids), "shard": str(shard),
        "processed": processed, "skipped": skipped, "seconds": seconds,
        "images_per_s": processed / seconds if processed and seconds > 0 else 0.0,
        "bytes_per_image": written / processed if processed else None,
    }  # fmt: skip
    part = f" (shard {shard}: {processed + skipped} of them)" if shard.sharded else ""
    size = f", {written / processed / 1024:.1f} KiB/image ({dtype})" if processed else ""
    logger.info(
        "make_cam %s: %d processed, %d already done (skipped), %d in the split%s | %.1f s, %.2f images/s%s | %s",
        split, processed, skipped, summary["total"], part, seconds, summary["images_per_s"], size, folder,
    )  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> int:
    return run_tool(__doc__, export_cams, argv)


if __name__ == "__main__":
    sys.exit(main())
