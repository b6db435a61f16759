"""Several runs side by side (``python -m tools.report --compare RUN ... [--out FILE] [--curves OUT.png]``): one
table of their CAM / aux-CAM / segmentation mIoUs, and their validation curves during training.

The config of a run is named by its folder: a folder named ``seed<k>`` (the layout of ``SEEDS=... scripts/ablate.sh``:
``runs/ablations/<family>/<name>/seed<k>``) is a seed of the config named by its parent, and the seeds of one parent
folder are averaged; any other folder is a config of its own (the runs record no config name, only the resolved
config). With one run per config the table has one row per run; otherwise one row per config with the mean ± sample
standard deviation over its runs (n shown), then a per-run table with each run's recorded ``run.seed``. A group's runs
must record different seeds; recorded config keys that differ between them beyond the seed and the run-time keys
(:data:`GROUP_KEYS_MAY_DIFFER`) are noted under the table. Each run's numbers come from its ``RUN/eval/*.json`` files
through ``tools.report`` (the one reader of a run's results).

``--curves OUT.png`` draws the validation mIoUs logged during training (``train.eval_every`` > 0; records of kind
"val" in ``RUN/metrics.jsonl``): CAM, aux-CAM and segmentation against the iteration, one colour per config, each
seed thin and the mean thick; runs without validation records are named, not drawn.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tools.report import ORACLE, protocol_splits, split_results, training_record
from utils.config import RESUME_MAY_CHANGE, config_changes, covers, format_changes, load_run_config
from utils.errors import InputError
from utils.logging import read_metrics

# compared per split (the protocol's CAM split, then the segmentation split), then segmentation on its split
COMPARED_CAM = (("cam_miou", "CAM"), ("cam_aux_miou", "aux-CAM"), ("cam_best_miou", "CAM, GT-tuned threshold"))
NO_SEG_HEAD = "no seg head"  # the cell of a run whose decoder was never trained (loss.weight.seg = 0)
# A run folder of scripts/ablate.sh with SEEDS set, runs/ablations/<family>/<name>/seed<k>: its parent names the
# config, and the runs of one such parent are that config's seeds (a group). Any other run folder is its own group.
SEED_FOLDER = re.compile(r"seed(\d+)")
# Recorded config keys whose values may differ between the seeds of one group: the seed, and the keys a resume may
# change (utils.config.RESUME_MAY_CHANGE: where a run writes, how fast it runs, how often it logs / validates, what
# the inference tools do) except those that change what is trained from scratch or on which data: data.root (base
# and heldout live in different roots), train.max_iters (the budget) and the initial weights. A difference in any
# other key is noted under the table; the numbers are still averaged.
RESUME_KEYS_NOTED = ("data.root", "train.max_iters", "model.pretrained", "model.weights")
GROUP_KEYS_MAY_DIFFER = ("run.seed", *(key for key in RESUME_MAY_CHANGE if key not in RESUME_KEYS_NOTED))


def config_folder(run: Path) -> Path:
    """The folder that names a run's config: its parent for a run folder named ``seed<k>``, else the run itself."""
    return run.parent if SEED_FOLDER.fullmatch(run.name) else run


def _labels(folders: list[Path]) -> dict[Path, str]:
    """Each folder's name, lengthened by its parents' names (``base/full``, ``heldout/full``) where two would clash."""
    depth = dict.fromkeys(folders, 1)
    while True:
        label = {folder: "/".join(folder.parts[-depth[folder] :]) for folder in folders}
        clash = [f for f in folders if list(label.values()).count(label[f]) > 1 and depth[f] < len(f.parts)]
        if not clash:
            return label
        for folder in clash:
            depth[folder] += 1


def group_runs(run_dirs: list[Path]) -> dict[str, list[Path]]:
    """The runs by config (:func:`config_folder`), in order of first appearance: ``{config label: [runs]}``."""
    folders = list(dict.fromkeys(config_folder(run) for run in run_dirs))
    label = _labels(folders)
    groups: dict[str, list[Path]] = {label[folder]: [] for folder in folders}
    for run in run_dirs:
        groups[label[config_folder(run)]].append(run)
    return groups


