"""Segmentation inference of a trained run (SPEC §5.2): multi-scale + flip logits, optional DenseCRF.

One process:     python -m tools.infer_seg --run-dir RUN [key=value ...]
Several GPUs:    torchrun --nproc_per_node=4 -m tools.infer_seg --run-dir RUN eval.crf=true

Outputs, for split = ``eval.split`` (else ``data.val_split``):

    RUN/seg/<split>/<id>.png                 argmax of the fused logits
    RUN/seg/<split>/logits/<id>.npz          eval.save_logits=true: ``logits`` float16 [C, H, W] (compressed)
    RUN/seg_crf/<split>/<id>.png             eval.crf=true: argmax of DenseCRF(softmax(logits)) with crf.*
    RUN/seg/<split>_overlays/<id>.png        image | prediction | ground truth, first eval.num_overlays of rank 0
    RUN/seg_crf/<split>_overlays/<id>.png    the same for the CRF predictions

A split without masks (VOC ``test``: images and a list only) runs the same way; its overlays are image | prediction,
and nothing is scored (``tools/evaluate.py`` refuses such a split; ``tools/package_voc_test.py`` packages VOC test
predictions for the evaluation server).

Each prediction PNG is a palette ("P" mode) PNG whose pixel values are the class ids (0 = background): read as an
array (``utils.io.read_label_png``) it is the class-id map, shown in a viewer it is the VOC-coloured map, so one file
is both the class-id PNG and the palette PNG of SPEC §5.2. ``eval.resize`` (COCO: 448) resizes the image before the
network, as ``eval.resize_mode`` says (long_side, or square = 448x448 for COCO); logits are upsampled back, so every
output has the image's original size.

Scales, flip, fusion and the autocast precision (``eval.precision``, by default ``train.precision``; CUDA only)
come from ``eval.*``. Work is sharded over torchrun ranks (``ids[rank::world]``) and, with ``run.num_shards=N
run.shard_index=i``, over machines (machine i takes ``ids[i::N]``, its ranks split them again; the folders are those
of one machine, merged by copying or shared: ``utils.outputs.Shard``), and is resumable per output folder: an image
is skipped where its outputs exist, so a second run does no work, and a run with ``eval.crf=true`` after a plain one
only does the CRF work (recomputing the logits, never requiring saved ones). Each folder's ``settings.json`` records
what determines its outputs (checkpoint, scales, fusion, CRF parameters); resuming with other settings is refused
rather than mixing outputs (a folder that holds no prediction yet is re-claimed instead, never by a sharded run).
Temporary files a killed run left in the output folders are swept at start, and the DenseCRF workers (and their
forkserver) die with the process that started them, even when it is SIGKILLed (``utils.crf``).
CRF jobs stream through a process pool as the network produces them and results are written as they come back, so
at most a few images' probabilities are ever held in memory; with ``eval.crf`` nothing but the PNGs is written (the
logits and probabilities never touch the disk unless ``eval.save_logits=true`` asks for the logits).

DenseCRF runs over every class by default (SPEC §5.2). ``eval.crf_min_prob`` = p > 0 runs it over background and the
classes whose softmax reaches p somewhere in the image only, with their probabilities unchanged (pydensecrf's
mean-field starts from them renormalised; a per-pixel constant in the unaries changes nothing else). At COCO size a
DenseCRF costs ~3 CPU s of set-up plus ~0.13 s per class: ~13 s over 81 classes, ~3.7 s over background + 3. It is
not exact: the dropped classes' mass no longer enters the per-pixel normalisation of the mean-field, which can flip
near-ties (the demo: 0 pixels changed at p <= 0.01; docs/coco_eval.md). A p <= 1 / data.num_classes keeps every class
the network predicts somewhere.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset

from datasets import build_dataset, collate_eval
from engine.inference import autocast, autocast_name, check_resize_mode, predict_seg_logits
from models import load_trained_model
from utils import dist
from utils.checkpoint import checkpoint_identity
from utils.config import ConfigError
from utils.crf import CRFPool, crf_params
from utils.io import save_label_png, save_npz
from utils.logging import progress_bar, setup_logging
from utils.outputs import Shard, output_dir, pending_indices, prepare_outputs, run_tool, split_name
from utils.visualize import overlay, save_image, side_by_side

logger = logging.getLogger("tools.infer_seg")


@dataclass
class Folders:
    """Where the outputs of one split go; ``crf`` / ``logits`` are None when that output is off."""

    seg: Path
    seg_overlays: Path
    crf: Path | None
    crf_overlays: Path | None
    logits: Path | None

    @classmethod
    def from_config(cls, cfg: DictConfig, split: str) -> Folders:
        root = Path(cfg.run.out_dir)
        crf = bool(cfg.eval.crf)
        seg = output_dir(cfg, "seg", split)
        return cls(
            seg=seg,
            seg_overlays=root / "seg" / f"{split}_overlays",
            crf=output_dir(cfg, "seg_crf", split) if crf else None,
            crf_overlays=root / "seg_crf" / f"{split}_overlays" if crf else None,
            logits=seg / "logits" if bool(cfg.eval.save_logits) else None,
        )


@dataclass
class Plan:
    """This rank's outstanding work, as dataset indices."""

    seg: set[int]  # need the network's PNG (and/or its saved logits)
    crf: set[int]  # need the CRF PNG
    overlays: set[int]  # rank 0's first eval.num_overlays images (whether or not they are pending)
    done: int  # this rank's images with every output already present
    todo: list[int] = field(init=False)  # seg | crf, in dataset order

    def __post_init__(self) -> None:
        self.todo = sorted(self.seg | self.crf)


