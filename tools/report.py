"""Collect a run's evaluation results into the protocol table and one folder (printed by ``infer_run_*.sh``).

    python -m tools.report --run-dir RUN [--seconds S] [key=value ...]
    python -m tools.report --print-splits --run-dir RUN [key=value ...]     prints "CAM_SPLIT SEG_SPLIT"
    python -m tools.report --print-task --run-dir RUN                       prints "msfc" or "stage2"
    python -m tools.report --compare RUN [RUN ...] [--out FILE.md] [--curves OUT.png]
                                          one row per run, or per config over its seeds (scripts/ablate.sh)

The protocol of SPEC §8 scores CAMs, aux-CAMs and pseudo labels on ``eval.cam_split`` (VOC train, 1,464 images; COCO
val; null = the segmentation split) and the segmentation head on ``eval.split`` (null = ``data.val_split``), at the
configured ``cam.bkg_thre``. The CAM threshold sweep picks its threshold on the ground truth: it is reported apart,
labelled "GT-tuned threshold, oracle — not a protocol number".

Reads ``RUN/eval/*_<split>.json`` (written by ``tools.evaluate``), the outputs' ``settings.json`` (the checkpoint that
made them) and ``RUN/metrics.jsonl``, and writes ``RUN/results/``: ``results.json`` (keys ``cam_split``,
``seg_split``, ``checkpoint``, ``cam_checkpoint``, ``seg_checkpoint``, ``cam_miou``, ``cam_aux_miou``,
``cam_best_threshold``, ``cam_best_miou``, ``pseudo_label_miou``, ``pseudo_label_labelled_miou``,
``pseudo_label_coverage``, ``pseudo_label_rw_miou`` (the random-walk pseudo labels of ``tools.make_pseudo_labels
pseudo.refine=[rw]``; its row appears only when they were evaluated), ``seg_miou``,
``seg_crf_miou``, ``train_seconds``, ``seconds``, ...; a stage that was not evaluated is null; with a second-stage
run in ``RUN/stage2`` also ``stage2_run``, ``stage2_seg_miou`` and ``stage2_seg_crf_miou``, read from its eval files
on the same split), ``results.md`` (the protocol table), the CAM threshold-sweep plot, the segmentation overlays and
``per_class_iou.png``: grouped bars of every class's IoU for CAM and pseudo labels (and the random-walk ones when
evaluated; on the CAM split) and the segmentation head without and with DenseCRF (on the segmentation split), read
from the same eval files, with the numbers it draws in ``per_class_iou.json``.

``--compare`` and ``--curves`` (several runs side by side, seeds grouped) are ``tools/compare_runs.py``'s.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from utils.config import add_config_arguments, config_from_args
from utils.errors import InputError, exit_on_user_error
from utils.io import atomic_write_json, atomic_write_text
from utils.logging import read_metrics, setup_logging

logger = logging.getLogger("tools.report")

ORACLE = "GT-tuned threshold, oracle — not a protocol number"
# (results key, which split scores it: "cam" = eval.cam_split | "seg" = eval.split, eval file, key in it, label)
ROWS = (
    ("cam_miou", "cam", "cams_{split}.json", "miou", "CAM (multi-scale, bkg threshold {bkg})"),
    ("cam_aux_miou", "cam", "cams_aux_{split}.json", "miou", "aux-CAM (multi-scale, bkg threshold {bkg})"),
    ("pseudo_label_miou", "cam", "pseudo_labels_{split}.json", "miou",
     "pseudo labels (ignore band counted as background)"),
    ("pseudo_label_labelled_miou", "cam", "pseudo_labels_{split}.json", "labelled_miou",
     "pseudo labels, labelled pixels only"),
    ("pseudo_label_rw_miou", "cam", "pseudo_labels_rw_{split}.json", "miou",
     "pseudo labels + RW (random walk, IRN boundary network)"),
    ("seg_miou", "seg", "seg_{split}.json", "miou", "segmentation head"),
    ("seg_crf_miou", "seg", "seg_crf_{split}.json", "miou", "segmentation head + DenseCRF"),
    # last and apart: its threshold was chosen on the very masks it is scored against
    ("cam_best_miou", "cam", "cams_{split}_sweep.json", "miou",
     "CAM at the sweep's best threshold ({best}): " + ORACLE),
)  # fmt: skip
# rows of an optional stage, shown only when it was evaluated (its eval file exists): the random walk needs an IRN
# boundary network, which a run need not have. Walked labels have no ignore band, so no labelled-only row.
OPTIONAL_ROWS = ("pseudo_label_rw_miou",)
# results key of the number of images scored, and the eval files that record it, in order of preference
NUM_IMAGES = {"cam": ("cams_{split}.json", "cams_aux_{split}.json", "pseudo_labels_{split}.json"),
              "seg": ("seg_{split}.json", "seg_crf_{split}.json")}  # fmt: skip
# the folder of a second-stage run inside the run (docs/stage2.md), whose seg / seg_crf mIoU the report adds
STAGE2_DIR = "stage2"


# The per-class chart's bars, in order: (eval file, legend label, which split scores it)
PER_CLASS_STAGES = (
    ("cams_{split}.json", "CAM", "cam"),
    ("pseudo_labels_{split}.json", "pseudo labels", "cam"),
    ("pseudo_labels_rw_{split}.json", "pseudo labels + RW", "cam"),
    ("seg_{split}.json", "seg head", "seg"),
    ("seg_crf_{split}.json", "seg head + DenseCRF", "seg"),
)
PER_CLASS_PNG = "per_class_iou.png"
PER_CLASS_JSON = "per_class_iou.json"  # what the chart draws: {"class_names": [...], "stages": {label: {...}}}


def seg_split(cfg: DictConfig) -> str:
    """The split the segmentation head is scored on: ``eval.split``, else ``data.val_split``.

    The rule of ``utils.outputs.split_name``, not imported from there because that module loads torch (4 s), and
    ``scripts/infer_pipeline.sh`` asks for the splits before its first stage (tests/test_report.py checks they agree).
    """
    return str(cfg.eval.split if cfg.eval.split is not None else cfg.data.val_split)


def protocol_splits(cfg: DictConfig) -> tuple[str, str]:
    """``(cam_split, seg_split)``: where the protocol scores CAMs + pseudo labels, and segmentation (SPEC §8).

    ``eval.cam_split`` (null = the segmentation split) and ``eval.split`` (null = ``data.val_split``) are independent:
    an ``eval.split=X`` from the user moves the segmentation stages only; ``eval.cam_split=Y`` moves the CAM stages.
    """
    seg = seg_split(cfg)
    return (seg if cfg.eval.cam_split is None else str(cfg.eval.cam_split)), seg


def _read(path: Path) -> dict[str, Any] | None:
    """A JSON object written by another tool, or None when the file does not exist."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise InputError(f"{path} is not valid JSON ({err}); rerun the tool that wrote it, or delete it") from err
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object, got {type(data).__name__}; rerun the tool that wrote it")
    return data


