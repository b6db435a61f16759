"""Relation labels for IRN from saved CAMs (SPEC §9, docs/irn.md): the labels the boundary network trains on.

    python -m tools.make_cam --run-dir RUN eval.split=train_aug           # first: RUN/cams/train_aug/<id>.npz
    python -m tools.make_relations --run-dir RUN eval.split=train_aug [key=value ...]
    torchrun --nproc_per_node=N -m tools.make_relations --run-dir RUN eval.split=train_aug [key=value ...]

Reads the ``pseudo.cam_key`` branch of ``RUN/cams/<split>/<id>.npz`` (split = ``eval.split``, else
``data.val_split``) and the image, and writes ``RUN/relations/<split>/<id>.png`` (VOC colour map): class ids where
the CAMs are confidently foreground, 0 where they are confidently background, ``data.ignore_index`` (255) between
(``core.relations.relation_label``). Background planes at ``irn.fg_thre`` (0.30) and ``irn.bg_thre`` (0.05) before
the present classes' CAMs → arg-max → a label-unary DenseCRF each (``irn.crf_gt_prob`` 0.7, ``irn.crf_iters`` 10,
Gaussian ``irn.crf_gauss_sxy`` 3 / ``irn.crf_gauss_compat`` 3, bilateral ``irn.crf_bilateral_sxy`` 50 /
``irn.crf_bilateral_srgb`` 5 / ``irn.crf_bilateral_compat`` 10) → the first map's classes, 0 where both are
background, else ignore. The DenseCRF jobs (two per image with a class) are streamed through ``eval.crf_workers``
processes (0 = in this process). Train the boundary network on the folder with ``task=irn
irn.relations=RUN/relations/<split>``.

Sharded over ranks and, with ``run.num_shards=N run.shard_index=i``, over machines (``utils.outputs.Shard``; machine
i needs the CAM files of its ids only), resumable (ids whose label exists are skipped), atomic writes (temporary files
a killed run left are swept at start); ``settings.json`` in the output folder (these settings and those of the CAM
folder) refuses a resume with different settings.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from core.camfile import CAM_KEYS, read_cams
from core.pseudo_labels import check_image
from core.relations import combine_relations, relation_unaries
from tools.make_pseudo_labels import cam_inputs
from utils import dist
from utils.config import ConfigError
from utils.crf import CRFPool
from utils.errors import InputError
from utils.io import read_image, save_label_png
from utils.logging import progress_bar, setup_logging
from utils.outputs import SETTINGS_FILE, output_dir, pending_indices, prepare_outputs, run_tool

logger = logging.getLogger("tools.make_relations")

# The utils.crf.dense_crf keywords set by the irn.crf_<name> keys (irn.crf_gt_prob is the unary's, not dense_crf's).
CRF_KEYS = ("iters", "gauss_sxy", "gauss_compat", "bilateral_sxy", "bilateral_srgb", "bilateral_compat")


def relation_crf_params(cfg: DictConfig) -> dict[str, float]:
    """The ``irn.crf_*`` keys as keyword arguments of ``utils.crf.dense_crf`` / ``CRFPool``."""
    return {key: (int if key == "iters" else float)(cfg.irn[f"crf_{key}"]) for key in CRF_KEYS}


@dataclass(frozen=True)
class Options:
    """The settings of the relation labels, read once from the config (plain values)."""

    cam_key: str
    fg_thre: float
    bg_thre: float
    gt_prob: float
    crf_params: dict[str, float]

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Options:
        """``pseudo.cam_key`` and the ``irn.*`` relation-label keys; a bad value raises ``ConfigError``."""
        if cfg.pseudo.cam_key not in CAM_KEYS:
            raise ConfigError(f"pseudo.cam_key must be one of {CAM_KEYS}, got {cfg.pseudo.cam_key!r}")
        irn = cfg.irn
        if irn.bg_thre > irn.fg_thre:
            raise ConfigError(f"irn.bg_thre ({irn.bg_thre}) must not exceed irn.fg_thre ({irn.fg_thre}): the "
                              "confident-background map's plane is the lower one")  # fmt: skip
        return cls(str(cfg.pseudo.cam_key), float(irn.fg_thre), float(irn.bg_thre), float(irn.crf_gt_prob),
                   relation_crf_params(cfg))  # fmt: skip


def settings(cfg: DictConfig, opts: Options, split: str) -> dict:
    """What determines the labels: the options and, chained, the settings of the CAM folder they come from."""
    cams_settings = Path(cfg.run.out_dir) / "cams" / split / SETTINGS_FILE
    return {**vars(opts), "cams": json.loads(cams_settings.read_text()) if cams_settings.is_file() else None}


@dataclass
class Item:
    """One image on its way through the pipeline.

    ``maps`` are the (fg, bg) label-unary probabilities [K+1, H, W] of :func:`core.relations.relation_unaries`, then
    (after :func:`crf_stream`) their DenseCRF marginals; ``image`` uint8 [H, W, 3], None when K = 0 (no CRF job: the
    one-label maps are their own marginals).
    """

    name: str
    classes: np.ndarray
    image: np.ndarray | None
    maps: tuple[np.ndarray, np.ndarray]


def prepare(name: str, cam_path: Path, image_path: Path, opts: Options, num_classes: int) -> Item:
    """Read one image's CAM file (and image) and make its two label-unary maps."""
    cams = read_cams(cam_path, num_classes)
    cam = cams.maps(opts.cam_key)
    maps = relation_unaries(cam, fg_thre=opts.fg_thre, bg_thre=opts.bg_thre, gt_prob=opts.gt_prob)
    if len(cams.classes) == 0:
        return Item(name, cams.classes, None, maps)
    image = read_image(image_path)
    try:
        check_image(image, cams.size, f"image {image_path} (CAM file {cam_path})")
    except ValueError as err:  # CAMs of other images (another data.root, a stale export): a user error
        raise InputError(f"{err}; export the CAMs of these images again") from None
    return Item(name, cams.classes, image, maps)