@dataclass
class Stats:
    """Counts and timings of this rank, for the summary.

    ``crf_seconds`` is the time the main process waited for CRF results beyond the network work done meanwhile: the
    serial CRF time with ``eval.crf_workers=0``; with a pool, the pool's start-up plus the CRF stage's excess over
    the network (near 0 when the pool keeps up).
    """

    seg_images: int = 0
    crf_images: int = 0
    net_images: int = 0
    net_seconds: float = 0.0
    producer_seconds: float = 0.0  # everything the network stage did (loading, network, writing)
    crf_seconds: float = 0.0
    crf_classes: int = 0  # classes DenseCRF ran over, summed over the CRF images (eval.crf_min_prob)
    seg_bytes: int = 0  # bytes of the seg PNGs (and saved logits) written
    crf_bytes: int = 0  # bytes of the seg_crf PNGs written
    overlays: list[Path] = field(default_factory=list)


def plan_work(cfg: DictConfig, ids: list[str], folders: Folders, shard: Shard | None = None) -> Plan:
    """Which of this rank's images still need which output (resumable per output folder).

    Overlays are drawn by rank 0 of shard 0 only, so a sharded split gets as many as an unsharded one.
    """
    shard = shard or Shard()
    seg_todo, _ = pending_indices(ids, folders.seg, ".png", shard)
    seg = set(seg_todo)
    if folders.logits is not None:
        seg |= set(pending_indices(ids, folders.logits, ".npz", shard)[0])
    crf = set(pending_indices(ids, folders.crf, ".png", shard)[0]) if folders.crf is not None else set()
    mine = shard.rank_indices(len(ids))
    draws = dist.is_main_process() and shard.index == 0
    overlays = set(mine[: int(cfg.eval.num_overlays)]) if draws else set()
    return Plan(seg=seg, crf=crf, overlays=overlays, done=len(mine) - len(seg | crf))


def crf_min_prob(cfg: DictConfig) -> float:
    """``eval.crf_min_prob``, checked (0 = DenseCRF over every class)."""
    value = float(cfg.eval.crf_min_prob)
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"eval.crf_min_prob must be a number in [0, 1] (0 = every class), got {value}")
    return value


