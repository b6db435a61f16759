"""Pseudo labels from saved CAMs (SPEC §2.5): hard palette PNGs and, optionally, compact soft labels.

    python -m tools.make_cam --run-dir RUN                      # first: RUN/cams/<split>/<id>.npz
    python -m tools.make_pseudo_labels --run-dir RUN [key=value ...]
    torchrun --nproc_per_node=N -m tools.make_pseudo_labels --run-dir RUN [key=value ...]

Reads the ``pseudo.cam_key`` branch of ``RUN/cams/<split>/<id>.npz`` and writes ``RUN/pseudo_labels/<split>/<id>.png``
(VOC colour map; 0 background, class ids, ``data.ignore_index`` (255) ignore), every label made by
``core.pseudo_labels.hard_label`` (the steps of ``core.pseudo_labels.pseudo_label``, with DenseCRF streamed):

- single threshold (``pseudo.dual: false``): background plane at ``pseudo.bkg_thre`` (null ⇒ ``cam.bkg_thre``) +
  the class-masked CAMs → arg-max, background winning ties;
- dual (``pseudo.dual: true``): the §2.4 ignore band from planes at ``cam.high_thre`` / ``cam.low_thre``;
- ``pseudo.par`` / ``pseudo.crf``: the arg-max runs on the softmax over background + present classes, refined by PAR
  (``par.*``, at half resolution as in §2.4) and/or DenseCRF (``crf.*``, through ``eval.crf_workers`` processes,
  streamed); every stack is refined (both for dual);
- ``pseudo.soft``: also ``RUN/pseudo_labels/<split>/soft/<id>.npz`` — the probabilities of the single-threshold stack
  (``pseudo.bkg_thre``; refined like the hard label) over background + present classes only, ``pseudo.soft_dtype``.
  Expand one with ``core.pseudo_labels.load_soft_label``.

Sharded over ranks and, with ``run.num_shards=N run.shard_index=i``, over machines (machine i takes ``ids[i::N]`` and
needs the CAM files of those ids only; ``utils.outputs.Shard``), resumable (ids whose outputs exist are skipped),
atomic writes (temporary files a killed run left are swept at start); ``settings.json`` in the output folder refuses
a resume with different settings (a folder that holds no label yet is re-claimed instead, never by a sharded run).
CAM files of either ``cam.file_dtype`` (float16, uint8) are read the same way (``core.camfile.read_cams``).
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
import torch
from omegaconf import DictConfig, OmegaConf

from core.camfile import CAM_KEYS, read_cams
from core.pseudo_labels import (
    SOFT_DTYPES,
    check_image,
    hard_label,
    label_thresholds,
    rgb01,
    score_stacks,
    soft_label,
    stack_probabilities,
)
from datasets import build_dataset
from models.par import PAR
from utils import dist
from utils.config import ConfigError
from utils.crf import CRFPool, crf_params
from utils.io import read_image, save_label_png, save_npz
from utils.logging import progress_bar, setup_logging
from utils.outputs import Shard, output_dir, pending_indices, prepare_outputs, run_tool, split_name
from utils.text import preview

logger = logging.getLogger("tools.make_pseudo_labels")


@dataclass
class Options:
    """The ``pseudo.*`` settings with their fallbacks resolved (plain values, read once from the config)."""

    cam_key: str
    bkg_thre: float
    high: float
    low: float
    dual: bool
    par: bool
    crf: bool
    soft: bool
    soft_dtype: str

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Options:
        p = cfg.pseudo
        if p.cam_key not in CAM_KEYS:
            raise ConfigError(f"pseudo.cam_key must be one of {CAM_KEYS}, got {p.cam_key!r}")
        if p.soft_dtype not in SOFT_DTYPES:
            raise ConfigError(f"pseudo.soft_dtype must be one of {SOFT_DTYPES}, got {p.soft_dtype!r}")
        bkg = cfg.cam.bkg_thre if p.bkg_thre is None else p.bkg_thre
        return cls(
            cam_key=str(p.cam_key), bkg_thre=float(bkg), high=float(cfg.cam.high_thre), low=float(cfg.cam.low_thre),
            dual=bool(p.dual), par=bool(p.par), crf=bool(p.crf), soft=bool(p.soft), soft_dtype=str(p.soft_dtype),
        )  # fmt: skip

    @property
    def thresholds(self) -> tuple[float, ...]:
        """Background planes of every stack: the hard label's, then the soft label's when it needs its own."""
        hard = label_thresholds(self.bkg_thre, self.high, self.low, self.dual)
        return (*hard, self.bkg_thre) if self.soft and self.dual else hard

    @property
    def soft_stack(self) -> int:
        """Index of the single-threshold (``bkg_thre``) stack among :attr:`thresholds`."""
        return 2 if self.dual else 0


def settings(cfg: DictConfig, opts: Options) -> dict:
    """What determines the hard labels and soft probabilities.

    ``pseudo.soft`` and ``pseudo.soft_dtype`` are left out: turning soft labels on later only adds files, and their
    storage type is recorded by the ``soft/`` folder's own settings.
    """
    out = {k: v for k, v in vars(opts).items() if k not in ("soft", "soft_dtype")}
    # the labels are only as current as the CAMs they come from: chain their settings (checkpoint identity included)
    cams_settings = Path(cfg.run.out_dir) / "cams" / split_name(cfg) / "settings.json"
    out["cams"] = json.loads(cams_settings.read_text()) if cams_settings.is_file() else None
    if opts.par:
        out["par_params"] = OmegaConf.to_container(cfg.par, resolve=True)
    if opts.crf:
        out["crf_params"] = crf_params(cfg)
    return out


@dataclass
class Prepared:
    """One image on its way through the pipeline.

    ``cam`` [K, H, W] are the CAMs of the ``classes`` [K]; ``probs`` [S, K+1, H, W] the refined probabilities of the
    stacks at ``Options.thresholds`` (None when nothing is refined, or K = 0); ``image`` uint8 [H, W, 3] when DenseCRF
    refines the item (its jobs are sent by :meth:`Pipeline.crf_stream`), else None.
    """

    index: int
    name: str
    classes: np.ndarray
    cam: torch.Tensor
    probs: torch.Tensor | np.ndarray | None
    image: np.ndarray | None


def cam_folder(cfg: DictConfig, split: str, ids: list[str], shard: Shard | None = None) -> Path:
    """``RUN/cams/<split>``, checked to hold a CAM file for every id of the split (of this machine's ``shard``)."""
    shard = shard or Shard()
    folder = Path(cfg.run.out_dir) / "cams" / split
    part = f" run.num_shards={shard.count} run.shard_index={shard.index}" if shard.sharded else ""
    command = f"python -m tools.make_cam --run-dir {cfg.run.out_dir}{part}"
    if not folder.is_dir() or not any(folder.glob("*.npz")):
        raise FileNotFoundError(f"no CAM files in {folder}: export them first with `{command}` (eval.split={split})")
    on_disk = {p.stem for p in folder.glob("*.npz")}
    missing = [i for i in shard.ids(ids) if i not in on_disk]
    if missing:
        where = f"shard {shard} of split {split!r}" if shard.sharded else f"split {split!r}"
        raise FileNotFoundError(
            f"{len(missing)} id(s) of {where} have no CAM file {folder}/<id>.npz: {preview(missing)}; "
            f"finish the export with `{command}`"
        )
    return folder


class Pipeline:
    """CAM file (→ stacks → PAR) (→ DenseCRF) → hard label (+ soft label), one image at a time."""

    def __init__(self, cfg: DictConfig, opts: Options, device: torch.device) -> None:
        self.opts = opts
        self.device = device
        self.num_classes = int(cfg.data.num_classes)
        self.ignore_index = int(cfg.data.ignore_index)
        self.par = PAR(tuple(int(d) for d in cfg.par.dilations), int(cfg.par.num_iter)) if opts.par else None
        self.crf_params = crf_params(cfg) if opts.crf else None
        self.refine = opts.par or opts.crf

    def prepare(self, index: int, name: str, cam_path: Path, image_path: Path) -> Prepared:
        cams = read_cams(cam_path, self.num_classes)
        maps = torch.from_numpy(cams.maps(self.opts.cam_key)).to(self.device)
        if not self.refine or len(cams.classes) == 0:  # K = 0: nothing to refine, every pixel is background
            return Prepared(index, name, cams.classes, maps, None, None)
        image = read_image(image_path)
        check_image(image, tuple(maps.shape[-2:]), f"image {image_path} (CAM file {cam_path})")
        probs = stack_probabilities(maps, self.opts.thresholds, rgb01(image, self.device), self.par)
        return Prepared(index, name, cams.classes, maps, probs, image if self.crf_params is not None else None)

    def crf_stream(self, items: Iterable[Prepared], pool: CRFPool) -> Iterator[Prepared]:
        """Refine every stack of every item through ``pool`` (lazily, bounded by the pool), in order."""
        waiting: deque[Prepared] = deque()
        done: dict[int, list[np.ndarray]] = {}

        def jobs() -> Iterator[tuple[tuple[int, int], np.ndarray, np.ndarray]]:
            for item in items:
                waiting.append(item)
                if item.image is not None:
                    for s, prob in enumerate(item.probs.cpu().numpy()):
                        yield (item.index, s), item.image, prob

        def complete(item: Prepared) -> bool:  # items without an image (K = 0) send no job
            return item.image is None or len(done.get(item.index, ())) == len(item.probs)

        def ready() -> Iterator[Prepared]:
            # results arrive in job order, so only the oldest waiting item can be the next to complete
            while waiting and complete(waiting[0]):
                item = waiting.popleft()
                if item.image is not None:
                    item.probs = np.stack(done.pop(item.index))
                yield item

        for (index, _), refined in pool.imap(jobs()):
            done.setdefault(index, []).append(refined)
            yield from ready()
        yield from ready()

    def finish(self, item: Prepared) -> tuple[np.ndarray, dict | None]:
        """(hard label uint8 [H, W], soft-label arrays or None)."""
        opts = self.opts
        label = hard_label(item.cam, item.classes, opts.thresholds, opts.dual, item.probs, self.ignore_index)
        if not opts.soft:
            return label, None
        if item.probs is not None:
            prob = torch.as_tensor(item.probs[opts.soft_stack]).float()
        else:
            prob = score_stacks(item.cam, (opts.bkg_thre,))[0].softmax(dim=0)
        return label, soft_label(prob, item.classes, opts.soft_dtype)


def make_pseudo_labels(cfg: DictConfig) -> dict:
    """Write the split's pseudo labels into ``RUN/pseudo_labels/<split>/`` (this rank's share); collective at the end.

    Returns:
        Summary over all ranks (of this machine): ``split``, ``folder``, ``total`` (the split), ``shard`` (``"i/N"``),
        ``processed``, ``skipped``, ``seconds``, ``images_per_s``, ``ignored`` and ``foreground`` (pixel fractions of
        the processed labels).
    """
    started = time.time()
    device = dist.init_distributed(cfg.run.device, int(cfg.run.num_threads))
    rank = dist.get_rank()
    setup_logging(cfg.run.out_dir, rank, "make_pseudo_labels.log")
    opts = Options.from_config(cfg)
    split = split_name(cfg)
    dataset = build_dataset(cfg, split, "eval")
    ids = dataset.ids
    shard = Shard.from_config(cfg)
    cams = cam_folder(cfg, split, ids, shard)
    folder = output_dir(cfg, "pseudo_labels", split)
    claims = [(folder, settings(cfg, opts))]
    if opts.soft:
        claims.append((folder / "soft", {"soft_dtype": opts.soft_dtype}))
    prepare_outputs(claims, started, shard, ids)
    todo, skipped = pending_indices(ids, folder, ".png", shard)
    if opts.soft:
        todo_soft, _ = pending_indices(ids, folder / "soft", ".npz", shard)
        mine = len(todo) + skipped
        todo = sorted(set(todo) | set(todo_soft))
        skipped = mine - len(todo)
    pipeline = Pipeline(cfg, opts, device)
    start, pixels = time.time(), np.zeros(3, dtype=np.int64)  # all, ignored, foreground
    items = (pipeline.prepare(i, ids[i], cams / f"{ids[i]}.npz", dataset.image_paths[i]) for i in todo)
    workers = int(cfg.eval.crf_workers) if opts.crf else 0
    with CRFPool(workers, **(pipeline.crf_params or {})) as pool:
        stream = pipeline.crf_stream(items, pool) if opts.crf else items
        progress = progress_bar(stream, total=len(todo), desc=f"pseudo {split}", disable=rank != 0, dynamic_ncols=True)
        with progress:  # closed however the loop ends, so an error message starts on a line of its own
            for item in progress:
                label, soft = pipeline.finish(item)
                if soft is not None:
                    save_npz(folder / "soft" / f"{item.name}.npz", soft)
                save_label_png(folder / f"{item.name}.png", label)
                ignored = label == pipeline.ignore_index
                pixels += (label.size, int(ignored.sum()), int(((label > 0) & ~ignored).sum()))
    seconds = time.time() - start
    counts = dist.all_gather_object((len(todo), skipped, seconds, pixels.tolist()))  # also the final barrier
    processed, skipped = sum(c[0] for c in counts), sum(c[1] for c in counts)
    seconds = max(c[2] for c in counts)
    total_pixels = np.sum([c[3] for c in counts], axis=0)
    summary = {
        "split": split, "folder": str(folder), "total": len(ids), "shard": str(shard), "processed": processed,
        "skipped": skipped, "seconds": seconds,
        "images_per_s": processed / seconds if processed and seconds > 0 else 0.0,
        "ignored": float(total_pixels[1] / max(1, total_pixels[0])),
        "foreground": float(total_pixels[2] / max(1, total_pixels[0])),
    }  # fmt: skip
    logger.info(
        "make_pseudo_labels %s (%s, %s%s%s%s): %d processed, %d already done (skipped), %d in the split%s | "
        "%.1f%% ignored, %.1f%% foreground | %.1f s, %.2f images/s | %s",
        split, opts.cam_key, "dual" if opts.dual else f"bkg_thre {opts.bkg_thre}", " +PAR" if opts.par else "",
        " +CRF" if opts.crf else "", " +soft" if opts.soft else "", processed, skipped, len(ids),
        f" (shard {shard}: {processed + skipped} of them)" if shard.sharded else "",
        100 * summary["ignored"], 100 * summary["foreground"], seconds, summary["images_per_s"], folder,
    )  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> int:
    return run_tool(__doc__, make_pseudo_labels, argv)


if __name__ == "__main__":
    sys.exit(main())
