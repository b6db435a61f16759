"""Pseudo labels from saved CAMs (SPEC §2.5, §9): hard palette PNGs and, optionally, compact soft labels.

    python -m tools.make_cam --run-dir RUN                      # first: RUN/cams/<split>/<id>.npz
    python -m tools.make_pseudo_labels --run-dir RUN [key=value ...]
    python -m tools.make_pseudo_labels --run-dir RUN pseudo.refine=[rw] rw.checkpoint=IRN_RUN   # -> pseudo_labels_rw
    torchrun --nproc_per_node=N -m tools.make_pseudo_labels --run-dir RUN [key=value ...]

Reads the ``pseudo.cam_key`` branch of ``RUN/cams/<split>/<id>.npz`` and writes ``RUN/<folder>/<split>/<id>.png``
(VOC colour map; 0 background, class ids, ``data.ignore_index`` (255) ignore), where ``<folder>`` is
``pseudo.folder``, or by default ``pseudo_labels`` (``pseudo_labels_rw`` when the random walk refines). Every label
is made by ``core.pseudo_labels.hard_label`` (the steps of ``core.pseudo_labels.pseudo_label``, with DenseCRF
streamed):

- single threshold (``pseudo.dual: false``): background plane at ``pseudo.bkg_thre`` (null ⇒ ``cam.bkg_thre``) +
  the class-masked CAMs → arg-max, background winning ties;
- dual (``pseudo.dual: true``): the §2.4 ignore band from planes at ``cam.high_thre`` / ``cam.low_thre``;
- ``pseudo.refine``: the refiners, applied in the order ``rw``, ``par``, ``crf`` (any subset, e.g. ``[rw]``,
  ``[par, crf]``):

  - ``rw``, IRN's random walk (SPEC §9): the boundary network of ``rw.checkpoint`` (an IRN run folder, i.e. its
    ``checkpoints/last.pth``, or a checkpoint file; ``models.boundary.load_boundary_net``, loaded once) gives each
    image's stride-4 boundary map (with its flip when ``rw.flip``), and ``core.random_walk.propagate`` (``rw.radius``
    / ``beta`` / ``exp_times`` / ``mode``) replaces the CAMs by the walked scores (divided by their global max). The
    walked scores have one background plane, ``rw.bkg_thre``, in place of ``pseudo.bkg_thre``; the dual band does
    not apply to them, so ``pseudo.dual`` is ignored (an info line says so) and the labels are single-threshold;
  - ``par`` / ``crf``: the arg-max runs on the softmax over background + present classes (of the CAMs, or of the
    walked scores), refined by PAR (``par.*``, at half resolution as in §2.4) and/or DenseCRF (``crf.*``, through
    ``eval.crf_workers`` processes, streamed); every stack is refined (both for dual);
- ``pseudo.soft``: also ``RUN/<folder>/<split>/soft/<id>.npz`` — the probabilities of the single-threshold stack
  (``pseudo.bkg_thre``, or ``rw.bkg_thre`` on the walked scores; refined like the hard label) over background +
  present classes only, ``pseudo.soft_dtype``. Expand one with ``core.pseudo_labels.load_soft_label``.

Sharded over ranks and, with ``run.num_shards=N run.shard_index=i``, over machines (machine i takes ``ids[i::N]`` and
needs the CAM files of those ids only; ``utils.outputs.Shard``), resumable (ids whose outputs exist are skipped),
atomic writes (temporary files a killed run left are swept at start); ``settings.json`` in the output folder refuses
a resume with different settings (a folder that holds no label yet is re-claimed instead, never by a sharded run):
the label rule, the refine list, the PAR / CRF / walk parameters, the CAM folder's own settings and, with ``rw``,
the boundary network's identity — its content's SHA-256 (:func:`boundary_identity`), so the same network copied
or moved elsewhere resumes and a retrained one is refused. A folder recorded before ``pseudo.refine`` existed (the
booleans ``par`` / ``crf``) is read as the list they mean. CAM files of either ``cam.file_dtype`` (float16, uint8)
are read the same way (``core.camfile.read_cams``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
from core.random_walk import propagate
from datasets import SegmentationDataset, build_dataset
from models.boundary import boundary_checkpoint, load_boundary_net
from models.par import PAR
from utils import dist
from utils.checkpoint import read_seal
from utils.config import REFINERS, ConfigError
from utils.crf import CRFPool, crf_params
from utils.io import atomic_write_json, read_image, save_label_png, save_npz
from utils.logging import progress_bar, setup_logging
from utils.outputs import SETTINGS_FILE, Shard, output_dir, pending_indices, prepare_outputs, run_tool, split_name
from utils.text import preview

logger = logging.getLogger("tools.make_pseudo_labels")

# output folder in the run when pseudo.folder is null: with the random walk, or without it
FOLDER, FOLDER_RW = "pseudo_labels", "pseudo_labels_rw"
# bytes read at a time when hashing an unsealed boundary checkpoint
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class Walk:
    """The ``rw.*`` settings of the random walk (SPEC §9); ``checkpoint`` is the boundary network's source."""

    checkpoint: str
    radius: int
    beta: float
    exp_times: int
    bkg_thre: float
    flip: bool
    mode: str

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Walk:
        rw = cfg.rw
        if rw.checkpoint is None or not str(rw.checkpoint).strip():
            raise ConfigError(
                "pseudo.refine has rw but rw.checkpoint is not set: give the boundary network, "
                "rw.checkpoint=IRN_RUN (an IRN run folder) or rw.checkpoint=FILE (its checkpoint)"
            )
        return cls(
            checkpoint=str(rw.checkpoint), radius=int(rw.radius), beta=float(rw.beta), exp_times=int(rw.exp_times),
            bkg_thre=float(rw.bkg_thre), flip=bool(rw.flip), mode=str(rw.mode),
        )  # fmt: skip

    def params(self) -> dict[str, Any]:
        """What the walk computes with, the network aside (that is :func:`boundary_identity`)."""
        return {k: v for k, v in asdict(self).items() if k != "checkpoint"}