def crf_input(logits: torch.Tensor, min_prob: float) -> tuple[np.ndarray, np.ndarray | None]:
    """DenseCRF's input for one image: the softmax of the fused logits, over every class or a subset.

    Args:
        logits: [C, H, W] fused logits.
        min_prob: 0 = every class; else background and the classes whose probability reaches it at some pixel.

    Returns:
        (prob float32 [C', H, W], the C' class ids as uint8 [C'] or None when C' = C). The kept classes'
        probabilities are not renormalised (they are DenseCRF's unaries; its mean-field renormalises them).
    """
    prob = torch.softmax(logits.float(), dim=0)
    if min_prob <= 0:
        return prob.cpu().numpy(), None
    keep = prob.flatten(1).amax(1) >= min_prob
    keep[0] = True  # background is always a candidate
    if bool(keep.all()):
        return prob.cpu().numpy(), None
    classes = torch.nonzero(keep).flatten()
    return prob[classes].cpu().numpy(), classes.cpu().numpy().astype(np.uint8)


def crf_settings(cfg: DictConfig, seg_settings: dict) -> dict:
    """What determines the seg_crf outputs: the seg settings, ``crf.*`` and a non-zero ``eval.crf_min_prob`` (left out
    at 0, so the folders of runs from before the key existed stay resumable)."""
    out = {**seg_settings, "crf": crf_params(cfg)}
    min_prob = crf_min_prob(cfg)
    if min_prob > 0:
        out["crf_min_prob"] = min_prob
    return out


def output_settings(cfg: DictConfig, device: torch.device) -> dict:
    """What determines the seg outputs; a resumed run must match it (``utils.outputs.check_settings``)."""
    ev = cfg.eval
    try:  # before settings.json can record a typo
        resize_mode = check_resize_mode(str(ev.resize_mode))
    except ValueError as err:  # a config value: one line for the user, not a traceback
        raise ConfigError(str(err)) from None
    return {
        "checkpoint": checkpoint_identity(cfg),
        "scales": [float(s) for s in ev.scales],
        "flip": bool(ev.flip),
        "flip_fusion": str(ev.flip_fusion),
        "scale_fusion": str(ev.scale_fusion),
        "resize": None if ev.resize is None else int(ev.resize),
        # None without a resize (the mode then changes nothing): full-resolution folders of earlier runs stay resumable.
        "resize_mode": None if ev.resize is None else resize_mode,
        "precision": autocast_name(device, str(cfg.eval.precision)),
    }


def _write_overlay(
    path: Path, rgb: np.ndarray, prediction: np.ndarray, gt: np.ndarray | None, title: str = "prediction"
) -> None:
    """image | prediction | ground truth (when the split has masks), side by side under a caption band naming them."""
    panels, titles = [rgb, overlay(rgb, prediction)], ["image", title]
    if gt is not None:
        panels.append(overlay(rgb, gt.astype(np.uint8)))
        titles.append("ground truth")
    save_image(path, side_by_side(panels, titles=titles))


