"""Checks that need a CUDA device (mixed precision). Skipped, with the reason shown, where there is none."""

from __future__ import annotations

import pytest
import torch

from tools import train
from utils.checkpoint import read_checkpoint
from utils.logging import read_metrics

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (AMP bf16/fp16 paths)"),
]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_steps_are_finite_and_resume(voc_root, tmp_path, precision):
    out = tmp_path / precision
    args = ["--config", "configs/smoke.yaml", f"data.root={voc_root}", f"run.out_dir={out}", "run.device=cuda",
            f"train.precision={precision}", "train.max_iters=3"]  # fmt: skip
    assert train.main(args) == 0
    records = read_metrics(out / "metrics.jsonl", kind="train")
    assert records and all(torch.isfinite(torch.tensor(r["loss_total"])) for r in records)
    checkpoint = read_checkpoint(out / "checkpoints" / "last.pth")
    assert (checkpoint["scaler"] is not None) == (precision == "fp16")  # only fp16 needs a gradient scaler
    assert train.main([*args, "train.max_iters=4", "train.resume=auto"]) == 0
    assert read_checkpoint(out / "checkpoints" / "last.pth")["step"] == 4