def _group_notes(label: str, runs: list[Path], cfgs: list[DictConfig]) -> list[str]:
    """What is amiss in a group, one note each: a ``seed<k>`` folder that records another ``run.seed``, and recorded
    config keys (other than :data:`GROUP_KEYS_MAY_DIFFER`) that differ from its first run's. Two runs of a group
    with the same ``run.seed`` are an error: they are not independent seeds."""
    notes, seen = [], {}
    for run, cfg in zip(runs, cfgs, strict=True):
        seed = int(cfg.run.seed)
        if seen.get(seed) == run:
            raise InputError(f"{run} is given twice to --compare; give each run once")
        if seed in seen:
            raise InputError(f"{seen[seed]} and {run} are both run.seed={seed} of config {label}: not two seeds; "
                             "compare each once, or retrain one with another run.seed")  # fmt: skip
        seen[seed] = run
        folder = SEED_FOLDER.fullmatch(run.name)
        if folder and int(folder.group(1)) != seed:
            notes.append(f"note: {run} records run.seed={seed}, not the {folder.group(1)} of its folder name.")
    first = OmegaConf.to_container(cfgs[0], resolve=True)
    for run, cfg in zip(runs[1:], cfgs[1:], strict=True):
        changes = config_changes(first, OmegaConf.to_container(cfg, resolve=True))
        changes = {k: v for k, v in changes.items() if not any(covers(e, k) for e in GROUP_KEYS_MAY_DIFFER)}
        if changes:
            notes.append(f"note: {run} differs from {runs[0]} (both averaged in {label}): {format_changes(changes)}.")
    return notes


def _compare_columns(first: Path) -> tuple[list[str], list[tuple[str, str, str]]]:
    """(the splits read, the columns: (split, results key, header)), from the first run's config."""
    cam_split, seg = protocol_splits(load_run_config(first, [f"run.out_dir={first}"]))
    splits = [cam_split] if cam_split == seg else [cam_split, seg]
    columns = [(split, key, f"{label} ({split})") for split in splits for key, label in COMPARED_CAM]
    columns.append((seg, "seg_miou", f"segmentation ({seg})"))
    return splits, columns


def _run_values(run: Path, cfg: DictConfig, splits: list[str], columns) -> list[float | str | None]:
    """A run's numbers in column order (None = not evaluated, :data:`NO_SEG_HEAD`), then its training seconds."""
    found = {split: split_results(run, split) for split in splits}
    values: list[float | str | None] = []
    for split, key, _ in columns:
        no_head = key == "seg_miou" and float(cfg.loss.weight.seg) == 0  # the decoder was never trained
        values.append(NO_SEG_HEAD if no_head else found[split][key])
    values.append(training_record(run)[1])
    return values


def _cell(value: float | str | None) -> str:
    return "n/a" if value is None else value if isinstance(value, str) else f"{100 * value:.1f}"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} s"


def _mean_std(values: list[float | str | None], scale: float, digits: int, unit: str = "") -> str:
    """``mean ± sample std`` of the numbers among ``values`` (times ``scale``); ``(n=k)`` when only k of them are
    numbers; the number alone when there is one; :data:`NO_SEG_HEAD` when every run has no seg head; else n/a."""
    if values and all(value == NO_SEG_HEAD for value in values):
        return NO_SEG_HEAD
    numbers = [scale * float(value) for value in values if isinstance(value, (int, float))]
    if not numbers:
        return "n/a"
    shown = f"{numbers[0]:.{digits}f}" if len(numbers) == 1 else (
        f"{statistics.mean(numbers):.{digits}f} ± {statistics.stdev(numbers):.{digits}f}")  # fmt: skip
    return shown + unit + (f" (n={len(numbers)})" if len(numbers) < len(values) else "")


COMPARE_NOTE = f'mIoU in %; CAM and aux-CAM at cam.bkg_thre; "CAM, GT-tuned threshold" = the sweep\'s best ({ORACLE}).'


