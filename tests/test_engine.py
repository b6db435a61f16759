"""utils/engine.py: one full MSFC step on a tiny ViT — gradients reach every trainable parameter, degenerate batches."""

from __future__ import annotations

import pytest
import torch

from losses import TERMS
from models import build_model
from utils.config import load_config
from utils.engine import TrainStep, forward_grouped, heads_in_use

CROP = 64


def _cfg(*overrides: str):
    return load_config("configs/smoke.yaml", ["data.root=/unused", "run.out_dir=/unused", *overrides])


def _batch(b: int, labels: torch.Tensor | None = None, box: tuple[int, int, int, int] = (0, CROP, 0, CROP)) -> dict:
    g = torch.Generator().manual_seed(b)
    if labels is None:
        labels = torch.zeros(b, 20)
        labels[:, 3] = 1
        labels[::2, 7] = 1
    return {
        "img": torch.randint(0, 256, (b, 3, CROP, CROP), dtype=torch.uint8, generator=g),
        "g2": torch.randint(0, 256, (b, 3, CROP, CROP), dtype=torch.uint8, generator=g),
        "img_box": torch.tensor([box] * b),
        "label": labels,
    }


def _model_with_bank(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    # initialise every class of the bank, so L_mem is computed in the very first step
    model.memory.bank.copy_(torch.randn_like(model.memory.bank))
    model.memory.initialized.fill_(True)
    return model


def test_every_trainable_parameter_gets_a_gradient_from_the_total_loss():
    cfg = _cfg()
    model = _model_with_bank(cfg)
    total, logs = TrainStep(cfg, torch.device("cpu"))(model, _batch(2), step=0, generator=torch.Generator())
    assert {k[5:] for k in logs if k.startswith("loss_")} == set(TERMS) | {"total"}
    total.backward()
    for name, param in model.named_parameters():
        fixed = (
            "pos_embed" in name
            or name.startswith("proj_head_teacher.")
            or name.endswith("parametrizations.weight.original0")
        )
        if fixed:
            assert param.grad is None, f"{name} must not receive a gradient"
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} got no gradient"


@pytest.mark.parametrize(
    ("name", "batch"),
    [
        ("B=1", _batch(1)),
        ("B=3", _batch(3)),
        ("no foreground", _batch(2, labels=torch.zeros(2, 20))),
        ("single class everywhere", _batch(2, labels=torch.nn.functional.one_hot(torch.tensor([4, 4]), 20).float())),
        ("everything ignored", _batch(2, box=(0, 0, 0, 0))),
    ],
)
def test_degenerate_batches_give_finite_terms(name, batch):
    cfg = _cfg()
    model = _model_with_bank(cfg)
    total, logs = TrainStep(cfg, torch.device("cpu"))(model, batch, step=0, generator=torch.Generator())
    assert torch.isfinite(total), name
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values()), (name, logs)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), name


@pytest.mark.parametrize("term", ["ptc", "smc", "mem", "seg", "reg"])
def test_terms_vanish_with_zero_gradient_when_everything_is_ignored(term):
    """With an empty img_box every token/pixel is ignored: these terms are 0 and push nothing."""
    weights = [f"loss.weight.{t}={1.0 if t == term else 0.0}" for t in TERMS]
    cfg = _cfg(*weights)
    model = _model_with_bank(cfg)
    total, logs = TrainStep(cfg, torch.device("cpu"))(model, _batch(2, box=(0, 0, 0, 0)), 0, torch.Generator())
    assert logs[f"loss_{term}"] == 0.0
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)


def test_views_of_one_size_share_a_forward():
    cfg = _cfg()
    model = build_model(cfg)
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(tuple(args[0].shape)))
    x = torch.randn(2, 3, CROP, CROP)
    outs = forward_grouped(model, {"main": x, "rot": x.flip(-1), "small": torch.randn(4, 3, 32, 32)}, with_seg="main")
    assert calls == [(4, 3, CROP, CROP), (4, 3, 32, 32)]
    assert outs["main"].seg_logits.shape[0] == 2 and outs["small"].seg_logits is None
    direct = model(x, with_seg=True)
    assert torch.allclose(outs["main"].cam, direct.cam, atol=1e-5)


def test_curriculum_phases_follow_start_iterations():
    cfg = load_config("configs/coco.yaml", ["data.root=/unused", "run.out_dir=/unused"])
    assert heads_in_use(cfg, 0) == {"decoder": False, "proj_head": False}  # ToCo: classification only
    assert heads_in_use(cfg, 8000) == {"decoder": True, "proj_head": False}  # + seg / reg
    assert heads_in_use(cfg, 12000) == {"decoder": True, "proj_head": True}  # + contrast terms
