"""utils/logging.py: metrics.jsonl records, TensorBoard events, truncation on resume."""

import json

from utils.logging import MetricsWriter, read_metrics


def test_metrics_jsonl_and_tensorboard(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.log(0, {"loss_cls": 0.5, "lr": 1e-4})
    writer.log(1, {"miou": float("nan")}, kind="val")
    writer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [
        {"step": 0, "kind": "train", "loss_cls": 0.5, "lr": 1e-4},
        {"step": 1, "kind": "val", "miou": None},  # non-finite numbers become null, keeping the file valid JSON
    ]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_resume_drops_records_after_the_resumed_step(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(5):
        writer.log(step, {"x": step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "kind": "tr')  # torn by a kill
    # resumed from the checkpoint taken after 2 completed steps: record 2 stays, 3 and 4 are rewritten
    MetricsWriter(tmp_path, resume_step=2, tensorboard=False).log(3, {"x": 30})
    assert [(r["step"], r["x"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(0, 0), (1, 1), (2, 2), (3, 30)]


def test_other_ranks_write_nothing(tmp_path):
    MetricsWriter(tmp_path, rank=1).log(0, {"x": 1})
    assert not (tmp_path / "metrics.jsonl").exists()