def split_results(run: Path, split: str) -> dict[str, Any]:
    """Every :data:`ROWS` value found in ``run/eval/*_<split>.json`` (None where not evaluated), plus
    ``cam_best_threshold``, ``pseudo_label_coverage`` and ``num_images`` ({"cam": n, "seg": n})."""
    stems = {row[2] for row in ROWS} | {stem for group in NUM_IMAGES.values() for stem in group}
    files = {stem: _read(run / "eval" / stem.format(split=split)) for stem in stems}
    values: dict[str, Any] = {key: None if files[stem] is None else files[stem].get(field)
                              for key, _, stem, field, _ in ROWS}  # fmt: skip
    sweep, pseudo = files["cams_{split}_sweep.json"], files["pseudo_labels_{split}.json"]
    values["cam_best_threshold"] = None if sweep is None else sweep["threshold"]
    values["pseudo_label_coverage"] = None if pseudo is None else pseudo.get("coverage")
    values["num_images"] = {
        group: next((files[stem]["num_images"] for stem in stems if (files[stem] or {}).get("num_images")), None)
        for group, stems in NUM_IMAGES.items()
    }
    return values


def _checkpoint_used(run: Path, kind: str, split: str) -> str | None:
    """The checkpoint recorded in ``run/<kind>/<split>/settings.json`` (the one that made those outputs)."""
    settings = _read(run / kind / split / "settings.json") or {}
    identity = settings.get("checkpoint")
    return identity.get("path") if isinstance(identity, dict) else identity


