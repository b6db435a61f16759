"""The main job end to end at micro scale: scripts/demo.sh trains, infers and evaluates via the real entry points."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STAGES = ("cams", "cams_aux", "pseudo_labels", "seg", "seg_crf")


@pytest.mark.slow
@pytest.mark.smoke
def test_demo_pipeline_at_micro_scale(voc_root, tmp_path, all_background_miou):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(REPO), "NGPUS": "1", "OMP_NUM_THREADS": "1"}
    # micro schedule: 80 iterations, so a short warm-up and an early segmentation start
    micro = ["train.max_iters=80", "train.warmup_iters=5", "loss.start_iter.seg=20", "loss.start_iter.reg=20",
             "train.ckpt_every=80", "eval.num_overlays=2"]  # fmt: skip
    command = ["bash", "scripts/demo.sh", f"data.root={voc_root}", f"run.out_dir={out}", *micro]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    val_ids = (voc_root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    for folder, suffix in (("cams", ".npz"), ("pseudo_labels", ".png"), ("seg", ".png"), ("seg_crf", ".png")):
        assert sorted(p.stem for p in (out / folder / "val").glob(f"*{suffix}")) == sorted(val_ids), folder
    for stage in STAGES:
        assert (out / "eval" / f"{stage}_val.json").is_file(), stage
    assert (out / "eval" / "cams_val_sweep.png").is_file()
    results = json.loads((out / "results" / "results.json").read_text())
    for key in ("cam_miou", "cam_aux_miou", "pseudo_label_miou", "seg_miou", "seg_crf_miou"):
        assert 0.0 <= results[key] <= 1.0, key
    assert results["seconds"] > 0 and results["train_iterations"] == 80
    # every stage learned something: above predicting background everywhere
    assert results["cam_miou"] > all_background_miou + 0.05
    assert results["seg_miou"] > all_background_miou + 0.05
    assert list((out / "results" / "seg_overlays").glob("*.png"))
    assert "| segmentation head + DenseCRF |" in result.stdout  # the printed table
