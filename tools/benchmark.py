"""Throughput of the expensive parts, on random inputs (no dataset needed). Speed lives here, never in unit tests.

python -m tools.benchmark --config configs/demo.yaml                       # every stage at the demo settings
python -m tools.benchmark --config configs/voc.yaml --what train model.pretrained=false data.crop_size=224

Stages: ``train`` (one full MSFC step: every loss term active, forward + backward + optimiser step), ``cam``
(multi-scale + flip CAM export of one image), ``seg`` (multi-scale + flip segmentation inference), ``crf`` (DenseCRF of
one image). Prints a table and, with ``--json FILE``, writes the figures (with the machine description).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from omegaconf import DictConfig

from core import cam as camlib
from engine.inference import predict_seg_logits
from engine.step import TrainStep
from losses import TERMS
from models import build_model
from utils.config import add_config_arguments, load_config
from utils.crf import crf_params, dense_crf
from utils.errors import exit_on_user_error
from utils.optim import build_optimizer

STAGES = ("train", "cam", "seg", "crf")


def _time(fn: Callable[[], object], iters: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call, after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - wall) / iters, (time.process_time() - cpu) / iters


def _train_batch(cfg: DictConfig, device: torch.device) -> dict:
    b, s, c = int(cfg.train.batch_size), int(cfg.data.crop_size), int(cfg.data.num_classes) - 1
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(b, c)
    labels[:, 0] = 1
    labels[::2, c // 2] = 1
    return {
        "img": torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g).to(device),
        "g2": torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g).to(device),
        "img_box": torch.tensor([[0, s, 0, s]] * b, device=device),
        "label": labels.to(device),
    }


def bench_train(cfg: DictConfig, device: torch.device, iters: int) -> dict:
    model = build_model(cfg).to(device)
    model.memory.bank.normal_()
    model.memory.initialized.fill_(True)  # so L_mem runs too
    optimizer = build_optimizer(model.param_groups(float(cfg.train.lr)), cfg.train.betas, float(cfg.train.weight_decay))
    step_fn, batch, generator = TrainStep(cfg, device), _train_batch(cfg, device), torch.Generator().manual_seed(0)
    step = max(int(cfg.loss.start_iter[t]) + int(cfg.loss.ramp_iters[t]) for t in TERMS)  # every term active

    def one_step() -> None:
        total, _ = step_fn(model, batch, step, generator)
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.ema_update()

    wall, cpu = _time(one_step, iters, device)
    b = int(cfg.train.batch_size)
    return {"seconds_per_step": wall, "cpu_seconds_per_step": cpu, "images_per_second": b / wall,
            "batch": b, "crop": int(cfg.data.crop_size)}  # fmt: skip


def _image(size: tuple[int, int], device: torch.device) -> torch.Tensor:
    return torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)).to(
        device
    )


def bench_cam(cfg: DictConfig, device: torch.device, iters: int, size: tuple[int, int]) -> dict:
    model = build_model(cfg).to(device).eval()
    x = model.normalize(_image(size, device))
    scales = tuple(cfg.cam.scales)
    with torch.no_grad():
        wall, cpu = _time(lambda: camlib.multiscale_cam(model, x, scales, int(cfg.cam.max_batch)), iters, device)
    return {"images_per_second": 1 / wall, "cpu_seconds_per_image": cpu, "image": list(size), "scales": list(scales)}


def bench_seg(cfg: DictConfig, device: torch.device, iters: int, size: tuple[int, int]) -> dict:
    model = build_model(cfg).to(device).eval()
    image, ev = _image(size, device), cfg.eval
    wall, cpu = _time(
        lambda: predict_seg_logits(
            model,
            image,
            tuple(ev.scales),
            bool(ev.flip),
            ev.flip_fusion,
            ev.scale_fusion,
            ev.resize,
            resize_mode=str(ev.resize_mode),
        ),
        iters,
        device,
    )
    return {"images_per_second": 1 / wall, "cpu_seconds_per_image": cpu, "image": list(size), "scales": list(ev.scales)}


def bench_crf(cfg: DictConfig, iters: int, size: tuple[int, int]) -> dict:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    prob = rng.random((int(cfg.data.num_classes), *size)).astype(np.float32)
    prob /= prob.sum(axis=0, keepdims=True)
    params = crf_params(cfg)
    wall, cpu = _time(lambda: dense_crf(image, prob, **params), iters, torch.device("cpu"))
    return {"images_per_second": 1 / wall, "cpu_seconds_per_image": cpu, "image": list(size), "workers": 1}


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {device}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", default=",".join(STAGES), help=f"comma-separated stages from {STAGES}")
    parser.add_argument("--iters", type=int, default=3, help="timed repetitions per stage (after one warm-up)")
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="image size for cam/seg/crf; default: the crop size")  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    add_config_arguments(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        overrides = ["data.root=unused", "run.out_dir=unused", *args.overrides]
        cfg = (
            load_config(args.config, overrides)
            if args.run is None
            else load_config(args.run / "config.yaml", overrides)
        )
        if int(cfg.run.num_threads) > 0:
            torch.set_num_threads(int(cfg.run.num_threads))
        device = torch.device("cuda" if cfg.run.device != "cpu" and torch.cuda.is_available() else "cpu")
        stages = [s.strip() for s in args.what.split(",") if s.strip()]
        unknown = sorted(set(stages) - set(STAGES))
        if unknown:
            parser.error(f"unknown stage(s) {unknown}; choose from {STAGES}")
        size = tuple(args.image_size) if args.image_size else (int(cfg.data.crop_size),) * 2
        results = {"machine": machine(), "backbone": str(cfg.model.backbone), "device": device.type}
        results["parameters"] = sum(p.numel() for p in build_model(cfg).parameters())
        runners = {
            "train": lambda: bench_train(cfg, device, args.iters),
            "cam": lambda: bench_cam(cfg, device, args.iters, size),
            "seg": lambda: bench_seg(cfg, device, args.iters, size),
            "crf": lambda: bench_crf(cfg, args.iters, size),
        }
        print(f"{results['machine']} | {cfg.model.backbone} ({results['parameters']:,} parameters) on {device.type}")
        for stage in stages:
            results[stage] = runners[stage]()
            figures = "  ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in results[stage].items()
            )
            print(f"{stage:6s} {figures}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        return 0

    return exit_on_user_error(body)


if __name__ == "__main__":
    sys.exit(main())