@dataclass
class Options:
    """The ``pseudo.*`` (and ``rw.*``) settings with their fallbacks resolved (plain values, read once).

    With the random walk, ``bkg_thre`` is ``rw.bkg_thre`` and ``dual`` is False: the walked scores have one
    background plane.
    """

    cam_key: str
    bkg_thre: float
    high: float
    low: float
    dual: bool
    refine: tuple[str, ...]
    soft: bool
    soft_dtype: str
    walk: Walk | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Options:
        p = cfg.pseudo
        if p.cam_key not in CAM_KEYS:
            raise ConfigError(f"pseudo.cam_key must be one of {CAM_KEYS}, got {p.cam_key!r}")
        if p.soft_dtype not in SOFT_DTYPES:
            raise ConfigError(f"pseudo.soft_dtype must be one of {SOFT_DTYPES}, got {p.soft_dtype!r}")
        refine = tuple(str(name) for name in p.refine)
        if any(name not in REFINERS for name in refine) or list(refine) != sorted(set(refine), key=REFINERS.index):
            raise ConfigError(f"pseudo.refine must be an ordered subset of {list(REFINERS)}, got {list(refine)}")
        walk = Walk.from_config(cfg) if "rw" in refine else None
        bkg = walk.bkg_thre if walk else cfg.cam.bkg_thre if p.bkg_thre is None else p.bkg_thre
        return cls(
            cam_key=str(p.cam_key), bkg_thre=float(bkg), high=float(cfg.cam.high_thre), low=float(cfg.cam.low_thre),
            dual=bool(p.dual) and walk is None, refine=refine, soft=bool(p.soft), soft_dtype=str(p.soft_dtype),
            walk=walk,
        )  # fmt: skip

    @property
    def rw(self) -> bool:
        return "rw" in self.refine

    @property
    def par(self) -> bool:
        return "par" in self.refine

    @property
    def crf(self) -> bool:
        return "crf" in self.refine

    @property
    def thresholds(self) -> tuple[float, ...]:
        """Background planes of every stack: the hard label's, then the soft label's when it needs its own."""
        hard = label_thresholds(self.bkg_thre, self.high, self.low, self.dual)
        return (*hard, self.bkg_thre) if self.soft and self.dual else hard

    @property
    def soft_stack(self) -> int:
        """Index of the single-threshold (``bkg_thre``) stack among :attr:`thresholds`."""
        return 2 if self.dual else 0


def pseudo_folder(cfg: DictConfig, opts: Options) -> str:
    """The output folder's name in the run: ``pseudo.folder``, else ``pseudo_labels`` / ``pseudo_labels_rw``."""
    if cfg.pseudo.folder is not None:
        return str(cfg.pseudo.folder)
    return FOLDER_RW if opts.rw else FOLDER


def boundary_identity(path: Path) -> dict[str, Any]:
    """The boundary network's identity in ``settings.json``: ``{"sha256", "bytes"}`` of its checkpoint's content.

    A content hash, not the path and modification time: the same network copied to another machine or moved with its
    run folder resumes, a retrained one (or another file) is refused. A sealed checkpoint (every one the trainer
    writes, ``utils.checkpoint``) carries the SHA-256 of its content in its seal, read from the file's tail without
    reading the rest; an unsealed file is hashed whole (once per run).
    """
    seal = read_seal(path)
    if seal is not None:
        digest = seal.sha256
    else:
        hasher = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                hasher.update(chunk)
        digest = hasher.hexdigest()
    return {"sha256": digest, "bytes": path.stat().st_size}