def network_stage(
    cfg: DictConfig,
    model: torch.nn.Module,
    loader: DataLoader,
    plan: Plan,
    folders: Folders,
    device: torch.device,
    stats: Stats,
    overlay_gts: dict[str, np.ndarray | None],
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Run the network over the pending images, write the seg outputs, and yield the CRF jobs.

    Yields:
        ``(name, image uint8 [H, W, 3], softmax float32 [C', H, W], class ids [C'] | None)`` for every image that
        needs its CRF output (:func:`crf_input`: C' = C and None unless ``eval.crf_min_prob`` > 0). The ground truth
        of overlay images is parked in ``overlay_gts`` until their CRF result comes back.
    """
    ev = cfg.eval
    min_prob = crf_min_prob(cfg)
    progress = progress_bar(total=len(plan.todo), desc="infer_seg", disable=not dist.is_main_process())
    start = time.perf_counter()
    try:
        for index, item in zip(plan.todo, loader, strict=True):
            name, image = item["name"][0], item["img"][0]
            gt = item["mask"][0].numpy() if "mask" in item else None
            tick = time.perf_counter()
            with autocast(device, str(cfg.eval.precision)):
                logits = predict_seg_logits(model, image.to(device)[None], tuple(ev.scales), bool(ev.flip),
                                            str(ev.flip_fusion), str(ev.scale_fusion), ev.resize,
                                            resize_mode=str(ev.resize_mode))[0]  # fmt: skip
            prediction = logits.argmax(0).to(torch.uint8).cpu().numpy()  # .cpu() waits for the device: timing is exact
            stats.net_seconds += time.perf_counter() - tick
            stats.net_images += 1
            rgb = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
            if index in plan.seg:
                save_label_png(folders.seg / f"{name}.png", prediction)
                stats.seg_bytes += (folders.seg / f"{name}.png").stat().st_size
                if folders.logits is not None:
                    save_npz(folders.logits / f"{name}.npz", {"logits": logits.to(torch.float16).cpu().numpy()})
                    stats.seg_bytes += (folders.logits / f"{name}.npz").stat().st_size
                if index in plan.overlays:
                    _write_overlay(folders.seg_overlays / f"{name}.png", rgb, prediction, gt)
                    stats.overlays.append(folders.seg_overlays / f"{name}.png")
                stats.seg_images += 1
            progress.update(1)
            if index in plan.crf:
                if index in plan.overlays:
                    overlay_gts[name] = gt
                prob, classes = crf_input(logits, min_prob)
                stats.producer_seconds += time.perf_counter() - start
                yield name, rgb, prob, classes
                start = time.perf_counter()
        stats.producer_seconds += time.perf_counter() - start
    finally:  # however the stage ends, so an error message starts on a line of its own
        progress.close()


def crf_stage(
    cfg: DictConfig,
    jobs: Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]],
    folders: Folders,
    stats: Stats,
    overlay_gts: dict[str, np.ndarray | None],
) -> None:
    """Refine ``jobs`` with DenseCRF in a pool of ``eval.crf_workers`` processes, writing results as they arrive."""
    rgbs: dict[str, np.ndarray] = {}  # images of pending overlay jobs only (bounded by eval.num_overlays)
    subsets: dict[str, np.ndarray] = {}  # class ids of the jobs in flight that run over a subset (crf_min_prob)

    def keep_overlay_images() -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        for name, rgb, prob, classes in jobs:
            if name in overlay_gts:
                rgbs[name] = rgb
            if classes is not None:
                subsets[name] = classes
            stats.crf_classes += len(prob)
            yield name, rgb, prob

    with CRFPool(int(cfg.eval.crf_workers), **crf_params(cfg)) as pool:
        results = pool.imap(keep_overlay_images())
        while True:
            tick, produced = time.perf_counter(), stats.producer_seconds
            try:
                name, refined = next(results)
            except StopIteration:
                break
            # Time spent inside next() minus the network work it triggered = time blocked on the CRF.
            stats.crf_seconds += (time.perf_counter() - tick) - (stats.producer_seconds - produced)
            label = refined.argmax(0).astype(np.uint8)
            if name in subsets:
                label = subsets.pop(name)[label]
            save_label_png(folders.crf / f"{name}.png", label)
            stats.crf_bytes += (folders.crf / f"{name}.png").stat().st_size
            if name in overlay_gts:
                path = folders.crf_overlays / f"{name}.png"
                _write_overlay(path, rgbs.pop(name), label, overlay_gts.pop(name), "prediction + DenseCRF")
                stats.overlays.append(path)
            stats.crf_images += 1


def _summarise(stats: Stats, plan_done: int, device: torch.device, split: str, crf: bool) -> None:
    """Log totals over all ranks: written/skipped images and images/s of the network and of the CRF."""
    values = [stats.seg_images, stats.crf_images, stats.net_images, stats.net_seconds, stats.crf_seconds, plan_done,
              stats.seg_bytes, stats.crf_bytes, stats.crf_classes]  # fmt: skip
    totals = dist.all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=device)).tolist()
    seg_images, crf_images, net_images, net_seconds, crf_seconds, done, seg_bytes, crf_bytes, classes = totals
    world = dist.get_world_size()
    # Seconds are summed over ranks, so images / seconds is the per-process rate; times world is the aggregate.
    net_rate = net_images / net_seconds if net_seconds > 0 else 0.0
    logger.info(
        "split %s: wrote %d seg and %d seg_crf prediction(s); %d image(s) were already complete | network: %d "
        "image(s), %.2f img/s per process (%d process(es))", split, seg_images, crf_images, done, net_images,
        net_rate, world,
    )  # fmt: skip
    if seg_images:
        logger.info("seg: %.1f KiB written per image (PNG, and logits when saved)", seg_bytes / seg_images / 1024)
    if crf and crf_images:
        crf_rate = f"{crf_images / crf_seconds:.2f} img/s" if crf_seconds > 1e-3 else "kept up with the network"
        logger.info("DenseCRF: %d image(s) over %.1f classes on average, %.1f s waited per process on average: %s; "
                    "%.1f KiB per seg_crf PNG", crf_images, classes / crf_images, crf_seconds / world, crf_rate,
                    crf_bytes / crf_images / 1024)  # fmt: skip
    if stats.overlays:
        logger.info("overlays: %s", ", ".join(sorted({str(p.parent) for p in stats.overlays})))


def run_inference(cfg: DictConfig) -> Stats:
    """Everything but argument parsing: the tool for an already-loaded config (also used by tests)."""
    started = time.time()
    device = dist.init_distributed(str(cfg.run.device), int(cfg.run.num_threads))
    rank = dist.get_rank()
    setup_logging(cfg.run.out_dir, rank, "infer_seg.log")
    split = split_name(cfg)
    dataset = build_dataset(cfg, split, "eval")
    if not dataset.has_masks:
        logger.info("split %s has no ground-truth masks: predictions only, overlays show image | prediction", split)
    folders = Folders.from_config(cfg, split)
    # Outputs are skipped where they exist, so refuse to mix in outputs made with other settings.
    seg_settings = output_settings(cfg, device)
    claims = [(folders.seg, seg_settings), (folders.seg_overlays, None)]
    if folders.crf is not None:
        claims += [(folders.crf, crf_settings(cfg, seg_settings)), (folders.crf_overlays, None)]
    shard = Shard.from_config(cfg)
    prepare_outputs(claims, started, shard, dataset.ids)
    plan = plan_work(cfg, dataset.ids, folders, shard)
    stats = Stats()
    pending = dist.all_reduce_sum(torch.tensor([len(plan.todo)], dtype=torch.int64, device=device)).item()
    outputs = ", ".join(str(p) for p in (folders.seg, folders.logits, folders.crf) if p is not None)
    total = len(dataset.ids)
    part = f" shard {shard} ({len(shard.indices(total))} of {total} ids)" if shard.sharded else ""
    if pending == 0:
        logger.info("nothing to do: all %d image(s) of split %s%s already have their outputs in %s",
                    len(shard.indices(total)), split, part, outputs)  # fmt: skip
        return stats
    logger.info("split %s%s: %d image(s) to process (%d on this rank, %d already complete here) -> %s", split, part,
                pending, len(plan.todo), plan.done, outputs)  # fmt: skip
    if plan.todo:
        model = load_trained_model(cfg, device)
        loader = DataLoader(Subset(dataset, plan.todo), batch_size=1, num_workers=int(cfg.data.num_workers),
                            collate_fn=collate_eval)  # fmt: skip
        overlay_gts: dict[str, np.ndarray | None] = {}
        with torch.no_grad():
            jobs = network_stage(cfg, model, loader, plan, folders, device, stats, overlay_gts)
            if plan.crf:
                crf_stage(cfg, jobs, folders, stats, overlay_gts)
            else:
                for _ in jobs:  # no CRF work: draining the generator writes the seg outputs
                    pass
    _summarise(stats, plan.done, device, split, folders.crf is not None)
    dist.barrier()
    return stats


def main(argv: list[str] | None = None) -> int:
    return run_tool(__doc__, run_inference, argv)


if __name__ == "__main__":  # the guard matters: CRF pool processes import this module as __mp_main__
    sys.exit(main())