def collect(cfg: DictConfig, seconds: float | None = None) -> dict[str, Any]:
    """Gather the run's results: CAM stages from ``eval.cam_split``, segmentation from ``eval.split``."""
    run = Path(cfg.run.out_dir)
    cam_split, seg = protocol_splits(cfg)
    found = {"cam": split_results(run, cam_split), "seg": split_results(run, seg)}
    results: dict[str, Any] = {
        "run": str(run),
        "cam_split": cam_split,
        "seg_split": seg,
        "cam_num_images": found["cam"]["num_images"]["cam"],
        "seg_num_images": found["seg"]["num_images"]["seg"],
        "checkpoint": str(cfg.eval.checkpoint),
        "cam_checkpoint": _checkpoint_used(run, "cams", cam_split),
        "seg_checkpoint": _checkpoint_used(run, "seg", seg),
        "bkg_thre": float(cfg.cam.bkg_thre),
    }
    for key, group, *_ in ROWS:
        results[key] = found[group][key]
    results["cam_best_threshold"] = found["cam"]["cam_best_threshold"]
    results["cam_best_note"] = ORACLE
    results["pseudo_label_coverage"] = found["cam"]["pseudo_label_coverage"]
    results["train_iterations"], results["train_seconds"] = training_record(run)
    # a second stage trained on this run's pseudo labels (scripts/demo.sh: RUN/stage2), scored on the same split
    stage2 = run / STAGE2_DIR
    found2 = split_results(stage2, seg) if (stage2 / "config.yaml").is_file() else {}
    results["stage2_run"] = str(stage2) if found2 else None
    results["stage2_seg_miou"], results["stage2_seg_crf_miou"] = found2.get("seg_miou"), found2.get("seg_crf_miou")
    results["seconds"] = seconds
    return results


def training_record(run: Path) -> tuple[int | None, float | None]:
    """(iterations, seconds) of the last training record in ``run/metrics.jsonl``."""
    train = read_metrics(run / "metrics.jsonl", kind="train") if (run / "metrics.jsonl").is_file() else []
    return (train[-1]["step"], train[-1].get("seconds")) if train else (None, None)


def _pct(value: float | None) -> str:
    return "not run" if value is None else f"{100 * value:.1f}"


def _split_with_count(split: str, count: int | None) -> str:
    return split if count is None else f"{split} ({count:,} images)"