def settings(cfg: DictConfig, opts: Options, boundary: dict[str, Any] | None = None) -> dict:
    """What determines the hard labels and soft probabilities (``boundary``: :func:`boundary_identity`, with rw).

    ``pseudo.soft`` and ``pseudo.soft_dtype`` are left out: turning soft labels on later only adds files, and their
    storage type is recorded by the ``soft/`` folder's own settings.
    """
    out: dict[str, Any] = {"cam_key": opts.cam_key, "bkg_thre": opts.bkg_thre, "high": opts.high, "low": opts.low,
                           "dual": opts.dual, "refine": list(opts.refine)}  # fmt: skip
    # the labels are only as current as the CAMs they come from: chain their settings (checkpoint identity included)
    cams_settings = Path(cfg.run.out_dir) / "cams" / split_name(cfg) / "settings.json"
    out["cams"] = json.loads(cams_settings.read_text()) if cams_settings.is_file() else None
    if opts.walk is not None:
        out["rw_params"] = opts.walk.params()
        out["rw_checkpoint"] = boundary
    if opts.par:
        out["par_params"] = OmegaConf.to_container(cfg.par, resolve=True)
    if opts.crf:
        out["crf_params"] = crf_params(cfg)
    return out


def migrate_settings(folder: Path) -> bool:
    """Rewrite a ``settings.json`` recorded before ``pseudo.refine`` (booleans ``par`` / ``crf``) as the list they
    mean, in place, so such a folder resumes (``utils.config`` reads old configs the same way). Rank 0, before the
    folder is claimed. Returns whether it rewrote the file."""
    path = folder / SETTINGS_FILE
    try:
        recorded = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):  # unreadable: check_settings explains it
        return False
    if not isinstance(recorded, dict) or "refine" in recorded or not {"par", "crf"} <= set(recorded):
        return False
    flags = {name: recorded.pop(name) for name in ("par", "crf")}
    recorded["refine"] = [name for name in REFINERS if flags.get(name) is True]
    try:
        atomic_write_json(path, recorded)
    except OSError as err:  # a read-only folder, say: check_settings then names the difference
        logger.warning("%s: could not rewrite the pre-pseudo.refine record (%s)", path, err)
        return False
    logger.info("%s: recorded with pseudo.par / pseudo.crf, read as pseudo.refine=%s", path, recorded["refine"])
    return True


