"""tools/report.py: the results table and folder gathered from a run's evaluation files."""

import json

from tools import report
from utils.config import load_config, save_config
from utils.io import atomic_write_json


def test_report_collects_every_stage_and_marks_missing_ones(tmp_path):
    cfg = load_config("configs/demo.yaml", [f"run.out_dir={tmp_path}", "data.root=/unused"])
    save_config(cfg, tmp_path)
    eval_dir = tmp_path / "eval"
    atomic_write_json(eval_dir / "cams_val.json", {"miou": 0.61})
    atomic_write_json(eval_dir / "cams_val_sweep.json", {"miou": 0.64, "threshold": 0.35})
    atomic_write_json(eval_dir / "pseudo_labels_val.json", {"miou": 0.58, "labelled_miou": 0.7, "coverage": 0.9})
    atomic_write_json(eval_dir / "seg_val.json", {"miou": 0.55})
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 500, "kind": "train", "seconds": 321.0}) + "\n")
    (tmp_path / "seg" / "val_overlays").mkdir(parents=True)
    (tmp_path / "seg" / "val_overlays" / "a.png").write_bytes(b"png")

    assert report.main(["--run-dir", str(tmp_path), "--seconds", "555"]) == 0
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert results["cam_miou"] == 0.61 and results["cam_best_miou"] == 0.64 and results["cam_best_threshold"] == 0.35
    assert results["pseudo_label_miou"] == 0.58 and results["pseudo_label_coverage"] == 0.9
    assert results["seg_miou"] == 0.55
    assert results["cam_aux_miou"] is None and results["seg_crf_miou"] is None  # not evaluated: null, not 0
    assert (results["train_iterations"], results["train_seconds"], results["seconds"]) == (500, 321.0, 555.0)
    table = (tmp_path / "results" / "results.md").read_text()
    assert "| segmentation head | 55.0 |" in table and "| segmentation head + DenseCRF | not run |" in table
    assert "best threshold of the sweep (0.35)" in table
    assert (tmp_path / "results" / "seg_overlays" / "a.png").is_file()


def test_compare_tabulates_runs_and_marks_untrained_seg_heads(tmp_path):
    runs = []
    for name, seg_weight, miou in (("baseline", 0.0, 0.5), ("full", 0.1, 0.6)):
        run = tmp_path / name
        cfg = load_config(
            "configs/demo.yaml", [f"run.out_dir={run}", "data.root=/unused", f"loss.weight.seg={seg_weight}"]
        )
        save_config(cfg, run)
        atomic_write_json(run / "eval" / "cams_val.json", {"miou": miou})
        atomic_write_json(run / "eval" / "seg_val.json", {"miou": 0.01})
        runs.append(run)
    out = tmp_path / "table.md"
    assert report.main(["--compare", *map(str, runs), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[2].startswith("| baseline | 50.0 | n/a | n/a | no seg head |")
    assert lines[3].startswith("| full | 60.0 | n/a | n/a | 1.0 |")
