"""Collect a run's evaluation results into one table and folder (what ``scripts/demo.sh`` prints at the end).

    python -m tools.report --run-dir RUN [--seconds S]
    python -m tools.report --compare RUN [RUN ...] [--out FILE.md]     one row per run (scripts/ablate.sh)

Reads ``RUN/eval/*_<split>.json`` (written by ``tools.evaluate``) and ``RUN/metrics.jsonl``, and writes
``RUN/results/``: ``results.json`` (keys ``cam_miou``, ``cam_aux_miou``, ``cam_best_threshold``, ``cam_best_miou``,
``pseudo_label_miou``, ``pseudo_label_labelled_miou``, ``pseudo_label_coverage``, ``seg_miou``, ``seg_crf_miou``,
``train_seconds``, ``seconds``, ...; a stage that was not evaluated is null), ``results.md`` (the same as a markdown
table), the CAM threshold-sweep plot and the segmentation overlays.
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

from utils.config import add_config_arguments, config_from_args, load_run_config
from utils.io import atomic_write_json, atomic_write_text
from utils.logging import read_metrics, setup_logging
from utils.run import split_name

logger = logging.getLogger("tools.report")

# (results key, eval file name, key inside that file, table label)
ROWS = (
    ("cam_miou", "cams_{split}.json", "miou", "CAM (multi-scale, bkg threshold {bkg})"),
    ("cam_aux_miou", "cams_aux_{split}.json", "miou", "aux-CAM (multi-scale, bkg threshold {bkg})"),
    ("cam_best_miou", "cams_{split}_sweep.json", "miou", "CAM at the best threshold of the sweep ({best})"),
    ("pseudo_label_miou", "pseudo_labels_{split}.json", "miou", "pseudo labels (ignore band counted as background)"),
    (
        "pseudo_label_labelled_miou",
        "pseudo_labels_{split}.json",
        "labelled_miou",
        "pseudo labels, labelled pixels only",
    ),
    ("seg_miou", "seg_{split}.json", "miou", "segmentation head"),
    ("seg_crf_miou", "seg_crf_{split}.json", "miou", "segmentation head + DenseCRF"),
)


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(cfg: DictConfig, seconds: float | None = None) -> dict[str, Any]:
    """Gather the evaluation results of the run's split (``eval.split``, else ``data.val_split``)."""
    run, split = Path(cfg.run.out_dir), split_name(cfg)
    files = {name: _read(run / "eval" / name.format(split=split)) for name in {row[1] for row in ROWS}}
    results: dict[str, Any] = {"run": str(run), "split": split, "bkg_thre": float(cfg.cam.bkg_thre)}
    for key, stem, field, _ in ROWS:
        results[key] = None if files[stem] is None else files[stem].get(field)
    sweep = files["cams_{split}_sweep.json"]
    results["cam_best_threshold"] = None if sweep is None else sweep["threshold"]
    pseudo = files["pseudo_labels_{split}.json"]
    results["pseudo_label_coverage"] = None if pseudo is None else pseudo.get("coverage")
    train = read_metrics(run / "metrics.jsonl", kind="train") if (run / "metrics.jsonl").is_file() else []
    results["train_iterations"] = train[-1]["step"] if train else None
    results["train_seconds"] = train[-1].get("seconds") if train else None
    results["seconds"] = seconds
    return results


def markdown(results: dict[str, Any]) -> str:
    best = "n/a" if results["cam_best_threshold"] is None else f"{results['cam_best_threshold']:.2f}"
    lines = [f"| stage ({results['split']} split) | mIoU |", "|---|---|"]
    for key, _, _, label in ROWS:
        value = results[key]
        shown = "not run" if value is None else f"{100 * value:.1f}"
        lines.append(f"| {label.format(bkg=results['bkg_thre'], best=best)} | {shown} |")
    if results["pseudo_label_coverage"] is not None:
        lines.append(
            f"| pseudo-label coverage (share of pixels labelled) | {100 * results['pseudo_label_coverage']:.1f}% |"
        )
    if results["train_seconds"] is not None:
        lines.append(f"| training: {results['train_iterations']} iterations | {results['train_seconds']:.0f} s |")
    if results["seconds"] is not None:
        lines.append(f"| whole pipeline, wall time | {results['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def write_report(cfg: DictConfig, seconds: float | None = None) -> Path:
    """Write ``RUN/results/`` and return it."""
    results = collect(cfg, seconds)
    run, split = Path(cfg.run.out_dir), results["split"]
    out = run / "results"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", markdown(results))
    plot = run / "eval" / f"cams_{split}_sweep.png"
    if plot.is_file():
        shutil.copy2(plot, out / plot.name)
    for kind in ("seg", "seg_crf"):
        overlays = run / kind / f"{split}_overlays"
        if overlays.is_dir():
            shutil.copytree(overlays, out / f"{kind}_overlays", dirs_exist_ok=True)
    return out


COMPARED = (("cam_miou", "CAM"), ("cam_aux_miou", "aux-CAM"), ("cam_best_miou", "CAM, best threshold"),
            ("seg_miou", "segmentation"))  # fmt: skip


def compare(run_dirs: list[Path]) -> str:
    """A markdown table with one row per run (its folder name) and the mIoUs of :data:`COMPARED`, in %."""
    header = "| run | " + " | ".join(label for _, label in COMPARED) + " | training time |"
    lines = [header, "|---" * (len(COMPARED) + 2) + "|"]
    for run in run_dirs:
        cfg = load_run_config(run, [f"run.out_dir={run}"])
        results = collect(cfg)
        if float(cfg.loss.weight.seg) == 0:  # the decoder was never trained: its mIoU means nothing
            results["seg_miou"] = "no seg head"
        cells = [value if isinstance(value, str) else "n/a" if value is None else f"{100 * value:.1f}"
                 for value in (results[key] for key, _ in COMPARED)]  # fmt: skip
        seconds = results["train_seconds"]
        lines.append(
            f"| {run.name} | " + " | ".join(cells) + f" | {'n/a' if seconds is None else f'{seconds:.0f} s'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=None, help="wall time of the whole pipeline, to record")
    parser.add_argument("--compare", type=Path, nargs="+", default=None, metavar="RUN", help="tabulate several runs")
    parser.add_argument("--out", type=Path, default=None, help="with --compare: also write the table here")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.compare:
        table = compare(args.compare)
        if args.out:
            atomic_write_text(args.out, table)
        print(table, end="")
        return 0
    cfg = config_from_args(args)
    setup_logging(cfg.run.out_dir, 0, "report.log")
    out = write_report(cfg, seconds=args.seconds)
    print((out / "results.md").read_text(), end="")
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
