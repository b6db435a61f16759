"""Evaluate a run's CAMs, pseudo labels or segmentation predictions against the ground-truth masks (SPEC §5.3).

    python -m tools.evaluate --run-dir RUN --source cams|pseudo_labels|pseudo_labels_rw|seg|seg_crf [--sweep]
                             [--cam-key cam|cam_aux] [--tag T] [key=value ...]
    torchrun --nproc_per_node=4 -m tools.evaluate --run-dir RUN --source seg     (sharded, matrices all-reduced)

Reads ``RUN/<source>/<split>/<id>.{npz,png}`` for every image of the split (``eval.split``, else
``data.val_split``) and compares it with the split's masks (``datasets.build_dataset(cfg, split, "eval")``):

- ``cams``: the saved CAMs (``core.camfile.read_cams``) of branch ``--cam-key`` (default ``cam``) become labels by a
  constant background plane at ``cam.bkg_thre`` (``core.labels.cam_label``). ``--sweep`` instead accumulates (with
  ``core.labels.CamThresholdSweep``, the same rule) one confusion matrix per background threshold
  ``eval.sweep_start..eval.sweep_stop`` (inclusive) step ``eval.sweep_step`` in one pass, reports the best threshold
  and plots the curve. That threshold is chosen on the ground truth being scored: a GT-tuned
  oracle, never a protocol number (SPEC §8 reports ``cam.bkg_thre``); the sweep JSON says so in ``note``.
- ``pseudo_labels``: label PNGs that may hold ``data.ignore_index`` (255: "no label", the ignore band of SPEC
  §2.4/§2.5). ``miou`` counts those pixels as background, a conservative score comparable with single-threshold
  labels; ``labelled_miou`` scores only the pixels that received a label, and ``coverage`` is the fraction of valid
  ground-truth pixels that did.
- ``pseudo_labels_rw``: the random-walk pseudo labels (``tools.make_pseudo_labels pseudo.refine=[rw]``, folder
  ``pseudo_labels_rw``), scored exactly like ``pseudo_labels``.
- ``seg`` / ``seg_crf``: the prediction PNGs of ``tools.infer_seg``.

Every metric comes from one int64 confusion matrix per split (mIoU over the classes with ground truth, pixel and
mean accuracy, per-class IoU / precision / recall and FP / FN shares). Rank 0 prints the per-class table and writes
``RUN/eval/<name>_<split>.json`` (with ``--sweep`` also ``<name>_<split>_sweep.json`` and ``.png``), where ``<name>`` is
the source, or ``cams_aux`` for ``--cam-key cam_aux``. With ``eval.results_log=FILE`` one JSON line
``{tag, time, run, source, split, miou, ...}`` is appended to FILE (``--tag`` defaults to the name). The
``checkpoint`` recorded is the one ``eval.checkpoint`` resolves to now (None if the run has none).

A missing or malformed prediction, a bad option or config value ends the tool with one ``error: ...`` line naming the
file or key and exit code 2 (``utils.errors``); missing predictions are listed (the first few ids and their count).
A split without masks (VOC ``test``) is refused before any work, pointing to ``tools/package_voc_test.py``.

Outputs made on several machines (``run.num_shards``, ``utils.outputs.Shard``) are scored once every shard's files
are in the run folder (copied there, or written to a shared one): the tool always scores the whole split, whatever
``run.shard_index`` / ``run.num_shards`` say, sharding only over its own torchrun ranks. CAM files of either
``cam.file_dtype`` are read the same way (``core.camfile.read_cams``).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from core.camfile import CAM_KEYS, read_cams
from core.labels import CamThresholdSweep, cam_label
from datasets import build_dataset
from datasets.classes import class_names
from utils import dist
from utils.checkpoint import resolve_checkpoint
from utils.config import ConfigError, add_config_arguments, config_from_args
from utils.errors import InputError, exit_on_user_error
from utils.io import atomic_write_json, read_label_png
from utils.logging import setup_logging
from utils.metrics import ConfusionMatrix, format_table
from utils.outputs import split_name, sweep_temp_files
from utils.text import preview
from utils.visualize import plot_sweep

logger = logging.getLogger("tools.evaluate")

T = TypeVar("T")
R = TypeVar("R")
CamMaps = tuple[np.ndarray, np.ndarray]  # (cams float32 [K, H, W], class ids int64 [K])
SWEEP_NOTE = "GT-tuned threshold, oracle — not a protocol number"
# Sources whose labels may leave pixels unlabelled (data.ignore_index): scored with and without them
PSEUDO_SOURCES = ("pseudo_labels", "pseudo_labels_rw")


@dataclass(frozen=True)
class Source:
    """Where a kind of prediction lives in the run folder and which tool produces it."""

    folder: str
    suffix: str
    command: str  # appended to ``python -m`` in error hints
    overrides: str = ""  # the producing tool's key=value arguments, after its --run-dir


SOURCES: dict[str, Source] = {
    "cams": Source("cams", ".npz", "tools.make_cam"),
    "pseudo_labels": Source("pseudo_labels", ".png", "tools.make_pseudo_labels"),
    "pseudo_labels_rw": Source(
        "pseudo_labels_rw", ".png", "tools.make_pseudo_labels", " pseudo.refine=[rw] rw.checkpoint=IRN_RUN"
    ),
    "seg": Source("seg", ".png", "tools.infer_seg"),
    "seg_crf": Source("seg_crf", ".png", "tools.infer_seg", " eval.crf=true"),
}


# ---------------------------------------------------------------------------------------------- reading


def ordered_map(fn: Callable[[T], R], items: Iterable[T], pool: ThreadPoolExecutor, ahead: int) -> Iterator[R]:
    """``map(fn, items)`` on ``pool`` in input order, with at most ``ahead`` results decoded ahead of the consumer.

    ``Executor.map`` would submit every item at once and could hold a whole split's decoded arrays in memory.
    """
    pending: collections.deque[Future] = collections.deque()
    for item in items:
        if len(pending) >= ahead:
            yield pending.popleft().result()
        pending.append(pool.submit(fn, item))
    while pending:
        yield pending.popleft().result()


def cam_maps(path: Path, key: str, num_classes: int) -> CamMaps:
    """Branch ``key`` of one saved CAM file (:func:`core.camfile.read_cams`): (cams [K, H, W], classes [K])."""
    cams = read_cams(path, num_classes)
    return cams.maps(key), cams.classes


def png_predictions(folder: Path, ids: Sequence[str], pool: ThreadPoolExecutor, ahead: int) -> Iterator[tuple]:
    """seg / seg_crf / pseudo_labels(_rw): yields ``(id, label uint8 [H, W])`` from ``folder/<id>.png``."""
    labels = ordered_map(lambda name: read_label_png(folder / f"{name}.png"), ids, pool, ahead)
    return zip(ids, labels, strict=True)


def cam_label_predictions(
    folder: Path, ids: Sequence[str], pool: ThreadPoolExecutor, ahead: int, key: str, threshold: float,
    num_classes: int, ignore_index: int,
) -> Iterator[tuple]:  # fmt: skip
    """cams at one background threshold: yields ``(id, label uint8 [H, W])``, labelled in the worker threads."""

    def label(name: str) -> np.ndarray:
        cams, classes = cam_maps(folder / f"{name}.npz", key, num_classes)
        return cam_label(cams, classes, threshold, ignore_index)

    return zip(ids, ordered_map(label, ids, pool, ahead), strict=True)


def cam_map_predictions(
    folder: Path, ids: Sequence[str], pool: ThreadPoolExecutor, ahead: int, key: str, num_classes: int
) -> Iterator[tuple]:
    """cams for the threshold sweep: yields ``(id, (cams [K, H, W], classes [K]))``."""
    maps = ordered_map(lambda name: cam_maps(folder / f"{name}.npz", key, num_classes), ids, pool, ahead)
    return zip(ids, maps, strict=True)


def sweep_thresholds(start: float, stop: float, step: float) -> list[float]:
    """``start, start + step, ..., stop`` (inclusive), each rounded to 6 decimals so 0.1 + 0.2 prints as 0.3."""
    if not (math.isfinite(start) and math.isfinite(stop) and math.isfinite(step)) or step <= 0 or stop < start:
        raise ConfigError(
            f"eval.sweep_start / sweep_stop / sweep_step must be finite with step > 0 and stop >= start, "
            f"got {start} / {stop} / {step}"
        )
    count = math.floor((stop - start) / step + 1e-6) + 1  # the tolerance keeps `stop` despite float drift
    return [round(start + i * step, 6) for i in range(count)]


# ---------------------------------------------------------------------------------------------- scoring


class LabelScorer:
    """Confusion matrix of hard predictions. With ``allow_unlabelled`` (pseudo labels), a prediction equal to the
    ignore index means "no label": it counts as background in the main matrix and is left out of a second,
    labelled-pixels-only matrix."""

    def __init__(self, num_classes: int, ignore_index: int, allow_unlabelled: bool) -> None:
        self.ignore_index = ignore_index
        self.matrix = ConfusionMatrix(num_classes, ignore_index)
        self.labelled = ConfusionMatrix(num_classes, ignore_index) if allow_unlabelled else None

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        if self.labelled is not None:
            unlabelled = pred == self.ignore_index
            self.labelled.update(pred, np.where(unlabelled, self.ignore_index, gt))
            pred = np.where(unlabelled, 0, pred)
        self.matrix.update(pred, gt)

    def all_reduce(self) -> None:
        self.matrix.all_reduce()
        if self.labelled is not None:
            self.labelled.all_reduce()

    def result(self) -> dict[str, Any]:
        result = self.matrix.compute()
        if self.labelled is not None:
            labelled = self.labelled.compute()
            result["labelled_miou"] = labelled["miou"]
            result["coverage"] = labelled["num_pixels"] / result["num_pixels"] if result["num_pixels"] else None
            result["labelled"] = labelled
        return result


class SweepScorer:
    """One confusion matrix per CAM background threshold (``core.labels.CamThresholdSweep``)."""

    def __init__(self, num_classes: int, ignore_index: int, thresholds: Sequence[float], configured: float) -> None:
        # the configured threshold (cam.bkg_thre) joins the curve, so the same pass also gives its exact result
        self.configured = float(configured)
        self.sweep = CamThresholdSweep(num_classes, sorted({*map(float, thresholds), self.configured}), ignore_index)

    def update(self, pred: CamMaps, gt: np.ndarray) -> None:
        self.sweep.update(pred[0], pred[1], gt)

    def all_reduce(self) -> None:
        self.sweep.all_reduce()

    def result(self) -> dict[str, Any]:
        threshold, best = self.sweep.best()
        curve = [{key: r[key] for key in ("threshold", "miou", "pixel_acc", "mean_acc")} for r in self.sweep.results()]
        return {**best, "threshold": threshold, "note": SWEEP_NOTE, "sweep": curve}

    def configured_result(self) -> dict[str, Any]:
        """The metrics at ``cam.bkg_thre``: what a run without ``--sweep`` reports."""
        return next(r for r in self.sweep.results() if r["threshold"] == self.configured)


def _shape(pred: np.ndarray | CamMaps) -> tuple[int, ...]:
    return tuple(pred[0].shape[1:]) if isinstance(pred, tuple) else tuple(pred.shape)


def accumulate(
    scorer: LabelScorer | SweepScorer,
    predictions: Iterator[tuple],
    gt_paths: Sequence[Path],
    folder: Path,
    suffix: str,
    pool: ThreadPoolExecutor,
    ahead: int,
) -> None:
    """Feed ``(id, prediction)`` pairs and their ground truth (decoded in ``pool`` too) to ``scorer``."""
    gts = ordered_map(read_label_png, gt_paths, pool, ahead)
    # closed however the loop ends, so an error message starts on a line of its own
    with tqdm(total=len(gt_paths), desc="evaluate", disable=not dist.is_main_process(), dynamic_ncols=True) as progress:
        for (name, pred), gt_path, gt in zip(predictions, gt_paths, gts, strict=True):
            path = folder / f"{name}{suffix}"
            if _shape(pred) != gt.shape:
                raise InputError(
                    f"prediction {path} is {'x'.join(map(str, _shape(pred)))} (HxW) but its ground truth {gt_path} is "
                    f"{gt.shape[0]}x{gt.shape[1]}"
                )
            try:
                scorer.update(pred, gt)
            except ValueError as err:  # e.g. a class id out of range, from ConfusionMatrix
                raise InputError(f"{path} (ground truth {gt_path}): {err}") from None
            progress.update(1)


# ---------------------------------------------------------------------------------------------- the tool


def check_complete(folder: Path, ids: Sequence[str], source: Source, cfg: DictConfig, split: str) -> None:
    """Raise listing the first ids without a prediction, with the command that produces them."""
    present = {entry.name for entry in os.scandir(folder)} if folder.is_dir() else set()
    missing = [name for name in ids if f"{name}{source.suffix}" not in present]
    if not missing:
        return
    split_arg = f" eval.split={split}" if cfg.eval.split is not None else ""
    raise FileNotFoundError(
        f"{len(missing)} of {len(ids)} image(s) of split {split!r} have no prediction {folder}/<id>{source.suffix}: "
        f"{preview(missing)}. Produce them with: python -m {source.command} --run-dir {cfg.run.out_dir}"
        f"{source.overrides}{split_arg}"
        " (made in shards, run.num_shards: every shard must have finished, its files copied into this folder)"
    )


def _checkpoint(cfg: DictConfig) -> str | None:
    try:
        return str(resolve_checkpoint(cfg))
    except FileNotFoundError:
        return None


def _append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (a single write of a complete line, flushed to disk)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


LOGGED_KEYS = ("miou", "pixel_acc", "mean_acc", "labelled_miou", "coverage", "threshold", "cam_key", "num_images",
               "checkpoint")  # fmt: skip


def evaluate(
    cfg: DictConfig,
    source: str,
    sweep: bool = False,
    cam_key: str | None = None,
    tag: str | None = None,
) -> dict[str, Any]:
    """Evaluate one source of a run (see the module docstring); collective under torchrun.

    Args:
        cfg: the run's config (``--run-dir`` reloads it).
        source: ``cams`` | ``pseudo_labels`` | ``pseudo_labels_rw`` | ``seg`` | ``seg_crf``.
        sweep: sweep the CAM background threshold (``cams`` only).
        cam_key: ``cam`` | ``cam_aux`` (``cams`` only; None = ``cam``).
        tag: name of the results-log line (``eval.results_log``); None = the result name (e.g. ``seg``, ``cams_aux``).

    Returns:
        The result dict written to the JSON file (the same on every rank).
    """
    started = time.time()
    if source not in SOURCES:
        raise InputError(f"--source must be one of {sorted(SOURCES)}, got {source!r}")
    if source != "cams" and (sweep or cam_key is not None):
        raise InputError(f"--sweep and --cam-key apply to --source cams only, not {source!r}")
    cam_key = cam_key or "cam"
    if cam_key not in CAM_KEYS:
        raise InputError(f"--cam-key must be one of {CAM_KEYS}, got {cam_key!r}")
    dist.init_distributed(str(cfg.run.device), int(cfg.run.num_threads))
    setup_logging(cfg.run.out_dir, dist.get_rank(), "evaluate.log")
    if dist.is_main_process():  # rank 0 alone writes RUN/eval, at the end: no other writer to wait for
        sweep_temp_files(Path(cfg.run.out_dir) / "eval", started)
    name = "cams_aux" if source == "cams" and cam_key == "cam_aux" else source
    split = split_name(cfg)
    dataset = build_dataset(cfg, split, "eval")
    if not dataset.has_masks:
        folders = [str(d) for d in dataset.layout.mask_folders(dataset.root, split)]
        raise InputError(
            f"split {split!r} has no ground-truth masks (none in {folders}), so it cannot be evaluated "
            f"(eval.split={split}); a test split is scored by its benchmark's server: for PASCAL VOC 2012 test, "
            f"package the predictions with `python -m tools.package_voc_test --run-dir {cfg.run.out_dir}` and upload "
            'the tar (README, "VOC test server")'
        )
    spec = SOURCES[source]
    folder = Path(cfg.run.out_dir) / spec.folder / split
    if int(cfg.run.num_shards) > 1:
        logger.info("run.num_shards=%d: evaluate scores the whole split (the union of every shard's outputs)",
                    int(cfg.run.num_shards))  # fmt: skip
    check_complete(folder, dataset.ids, spec, cfg, split)

    num_classes, ignore = int(cfg.data.num_classes), int(cfg.data.ignore_index)
    mine = dist.shard(range(len(dataset.ids)))
    ids = [dataset.ids[i] for i in mine]
    gt_paths = [dataset.mask_paths[i] for i in mine]
    threads = max(2, int(cfg.data.num_workers))
    ahead = 4 * threads
    threshold = float(cfg.cam.bkg_thre)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        if source == "cams" and sweep:
            ev = cfg.eval
            thresholds = sweep_thresholds(float(ev.sweep_start), float(ev.sweep_stop), float(ev.sweep_step))
            scorer: LabelScorer | SweepScorer = SweepScorer(num_classes, ignore, thresholds, threshold)
            predictions = cam_map_predictions(folder, ids, pool, ahead, cam_key, num_classes)
        elif source == "cams":
            scorer = LabelScorer(num_classes, ignore, allow_unlabelled=False)
            predictions = cam_label_predictions(folder, ids, pool, ahead, cam_key, threshold, num_classes, ignore)
        else:
            scorer = LabelScorer(num_classes, ignore, allow_unlabelled=source in PSEUDO_SOURCES)
            predictions = png_predictions(folder, ids, pool, ahead)
        accumulate(scorer, predictions, gt_paths, folder, spec.suffix, pool, ahead)
    scorer.all_reduce()

    result: dict[str, Any] = {
        "source": source,
        "split": split,
        "run": str(cfg.run.out_dir),
        "checkpoint": _checkpoint(cfg),
        "num_images": len(dataset.ids),
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "class_names": list(class_names(str(cfg.data.name))[:num_classes]),
    }
    if source == "cams":
        result.update(cam_key=cam_key, threshold=threshold)
    base = dict(result)
    result.update(scorer.result())
    if dist.is_main_process():
        if isinstance(scorer, SweepScorer):  # a sweep also writes the plain result at cam.bkg_thre, from the same pass
            _report(cfg, {**base, **scorer.configured_result(), "threshold": threshold}, name, False, tag)
        _report(cfg, result, name, sweep, tag)
    dist.barrier()
    return result


def _report(cfg: DictConfig, result: dict[str, Any], name: str, sweep: bool, tag: str | None) -> None:
    """Rank 0: table, JSON, sweep plot and results-log line."""
    out = Path(cfg.run.out_dir) / "eval"
    stem = f"{name}_{result['split']}" + ("_sweep" if sweep else "")
    logger.info("%s on %s (%d images):\n%s", name, result["split"], result["num_images"],
                format_table(result, result["class_names"]))  # fmt: skip
    if "coverage" in result:
        logger.info("pseudo labels: mIoU %s with unlabelled pixels as background | labelled-only mIoU %s | "
                    "coverage %s", *(_pct(result[k]) for k in ("miou", "labelled_miou", "coverage")))  # fmt: skip
    if sweep:
        curve = result["sweep"]
        plot = out / f"{stem}.png"
        weights, run_prefix = str(result["checkpoint"]), str(result["run"]).rstrip("/") + "/"
        weights = weights[len(run_prefix) :] if weights.startswith(run_prefix) else weights
        title = (f"CAM background-threshold sweep ('{result.get('cam_key', name)}' maps) on {result['split']} "
                 f"({result['num_images']:,} images)\nrun {result['run']}, weights {weights}")  # fmt: skip
        plot_sweep([r["threshold"] for r in curve], [r["miou"] for r in curve], result["threshold"], plot,
                   configured=float(cfg.cam.bkg_thre), title=title)  # fmt: skip
        logger.info("best background threshold %.4g (%s): mIoU %s (curve in %s)", result["threshold"], SWEEP_NOTE,
                    _pct(result["miou"]), out / f"{stem}.png")  # fmt: skip
    atomic_write_json(out / f"{stem}.json", result)
    logger.info("wrote %s", out / f"{stem}.json")
    log_path = cfg.eval.results_log
    if log_path is not None:
        record = {"tag": tag or name, "time": result["time"], "run": result["run"], "source": result["source"],
                  "split": result["split"], "sweep": sweep}  # fmt: skip
        record.update({key: result[key] for key in LOGGED_KEYS if key in result})
        _append_line(Path(log_path), record)
        logger.info("appended to %s (tag %s)", log_path, record["tag"])


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, choices=sorted(SOURCES), help="which predictions to evaluate")
    parser.add_argument("--sweep", action="store_true", help="cams: sweep the background threshold (eval.sweep_*)")
    parser.add_argument("--cam-key", choices=CAM_KEYS, default=None, help="cams: which saved branch (default cam)")
    parser.add_argument("--tag", default=None, help="name of the eval.results_log line (default: the source)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.source != "cams" and (args.sweep or args.cam_key is not None):
        parser.error("--sweep and --cam-key apply to --source cams only")

    def body() -> int:
        cfg = config_from_args(args)
        try:
            evaluate(cfg, args.source, sweep=args.sweep, cam_key=args.cam_key, tag=args.tag)
            return 0
        finally:
            dist.cleanup()

    return exit_on_user_error(body)


if __name__ == "__main__":
    sys.exit(main())