def crf_stream(items: Iterable[Item], pool: CRFPool) -> Iterator[Item]:
    """Refine both maps of every item through ``pool`` (lazily, bounded by the pool), yielding the items in order.

    An item sends two jobs (fg, bg), or none when it has no class. Results come back in job order, so each pair
    belongs to the oldest waiting item that sent jobs, and the items waiting before it sent none.
    """
    waiting: deque[Item] = deque()

    def jobs() -> Iterator[tuple[tuple[str, int], np.ndarray, np.ndarray]]:
        for item in items:
            waiting.append(item)
            if item.image is not None:
                yield from (((item.name, s), item.image, prob) for s, prob in enumerate(item.maps))

    results = pool.imap(jobs())
    for (_, fg), (_, bg) in zip(results, results, strict=False):  # consecutive pairs of one iterator
        while waiting[0].image is None:
            yield waiting.popleft()
        item = waiting.popleft()
        item.maps = (fg, bg)
        yield item
    yield from waiting  # items without a class after the last one with


def make_relations(cfg: DictConfig) -> dict:
    """Write the split's relation labels into ``RUN/relations/<split>/`` (this rank's share); collective at the end.

    Returns:
        Summary over all ranks (of this machine): ``split``, ``folder``, ``total`` (the split), ``shard`` (``"i/N"``),
        ``processed``, ``skipped``, ``seconds``, ``images_per_s``, and ``foreground``, ``background``, ``ignored``
        (pixel fractions of the processed labels).
    """
    started = time.time()
    opts = Options.from_config(cfg)  # config mistakes before any work
    dist.init_distributed(cfg.run.device, int(cfg.run.num_threads))
    rank = dist.get_rank()
    setup_logging(cfg.run.out_dir, rank, "make_relations.log")
    split, dataset, shard, cams = cam_inputs(cfg)
    ids = dataset.ids
    folder = output_dir(cfg, "relations", split)
    prepare_outputs([(folder, settings(cfg, opts, split))], started, shard, ids)
    todo, skipped = pending_indices(ids, folder, ".png", shard)
    num_classes, ignore_index = int(cfg.data.num_classes), int(cfg.data.ignore_index)
    items = (prepare(ids[i], cams / f"{ids[i]}.npz", dataset.image_paths[i], opts, num_classes) for i in todo)
    start, pixels = time.time(), np.zeros(3, dtype=np.int64)  # foreground, background, ignored
    with CRFPool(int(cfg.eval.crf_workers), **opts.crf_params) as pool:
        progress = progress_bar(crf_stream(items, pool), total=len(todo), desc=f"relations {split}",
                                disable=rank != 0)  # fmt: skip
        with progress:  # closed however the loop ends, so an error message starts on a line of its own
            for item in progress:
                label = combine_relations(*item.maps, item.classes, ignore_index)
                save_label_png(folder / f"{item.name}.png", label)
                ignored = int((label == ignore_index).sum())
                background = int((label == 0).sum())
                pixels += (label.size - ignored - background, background, ignored)
    work = (len(todo), skipped, time.time() - start, pixels.tolist())
    done, skipped, seconds, counts = _merge(dist.all_gather_object(work))  # also the final barrier
    fractions = np.asarray(counts) / max(1, sum(counts))
    summary = {
        "split": split, "folder": str(folder), "total": len(ids), "shard": str(shard), "processed": done,
        "skipped": skipped, "seconds": seconds, "images_per_s": done / seconds if done and seconds > 0 else 0.0,
        **{key: float(f) for key, f in zip(("foreground", "background", "ignored"), fractions, strict=True)},
    }  # fmt: skip
    logger.info(
        "make_relations %s (%s, fg_thre %g, bg_thre %g, CRF gt_prob %g, %d iterations): %d processed, %d already "
        "done (skipped), %d in the split%s | %.1f%% foreground, %.1f%% background, %.1f%% ignored | %.1f s, "
        "%.2f images/s | %s",
        split, opts.cam_key, opts.fg_thre, opts.bg_thre, opts.gt_prob, opts.crf_params["iters"], done, skipped,
        len(ids), f" (shard {shard}: {done + skipped} of them)" if shard.sharded else "",
        100 * summary["foreground"], 100 * summary["background"], 100 * summary["ignored"], seconds,
        summary["images_per_s"], folder,
    )  # fmt: skip
    return summary


def _merge(per_rank: list) -> tuple[int, int, float, list[int]]:
    """(processed, skipped, seconds, pixel counts) over ranks: sums, the slowest rank's time."""
    done, skipped, seconds, counts = zip(*per_rank, strict=True)
    return sum(done), sum(skipped), max(seconds), np.sum(counts, axis=0).tolist()


def main(argv: list[str] | None = None) -> int:
    return run_tool(__doc__, make_relations, argv)


if __name__ == "__main__":
    sys.exit(main())
