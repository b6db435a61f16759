"""The benchmark's training step, runnable against any checkout of this repository (``--tree DIR``).

``tools.benchmark`` builds its train-stage variants with :func:`setup` in its own process. For a before/after
comparison of two versions of the code (``tools.benchmark --trees OLD NEW``) it starts this file once per checkout as
a worker process whose imports come from that checkout, then drives the workers in turn over stdin/stdout, so the
two versions are timed interleaved (A B A B ...) while each keeps its model, optimiser and warm caches::

    python tools/bench_step.py --tree /path/to/checkout --config configs/voc.yaml key=value ...
    stdin:  run 2      -> stdout: {"seconds": [s1, s2], "losses": [l1, l2]}   (one JSON line)
    stdin:  quit

Only the checkout's stable interfaces are used (``utils.config.load_config``, ``engine.task.MSFCTask``,
``utils.optim.build_optimizer``, ``losses.TERMS``), so older commits run too. The module imports nothing of ours at
import time: the worker puts ``--tree`` first on ``sys.path`` before the first import of a repository package.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch


def train_batch(cfg: Any, device: torch.device) -> dict:
    """A random batch shaped like the trainer's: uint8 images, full img_box, two label patterns; on ``device`` with
    the CPU batch under ``"host"``.

    ``img`` / ``g2``: ``[B, 3, S, S]`` uint8 (S = data.crop_size); ``img_box``: ``[B, 4]``; ``label``: ``[B, C-1]``.
    """
    b, s, c = int(cfg.train.batch_size), int(cfg.data.crop_size), int(cfg.data.num_classes) - 1
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(b, c)
    labels[:, 0] = 1
    labels[::2, c // 2] = 1
    host = {
        "img": torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g),
        "g2": torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g),
        "img_box": torch.tensor([[0, s, 0, s]] * b),
        "label": labels,
    }
    return {**{key: value.to(device) for key, value in host.items()}, "host": host}


def first_full_step(cfg: Any, terms: tuple[str, ...]) -> int:
    """The first step index at which every term of ``terms`` with a weight > 0 is on at its full weight."""
    loss = cfg.loss
    used = [t for t in terms if float(loss.weight[t]) > 0]
    return max((int(loss.start_iter[t]) + int(loss.ramp_iters[t]) for t in used), default=0)


def setup(cfg: Any, device: torch.device) -> SimpleNamespace:
    """Task, model (bank initialised so L_mem runs), AdamW, batch and generator, at the first full step.

    The same seed gives every caller the same weights, so two variants (or two checkouts) start alike.
    """
    from engine.task import MSFCTask
    from losses import TERMS
    from utils.optim import build_optimizer

    task = MSFCTask(cfg, device)
    torch.manual_seed(int(cfg.run.seed))
    model = task.build_model().to(device)
    if bool(cfg.train.get("compile", False)):
        model.compile()  # as the trainer does with train.compile=true; compiles in the warm-up steps
    model.memory.bank.normal_()
    model.memory.initialized.fill_(True)
    tc = cfg.train
    # an older checkout's build_optimizer takes AdamW's arguments only: pass the optimiser only when it is not AdamW
    choice = (
        {} if tc.get("optimizer", "adamw") == "adamw" else {"name": str(tc.optimizer), "momentum": float(tc.momentum)}
    )
    optimizer = build_optimizer(task.param_groups(model), tc.betas, float(tc.weight_decay), **choice)
    index = first_full_step(cfg, tuple(TERMS))
    task.enter_phase(model, task.phase(index))
    model.train()
    return SimpleNamespace(
        task=task,
        model=model,
        optimizer=optimizer,
        batch=train_batch(cfg, device),
        generator=torch.Generator().manual_seed(0),
        index=index,
    )


def plain_step(state: SimpleNamespace) -> float:
    """One optimiser step as the trainer runs it (loss, backward, AdamW, after_optimizer_step); returns the loss."""
    total, _ = state.task.loss(state.model, state.batch, state.index, state.generator)
    total.backward()
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.task.after_optimizer_step(state.model, state.index)
    state.index += 1
    return float(total.detach())


def _serve(args: argparse.Namespace) -> int:
    tree = Path(args.tree).resolve()
    sys.path.insert(0, str(tree))
    from utils.config import load_config  # from the checkout under test

    cfg = load_config([tree / path for path in args.config], args.overrides)
    if int(cfg.run.num_threads) > 0:
        torch.set_num_threads(int(cfg.run.num_threads))
    device = torch.device("cuda" if cfg.run.device != "cpu" and torch.cuda.is_available() else "cpu")
    state = setup(cfg, device)
    for _ in range(args.warmup):
        plain_step(state)
    parameters = sum(p.numel() for p in state.model.parameters())
    ready = {"ready": True, "parameters": parameters, "first_step_index": state.index,
             "torch_threads": torch.get_num_threads()}  # fmt: skip
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        seconds, losses = [], []
        for _ in range(int(command[1])):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            losses.append(plain_step(state))  # float(loss) is the step's own end-of-step host read
            seconds.append(time.perf_counter() - start)
        print(json.dumps({"seconds": seconds, "losses": losses}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", required=True, help="the checkout whose code runs")
    parser.add_argument("--config", action="append", default=[], help="config file, relative to --tree (repeatable)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the worker reports ready")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return _serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