@dataclass
class Prepared:
    """One image on its way through the pipeline.

    ``cam`` [K, H, W] are the CAMs of the ``classes`` [K] (their walked scores with ``rw``); ``probs``
    [S, K+1, H, W] the refined probabilities of the stacks at ``Options.thresholds`` (None when no probability is
    refined, or K = 0); ``image`` uint8 [H, W, 3] when DenseCRF refines the item (its jobs are sent by
    :meth:`Pipeline.crf_stream`), else None.
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


def cam_inputs(cfg: DictConfig) -> tuple[str, SegmentationDataset, Shard, Path]:
    """What a tool reading ``RUN/cams`` starts from: ``(split, its eval dataset, this machine's shard, the CAM folder
    checked by :func:`cam_folder`)``; every rank calls it (``build_dataset``)."""
    split = split_name(cfg)
    dataset = build_dataset(cfg, split, "eval")
    shard = Shard.from_config(cfg)
    return split, dataset, shard, cam_folder(cfg, split, dataset.ids, shard)


class Pipeline:
    """CAM file (→ random walk) (→ stacks → PAR) (→ DenseCRF) → hard label (+ soft label), one image at a time.

    ``boundary_net`` (with ``rw``): the network whose ``boundary(images uint8 [1, 3, H, W], flip) -> [1, h, w]``
    gives the stride-4 boundary probabilities the walk runs on.
    """

    def __init__(
        self, cfg: DictConfig, opts: Options, device: torch.device, boundary_net: torch.nn.Module | None = None
    ) -> None:
        if opts.rw and boundary_net is None:
            raise ValueError("Pipeline: pseudo.refine has rw, so a boundary network is needed")
        self.opts = opts
        self.device = device
        self.num_classes = int(cfg.data.num_classes)
        self.ignore_index = int(cfg.data.ignore_index)
        self.boundary_net = boundary_net if opts.rw else None
        self.par = PAR(tuple(int(d) for d in cfg.par.dilations), int(cfg.par.num_iter)) if opts.par else None
        self.crf_params = crf_params(cfg) if opts.crf else None
        self.probabilities = opts.par or opts.crf  # the arg-max runs on refined probabilities

    def walk(self, cam: torch.Tensor, image: np.ndarray) -> torch.Tensor:
        """The walked scores [K, H, W] of ``cam`` [K, H, W] on the boundary map of ``image`` uint8 [H, W, 3]."""
        walk = self.opts.walk
        with torch.no_grad():
            batch = torch.from_numpy(image).permute(2, 0, 1)[None].to(self.device)
            boundary = self.boundary_net.boundary(batch, flip=walk.flip)[0]
            return propagate(cam, boundary, radius=walk.radius, beta=walk.beta, exp_times=walk.exp_times,
                             mode=walk.mode)  # fmt: skip

    def prepare(self, index: int, name: str, cam_path: Path, image_path: Path) -> Prepared:
        cams = read_cams(cam_path, self.num_classes)
        maps = torch.from_numpy(cams.maps(self.opts.cam_key)).to(self.device)
        uses_image = self.boundary_net is not None or self.probabilities
        if not uses_image or len(cams.classes) == 0:  # K = 0: nothing to refine, every pixel is background
            return Prepared(index, name, cams.classes, maps, None, None)
        image = read_image(image_path)
        check_image(image, tuple(maps.shape[-2:]), f"image {image_path} (CAM file {cam_path})")
        if self.boundary_net is not None:
            maps = self.walk(maps, image)
        if not self.probabilities:
            return Prepared(index, name, cams.classes, maps, None, None)
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
    """Write the split's pseudo labels into ``RUN/<folder>/<split>/`` (this rank's share); collective at the end.

    Returns:
        Summary over all ranks (of this machine): ``split``, ``folder``, ``refine`` (the refiners, in order),
        ``total`` (the split), ``shard`` (``"i/N"``), ``processed``, ``skipped``, ``seconds``, ``images_per_s``,
        ``ignored`` and ``foreground`` (pixel fractions of the processed labels).
    """
    started = time.time()
    opts = Options.from_config(cfg)  # config mistakes (rw without rw.checkpoint) before any work
    device = dist.init_distributed(cfg.run.device, int(cfg.run.num_threads))
    rank = dist.get_rank()
    setup_logging(cfg.run.out_dir, rank, "make_pseudo_labels.log")
    split, dataset, shard, cams = cam_inputs(cfg)
    ids = dataset.ids
    boundary_net, identity = None, None
    if opts.walk is not None:
        if cfg.pseudo.dual:
            logger.info("pseudo.dual=true does not apply to the random walk's scores (one background plane, "
                        "rw.bkg_thre=%g): the labels are single-threshold", opts.walk.bkg_thre)  # fmt: skip
        boundary_net = load_boundary_net(opts.walk.checkpoint, device)  # names rw.checkpoint if it cannot
        identity = boundary_identity(boundary_checkpoint(opts.walk.checkpoint))
    folder = output_dir(cfg, pseudo_folder(cfg, opts), split)
    if rank == 0:
        migrate_settings(folder)
    claims = [(folder, settings(cfg, opts, identity))]
    if opts.soft:
        claims.append((folder / "soft", {"soft_dtype": opts.soft_dtype}))
    prepare_outputs(claims, started, shard, ids)
    todo, skipped = pending_indices(ids, folder, ".png", shard)
    if opts.soft:
        todo_soft, _ = pending_indices(ids, folder / "soft", ".npz", shard)
        mine = len(todo) + skipped
        todo = sorted(set(todo) | set(todo_soft))
        skipped = mine - len(todo)
    pipeline = Pipeline(cfg, opts, device, boundary_net)
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
        "split": split, "folder": str(folder), "refine": list(opts.refine), "total": len(ids), "shard": str(shard),
        "processed": processed, "skipped": skipped, "seconds": seconds,
        "images_per_s": processed / seconds if processed and seconds > 0 else 0.0,
        "ignored": float(total_pixels[1] / max(1, total_pixels[0])),
        "foreground": float(total_pixels[2] / max(1, total_pixels[0])),
    }  # fmt: skip
    rule = "dual" if opts.dual else f"bkg_thre {opts.bkg_thre:g}"
    logger.info(
        "make_pseudo_labels %s (%s, %s, refine %s%s): %d processed, %d already done (skipped), %d in the split%s | "
        "%.1f%% ignored, %.1f%% foreground | %.1f s, %.2f images/s | %s",
        split, opts.cam_key, rule, "+".join(opts.refine) or "none", ", +soft" if opts.soft else "", processed,
        skipped, len(ids), f" (shard {shard}: {processed + skipped} of them)" if shard.sharded else "",
        100 * summary["ignored"], 100 * summary["foreground"], seconds, summary["images_per_s"], folder,
    )  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> int:
    return run_tool(__doc__, make_pseudo_labels, argv)


if __name__ == "__main__":
    sys.exit(main())
