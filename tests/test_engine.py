"""engine/step.py: one full MSFC step on a tiny ViT — gradients reach every trainable parameter, degenerate batches."""

from __future__ import annotations

import pytest
import torch

from engine.step import TrainStep, forward_grouped, label_cam_precision
from engine.task import heads_in_use
from losses import TERMS, TermSchedule
from models import build_model
from utils.config import load_config

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
    outs = forward_grouped(model, {"main": x, "rot": x.flip(-1), "small": torch.randn(4, 3, 32, 32)}, seg_view="main")
    assert calls == [(4, 3, CROP, CROP), (4, 3, 32, 32)]
    assert outs["main"].seg_logits.shape[0] == 2 and outs["small"].seg_logits is None
    direct = model(x, with_seg=True)
    assert torch.allclose(outs["main"].cam, direct.cam, atol=1e-5)


def test_curriculum_phases_follow_start_iterations():
    cfg = load_config("configs/coco.yaml", ["data.root=/unused", "run.out_dir=/unused"])
    schedule = TermSchedule.from_config(cfg.loss)
    assert heads_in_use(schedule, 0) == {"decoder": False, "proj_head": False}  # ToCo: classification only
    assert heads_in_use(schedule, 8000) == {"decoder": True, "proj_head": False}  # + seg / reg
    assert heads_in_use(schedule, 12000) == {"decoder": True, "proj_head": True}  # + contrast terms


def _crop_size_batch_sizes(cfg, batch) -> list[int]:
    """Batch sizes of the forwards at the crop size during one step (main and every same-size view share one)."""
    model = _model_with_bank(cfg)
    sizes = []
    model.register_forward_hook(lambda module, args, output: sizes.append(tuple(args[0].shape)))
    TrainStep(cfg, torch.device("cpu"))(model, batch, step=0, generator=torch.Generator().manual_seed(0))
    with_grad = [s for s in sizes if s[-1] == CROP]
    return [s[0] for s in with_grad]


def test_main_view_is_g1_encoded_once_by_default():
    """SPEC §3: main = G1, so the crop-size forward holds main + SMCM rotation + G2, not a separate G1 copy."""
    b = 2
    g1_sizes = _crop_size_batch_sizes(_cfg(), _batch(b))
    clean_sizes = _crop_size_batch_sizes(_cfg("views.main=clean"), _batch(b))
    # the multi-scale CAMs at scale 1.0 run main + its flip (2B); then the gradient forward of the same-size views
    assert g1_sizes[-1] == 3 * b and clean_sizes[-1] == 4 * b


def test_main_g1_flip_mirrors_img_box():
    """With G1 = a flip and nothing else, the step equals the clean-main step on the flipped crop and mirrored box.

    Every box-dependent part (token and pair labels, SMCM validity, memory prototypes, online seg labels, energy ROI)
    must follow the flip for this to hold; the box covers only the left 40 pixels, so a box left unflipped would not.
    CTC is off: it is the one term whose views (G1 as its first global view) differ between the two modes.
    """
    pure_flip = [f"views.g1.{k}=0.0" for k in ("jitter_p", "gray_p", "blur_p", "solarize_p")]
    cfg_g1 = _cfg("views.g1.flip_p=1.0", *pure_flip, "loss.weight.ctc=0.0")
    cfg_clean = _cfg("views.main=clean", "loss.weight.ctc=0.0")
    batch = _batch(2, box=(8, 56, 0, 40))
    flipped = {**batch, "img": batch["img"].flip(-1), "img_box": torch.tensor([[8, 56, CROP - 40, CROP]] * 2)}
    totals = []
    for cfg, data in ((cfg_g1, batch), (cfg_clean, flipped)):
        model = _model_with_bank(cfg)
        total, logs = TrainStep(cfg, torch.device("cpu"))(model, data, step=0, generator=torch.Generator())
        totals.append((total.item(), logs))
    assert totals[0][0] == pytest.approx(totals[1][0], rel=1e-5, abs=1e-6)
    for key, value in totals[1][1].items():
        assert totals[0][1][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # and the mirrored box matters: the clean step on the flipped crop with the original box gives another loss
    wrong = {**flipped, "img_box": batch["img_box"]}
    model = _model_with_bank(cfg_clean)
    total_wrong, _ = TrainStep(cfg_clean, torch.device("cpu"))(model, wrong, step=0, generator=torch.Generator())
    assert abs(total_wrong.item() - totals[1][0]) > 1e-4


def test_label_cams_are_fp32_unless_asked():
    assert label_cam_precision("fp32", "bf16") == "fp32"
    assert label_cam_precision("train", "bf16") == "bf16"
    with pytest.raises(ValueError, match="cam.precision"):
        label_cam_precision("fp16", "bf16")
    with pytest.raises(ValueError, match="views.main"):
        TrainStep(_cfg("views.main=g2"), torch.device("cpu"))


@pytest.mark.parametrize("agreement", ["none", "background", "both"])
def test_label_agreement_reaches_every_label_rule(monkeypatch, agreement):
    """cam.label_agreement reaches PTC, MP2M and the online seg labels: ``none`` hands each rule its published map
    alone (PTC: CAM_aux, MP2M and seg: CAM), ``background`` adds max(CAM, CAM_aux) for the background test, ``both``
    also tests foreground on min(CAM, CAM_aux)."""
    import core.cam as camlib
    import core.labels as lablib

    seen = {}

    def spy(name, fn, bg_key):
        def wrapped(*args, **kwargs):
            seen[name] = (args[0], kwargs.get(bg_key))
            return fn(*args, **kwargs)

        monkeypatch.setattr(lablib, name, wrapped)

    spy("token_labels", lablib.token_labels, "bg_scores")
    spy("prototype_labels", lablib.prototype_labels, "bg_cam")
    spy("online_seg_labels", lablib.online_seg_labels, "bg_cam")
    cams = {}
    original_multiscale = camlib.multiscale_cam

    def record_cams(*args, **kwargs):
        cams["pair"] = original_multiscale(*args, **kwargs)
        return cams["pair"]

    monkeypatch.setattr("engine.step.camlib.multiscale_cam", record_cams)
    cfg = _cfg(f"cam.label_agreement={agreement}")
    model = _model_with_bank(cfg)
    batch = _batch(2)
    TrainStep(cfg, torch.device("cpu"))(model, batch, step=0, generator=torch.Generator().manual_seed(0))
    mask = batch["label"][:, :, None, None]
    cam, cam_aux = (c.float() * mask for c in cams["pair"])
    assert set(seen) == {"token_labels", "prototype_labels", "online_seg_labels"}
    fg, bg = seen["online_seg_labels"]
    assert not torch.equal(cam, cam_aux)  # the two branches of an untrained model disagree somewhere
    if agreement == "none":
        torch.testing.assert_close(fg, cam)
        assert all(bg_map is None for _, bg_map in seen.values())
        return
    torch.testing.assert_close(fg, torch.minimum(cam, cam_aux) if agreement == "both" else cam)
    torch.testing.assert_close(bg, torch.maximum(cam, cam_aux))
    token_fg, token_bg = seen["token_labels"]  # PTC's published map is CAM_aux, at the token grid
    assert token_bg is not None and torch.all(token_fg <= token_bg)
    if agreement == "background":
        assert not torch.equal(token_fg, token_bg)