def compare(run_dirs: list[Path]) -> str:
    """Markdown tables of several runs: CAM mIoUs on the protocol's CAM split and on the segmentation split (both,
    once if they are the same), segmentation mIoU, training time. The splits are those of the first run's config;
    every run is read on the same splits.

    The runs are grouped by config (:func:`group_runs`: the ``seed<k>`` folders of one folder are one config's
    seeds). With one run per config: one row per run, labelled with its folder's name. Otherwise one row per config
    with the mean ± sample standard deviation over its runs and their number n, then every run's numbers in a
    second table (its recorded ``run.seed``). Notes on what is amiss in a group (:func:`_group_notes`) close it.
    """
    splits, columns = _compare_columns(run_dirs[0])
    groups = group_runs(run_dirs)
    rows: dict[str, list[tuple[Path, DictConfig, list[float | str | None]]]] = {}
    notes = []
    for label, runs in groups.items():
        cfgs = [load_run_config(run, [f"run.out_dir={run}"]) for run in runs]
        notes += _group_notes(label, runs, cfgs)
        rows[label] = [(run, cfg, _run_values(run, cfg, splits, columns)) for run, cfg in zip(runs, cfgs, strict=True)]
    headers = " | ".join(header for *_, header in columns)
    if all(len(runs) == 1 for runs in groups.values()):
        lines = ["| run | " + headers + " | training time |", "|---" * (len(columns) + 2) + "|"]
        for label, ((_, _, values),) in rows.items():
            cells = [_cell(value) for value in values[:-1]]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {_seconds(values[-1])} |")
        lines += ["", COMPARE_NOTE]
    else:
        lines = ["| config | n | " + headers + " | training time |", "|---" * (len(columns) + 3) + "|"]
        for label, found in rows.items():
            per_column = list(zip(*(values for *_, values in found), strict=True))
            cells = [_mean_std(list(values), 100.0, 1) for values in per_column[:-1]]
            time = _mean_std(list(per_column[-1]), 1.0, 0, " s")
            lines.append(f"| {label} | {len(found)} | " + " | ".join(cells) + f" | {time} |")
        lines += [
            "",
            "Mean ± sample standard deviation over the n runs of each config (its seeds: the seed<k> folders of one "
            'folder); "(n=k)": only k of them have the number. ' + COMPARE_NOTE,
            "",
            "Per run:",
            "",
            "| config | seed | run | " + headers + " | training time |",
            "|---" * (len(columns) + 4) + "|",
        ]
        for label, found in rows.items():
            for run, cfg, values in found:
                cells = [_cell(value) for value in values[:-1]] + [_seconds(values[-1])]
                lines.append(f"| {label} | {cfg.run.seed} | {run} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


# the validation numbers of the training curves (engine/validate.py, metrics.jsonl records of kind "val")
CURVE_METRICS = (("cam_miou", "CAM"), ("cam_aux_miou", "aux-CAM"),
                 ("seg_miou", "segmentation head (loss.weight.seg > 0)"))  # fmt: skip


def val_records(run: Path) -> list[dict[str, Any]]:
    """The run's validation records (``kind: "val"`` in ``metrics.jsonl``), one per step in step order: a step
    validated twice (a resume from an earlier checkpoint repeats it) keeps its last record."""
    path = run / "metrics.jsonl"
    by_step = {int(record["step"]): record for record in read_metrics(path, kind="val")} if path.is_file() else {}
    return [by_step[step] for step in sorted(by_step)]


def curves_figure(run_dirs: list[Path]):
    """The training curves of several runs: validation CAM, aux-CAM and segmentation mIoU against the iteration,
    one panel each, one colour per config (:func:`group_runs`). Each run with two or more seeds of its config
    validated is a thin line, and the config's mean over them, at the steps they all validated, a thick one
    (labelled with n); a config with one such run has its thick line only. A config without a segmentation head
    (loss.weight.seg = 0) has no segmentation curve. Runs without validation records are left out and named in a
    footnote.

    Returns ``(figure or None when no run has a validation record, summary)``; the summary holds ``configs``
    ({label: [runs plotted]}), ``skipped`` ([runs without validation records]) and ``lines`` ({metric: {"seeds": thin
    lines, "means": thick lines}}).
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = group_runs(run_dirs)
    summary: dict[str, Any] = {"configs": {}, "skipped": [], "lines": {key: {"seeds": 0, "means": 0}
                                                                     for key, _ in CURVE_METRICS}}  # fmt: skip
    plotted: dict[str, list[tuple[Path, DictConfig, list[dict[str, Any]]]]] = {}
    for label, runs in groups.items():
        for run in runs:
            records = val_records(run)
            if records:
                plotted.setdefault(label, []).append((run, load_run_config(run, [f"run.out_dir={run}"]), records))
            else:
                summary["skipped"].append(str(run))
    summary["configs"] = {label: [str(run) for run, *_ in found] for label, found in plotted.items()}
    if not plotted:
        return None, summary
    palette = colormaps["tab10" if len(groups) <= 10 else "tab20"]
    colour = {label: palette(index % palette.N) for index, label in enumerate(groups)}
    figure = Figure(figsize=(16.0, 5.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, len(CURVE_METRICS), sharey=True)
    for axes, (key, name) in zip(panels, CURVE_METRICS, strict=True):
        for label, found in plotted.items():
            if key == "seg_miou" and all(float(cfg.loss.weight.seg) == 0 for _, cfg, _ in found):
                continue  # its decoder was never trained: its validation number means nothing
            series = []
            for _, cfg, records in found:
                points = {int(r["step"]): 100 * float(r[key]) for r in records if r.get(key) is not None}
                if points:
                    series.append((cfg, points))
            if not series:
                continue
            if len(series) > 1:
                for cfg, points in series:
                    axes.plot(list(points), list(points.values()), color=colour[label], linewidth=0.8, alpha=0.45,
                              label=f"_{label} seed {cfg.run.seed}")  # fmt: skip
                    summary["lines"][key]["seeds"] += 1
            steps = sorted(set.intersection(*(set(points) for _, points in series)))
            if steps:
                mean = [statistics.mean(points[step] for _, points in series) for step in steps]
                axes.plot(steps, mean, color=colour[label], linewidth=2.5, label=f"{label} (n={len(series)})")
                summary["lines"][key]["means"] += 1
        axes.set_title(name)
        axes.set_xlabel("iteration")
        axes.grid(True, alpha=0.3)
    panels[0].set_ylabel("validation mIoU (%)")
    handles, names = panels[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside right upper", title="config (n = seeds)")
    split = load_run_config(run_dirs[0], [f"run.out_dir={run_dirs[0]}"]).data.val_split
    figure.suptitle(f"Validation during training on data.val_split ({split}), at cam.bkg_thre: "
                    "thin lines each seed, thick the mean over seeds at the steps they all validated")  # fmt: skip
    if summary["skipped"]:  # under the panels, in the space the layout keeps for it
        figure.supxlabel("not plotted, no validation records (train.eval_every=0?): " + ", ".join(summary["skipped"]),
                         fontsize=8, ha="left", x=0.005)  # fmt: skip
    return figure, summary


def write_curves(run_dirs: list[Path], out: Path) -> dict[str, Any]:
    """Draw :func:`curves_figure` to ``out`` (PNG; nothing written when no run validated); returns its summary with
    ``out`` (the path written, or None) added."""
    figure, summary = curves_figure(run_dirs)
    if figure is not None:
        from utils.visualize import save_figure

        save_figure(figure, out)
    summary["out"] = None if figure is None else str(out)
    return summary


def curves_message(summary: dict[str, Any]) -> str:
    """One line about what :func:`write_curves` drew, and the runs it left out."""
    drawn = sum(len(runs) for runs in summary["configs"].values())
    message = (f"curves: wrote {summary['out']} ({drawn} runs of {len(summary['configs'])} configs)"
               if summary["out"] else "curves: nothing drawn, no run has validation records")  # fmt: skip
    if summary["skipped"]:
        message += "; no validation records (train.eval_every=0?), not plotted: " + ", ".join(summary["skipped"])
    return message + "\n"