def markdown(results: dict[str, Any]) -> str:
    """The protocol table: one row per stage with the split it was scored on; the GT-tuned sweep row last."""
    cam_split, seg = results["cam_split"], results["seg_split"]
    used = {results["cam_checkpoint"], results["seg_checkpoint"]} - {None}
    files = ("" if not used else f" ({next(iter(used))})" if len(used) == 1 else
             f" (CAMs {results['cam_checkpoint']}, segmentation {results['seg_checkpoint']})")  # fmt: skip
    caveat = "" if results["checkpoint"] == "last" else " — not the final checkpoint that SPEC §8 reports"
    lines = [
        f"Protocol (SPEC §8): CAMs and pseudo labels on {_split_with_count(cam_split, results['cam_num_images'])}, "
        f"segmentation on {_split_with_count(seg, results['seg_num_images'])}; weights eval.checkpoint="
        f"{results['checkpoint']}{files}{caveat}.",
        "",
        "| stage | split | mIoU (%) |",
        "|---|---|---|",
    ]
    best = "n/a" if results["cam_best_threshold"] is None else f"{results['cam_best_threshold']:.2f}"
    for key, group, _, _, label in ROWS:
        split = cam_split if group == "cam" else seg
        if key in OPTIONAL_ROWS and results[key] is None:
            continue
        lines.append(f"| {label.format(bkg=results['bkg_thre'], best=best)} | {split} | {_pct(results[key])} |")
        if key == "pseudo_label_labelled_miou" and results["pseudo_label_coverage"] is not None:
            coverage = f"{100 * results['pseudo_label_coverage']:.1f}%"
            lines.append(f"| pseudo-label coverage (share of pixels labelled) | {cam_split} | {coverage} |")
    for key, label in (("stage2_seg_miou", "second stage (segmentation network on the pseudo labels)"),
                       ("stage2_seg_crf_miou", "second stage + DenseCRF")):  # fmt: skip
        if results.get(key) is not None:
            lines.append(f"| {label}, {results['stage2_run']} | {seg} | {_pct(results[key])} |")
    if results["train_seconds"] is not None:
        lines.append(f"| training: {results['train_iterations']} iterations | — | {results['train_seconds']:.0f} s |")
    if results["seconds"] is not None:
        lines.append(f"| whole pipeline, wall time | — | {results['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def per_class_iou(run: Path, cam_split: str, seg: str) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The per-class IoUs of the chart: (class names, legend label -> {"split", "iou" [C] (None = no pixel of the
    class in either the ground truth or the predictions), "miou"}) for each stage of :data:`PER_CLASS_STAGES` whose
    eval file holds per-class IoUs, in that order. Every such file must name the same classes."""
    names: list[str] | None = None
    stages: dict[str, dict[str, Any]] = {}
    for stem, label, group in PER_CLASS_STAGES:
        split = cam_split if group == "cam" else seg
        path = run / "eval" / stem.format(split=split)
        data = _read(path)
        if data is None or "iou" not in data:  # not evaluated, or a file without per-class numbers: no bars
            continue
        iou, classes = data.get("iou"), data.get("class_names")
        if not isinstance(iou, list) or not isinstance(classes, list) or len(iou) != len(classes):
            raise InputError(f"{path} lacks per-class 'iou' / 'class_names' of equal length; rerun tools.evaluate")
        if names is None:
            names = [str(name) for name in classes]
        elif [str(name) for name in classes] != names:
            raise InputError(f"{path} names other classes than the other eval files of {run}; rerun tools.evaluate")
        stages[label] = {"split": split, "iou": iou, "miou": data.get("miou")}
    return names or [], stages


def per_class_figure(results: dict[str, Any]):
    """The grouped bar chart of :func:`per_class_iou` for the run of ``results`` (a matplotlib ``Figure``), or None
    when no stage was evaluated. Legend entries carry each stage's split and mIoU; the title the run, both splits
    with their image counts and the weights."""
    from utils.visualize import grouped_bar_figure  # matplotlib: loaded only when a chart is drawn

    run, cam_split, seg = Path(results["run"]), results["cam_split"], results["seg_split"]
    names, stages = per_class_iou(run, cam_split, seg)
    if not stages:
        return None
    series = {}
    for label, stage in stages.items():
        score = "" if stage["miou"] is None else f", mIoU {100 * stage['miou']:.1f}"
        series[f"{label} ({stage['split']}{score})"] = stage["iou"]
    used = {results["cam_checkpoint"], results["seg_checkpoint"]} - {None}
    weights = f"eval.checkpoint={results['checkpoint']}" + (f" ({next(iter(used))})" if len(used) == 1 else "")
    title = (f"Per-class IoU, run {run}\nCAM and pseudo labels on "
             f"{_split_with_count(cam_split, results['cam_num_images'])}, segmentation on "
             f"{_split_with_count(seg, results['seg_num_images'])}; weights {weights}")  # fmt: skip
    return grouped_bar_figure(names, series, title, ylabel="IoU", ylim=(0.0, 1.0))


def write_report(cfg: DictConfig, seconds: float | None = None) -> Path:
    """Write ``RUN/results/`` and return it."""
    results = collect(cfg, seconds)
    run = Path(cfg.run.out_dir)
    out = run / "results"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", markdown(results))
    names, stages = per_class_iou(run, results["cam_split"], results["seg_split"])
    if stages:  # the chart, and the numbers it draws
        from utils.visualize import save_figure

        atomic_write_json(out / PER_CLASS_JSON, {"class_names": names, "stages": stages})
        save_figure(per_class_figure(results), out / PER_CLASS_PNG)
    plot = run / "eval" / f"cams_{results['cam_split']}_sweep.png"
    if plot.is_file():
        shutil.copy2(plot, out / plot.name)
    for kind in ("seg", "seg_crf"):
        overlays = run / kind / f"{results['seg_split']}_overlays"
        if overlays.is_dir():
            shutil.copytree(overlays, out / f"{kind}_overlays", dirs_exist_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=None, help="wall time of the whole pipeline, to record")
    parser.add_argument("--print-splits", action="store_true", help="print 'CAM_SPLIT SEG_SPLIT' and exit")
    parser.add_argument("--print-task", action="store_true",
                        help="print the run's task (msfc | stage2: a second-stage run, no CAMs) and exit")  # fmt: skip
    parser.add_argument("--compare", type=Path, nargs="+", default=None, metavar="RUN", help="tabulate several runs")
    parser.add_argument("--out", type=Path, default=None, help="with --compare: also write the table here")
    parser.add_argument("--curves", type=Path, default=None, metavar="OUT.png",
                        help="with --compare: also plot the runs' validation mIoUs during training here")  # fmt: skip
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.curves is not None and not args.compare:
        parser.error("--curves needs --compare RUN [RUN ...]")

    def body() -> int:
        if args.compare:
            from tools.compare_runs import compare, curves_message, write_curves  # which imports this module

            table = compare(args.compare)
            if args.out:
                atomic_write_text(args.out, table)
            print(table, end="")
            if args.curves is not None:
                print(curves_message(write_curves(args.compare, args.curves)), end="")
            return 0
        cfg = config_from_args(args)
        if args.print_splits:
            print(*protocol_splits(cfg))
            return 0
        if args.print_task:
            print(cfg.task)
            return 0
        setup_logging(cfg.run.out_dir, 0, "report.log")
        out = write_report(cfg, seconds=args.seconds)
        print((out / "results.md").read_text(), end="")
        logger.info("wrote %s", out)
        return 0

    return exit_on_user_error(body)


if __name__ == "__main__":
    sys.exit(main())
