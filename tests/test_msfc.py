"""Assembled MSFC (SPEC §1): output dataclass, gradients, EMA teacher, parameter groups, build_model, normalisation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from models import MSFC, MSFCOutput, ViTBackbone, build_model
from models.memory import MemoryBank

D, HID, BOT, OUT, CH = 32, 64, 16, 24, 16


def tiny_model(seed: int = 0) -> MSFC:
    torch.manual_seed(seed)
    bb = ViTBackbone("vit_tiny_patch16_224", embed_dim=D, depth=3, num_heads=2, patch_size=8, img_size=64)
    return MSFC(
        bb,
        num_classes=21,
        decoder_channels=CH,
        decoder_dilation=5,
        proj_hidden_dim=HID,
        proj_bottleneck_dim=BOT,
        proj_out_dim=OUT,
        teacher_momentum=0.9,
    )


def test_output_fields_and_shapes():
    model = tiny_model()
    out = model(torch.randn(2, 3, 48, 80))
    assert isinstance(out, MSFCOutput)
    assert [f.name for f in dataclasses.fields(out)] == [
        "cls_logits", "cls_logits_aux", "cam", "cam_aux", "tokens", "tokens_aux", "cls_token", "seg_logits",
    ]  # fmt: skip
    assert out.cls_logits.shape == out.cls_logits_aux.shape == (2, 20)
    assert out.cam.shape == out.cam_aux.shape == (2, 20, 6, 10)
    assert out.tokens.shape == out.tokens_aux.shape == (2, D, 6, 10)
    assert out.cls_token.shape == (2, D)
    assert out.seg_logits.shape == (2, 21, 6, 10)
    assert model(torch.randn(1, 3, 16, 24), with_seg=False).seg_logits is None
    assert model.num_classes == 21 and model.num_fg_classes == 20 and model.patch_size == 8
    assert model.memory.bank.shape == (20, D)
    # The CAM contract of design.md: F.conv2d(tokens, classifier.weight).
    torch.testing.assert_close(out.cam, torch.nn.functional.conv2d(out.tokens, model.classifier.weight))


def test_projections_shapes_and_teacher_has_no_graph():
    model = tiny_model()
    cls = torch.randn(5, D, requires_grad=True)
    assert model.project(cls).shape == (5, OUT) and model.project(cls).requires_grad
    t = model.project_teacher(cls)
    assert t.shape == (5, OUT) and not t.requires_grad
    # Freshly built, the teacher is an exact copy of the student.
    torch.testing.assert_close(t, model.project(cls).detach())


def test_every_trainable_parameter_gets_a_gradient_and_fixed_ones_none():
    model = tiny_model()
    out = model(torch.randn(2, 3, 32, 40))
    # (dataclasses.astuple would deep-copy non-leaf tensors, which torch refuses; read the fields directly.)
    values = [getattr(out, f.name) for f in dataclasses.fields(out)]
    total = sum(v.float().sum() for v in values if v is not None)
    total = total + model.project(out.cls_token).sum() + model.project_teacher(out.cls_token).sum()
    total.backward()
    fixed = {"backbone.vit.pos_embed", "proj_head.last_layer.parametrizations.weight.original0"}
    for name, p in model.named_parameters():
        if name in fixed or name.startswith("proj_head_teacher."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert any(n.startswith("proj_head_teacher.") for n, _ in model.named_parameters())


def test_ema_update_moves_teacher_by_one_minus_m_times_difference():
    model = tiny_model()
    with torch.no_grad():
        for p in model.proj_head.parameters():
            p.add_(torch.randn_like(p))  # make student and teacher differ
    before = [t.detach().clone() for t in model.proj_head_teacher.parameters()]
    student = [s.detach().clone() for s in model.proj_head.parameters()]
    model.ema_update()  # m = teacher_momentum = 0.9
    for t0, s, t1 in zip(before, student, model.proj_head_teacher.parameters(), strict=True):
        torch.testing.assert_close(t1 - t0, (1 - 0.9) * (s - t0), atol=1e-6, rtol=1e-5)
    assert all(torch.equal(s, p) for s, p in zip(student, model.proj_head.parameters(), strict=True))
    # An explicit momentum overrides the default; m = 1 leaves the teacher unchanged, m = 0 copies the student.
    snapshot = [t.detach().clone() for t in model.proj_head_teacher.parameters()]
    model.ema_update(momentum=1.0)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, model.proj_head_teacher.parameters(), strict=True))
    model.ema_update(momentum=0.0)
    assert all(torch.equal(a, b) for a, b in zip(student, model.proj_head_teacher.parameters(), strict=True))


def test_forward_has_no_side_effects_on_teacher_or_bank():
    model = tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(1, 3, 16, 16))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_param_group_counts():
    model = tiny_model()
    groups = {g["name"]: g for g in model.param_groups(lr=1e-3, head_lr_mult=10.0, weight_decay=0.05)}
    count = {k: sum(p.numel() for p in g["params"]) for k, g in groups.items()}
    # Heads (C_fg = 20, D = 32): classifiers 2 * 20*32 = 1280; decoder 32*16*9 + 16*16*9 + 16*21 = 7248;
    # projection MLP weights 32*64 + 64*64 + 64*16 = 7168, biases 64 + 64 + 16 = 144; last layer v 24*16 = 384.
    assert count["heads"] == 1280 + 7248 + 7168 + 384
    assert count["heads_no_decay"] == 144
    # Backbone, all trainable ViT params except the frozen pos_embed, split by dimensionality / timm's no-decay set.
    vit = dict(model.backbone.vit.named_parameters())
    assert (
        count["backbone"] + count["backbone_no_decay"]
        == sum(p.numel() for p in vit.values()) - vit["pos_embed"].numel()
    )
    assert count["backbone_no_decay"] == sum(p.numel() for n, p in vit.items() if p.ndim == 1) + D  # + cls_token
    assert groups["backbone"]["lr"] == 1e-3 and groups["heads"]["lr"] == pytest.approx(1e-2)
    assert groups["heads"]["lr_mult"] == 10.0 and groups["backbone"]["lr_mult"] == 1.0
    assert groups["backbone"]["weight_decay"] == 0.05 and groups["heads_no_decay"]["weight_decay"] == 0.0
    # No parameter twice, none of the fixed ones, and a temporarily frozen head still belongs to its group.
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids))
    model.decoder.requires_grad_(False)
    again = {g["name"]: sum(p.numel() for p in g["params"]) for g in model.param_groups(1e-3)}
    assert again == count


def test_memory_bank_size_checked():
    bb = ViTBackbone("vit_tiny_patch16_224", embed_dim=D, depth=3, num_heads=2, patch_size=8, img_size=64)
    with pytest.raises(ValueError, match="memory bank"):
        MSFC(bb, num_classes=21, memory=MemoryBank(num_classes=21, dim=D))


def small_config(**model: object) -> DictConfig:
    """A full config for `build_model` with a tiny backbone and small heads; `model` overrides `cfg.model` keys."""
    return OmegaConf.create(
        {
            "data": {"num_classes": 5, "ignore_index": 255},
            "model": {
                "backbone": "vit_tiny_patch16_224",
                "backbone_kwargs": {"embed_dim": D, "depth": 3, "num_heads": 2, "patch_size": 8, "img_size": 32},
                "pretrained": False,
                "weights": None,
                "aux_layer": -2,
                "freeze_pos_embed": False,
                "pos_embed_resample": "timm",
                "norm_stats": "pretrained",
                "decoder_channels": 8,
                "decoder_dilation": 2,
                "proj_hidden_dim": 12,
                "proj_bottleneck_dim": 6,
                "proj_out_dim": 10,
                "teacher_momentum": 0.5,
                **model,
            },
            "memory": {"update_every": 10, "momentum": 0.3, "min_count": 2, "fuse_lambda": 0.0},
        }
    )


def test_build_model_reads_config():
    model = build_model(small_config())
    assert model.num_classes == 5 and model.teacher_momentum == 0.5
    assert model.backbone.aux_index == 1 and model.backbone.vit.pos_embed.requires_grad
    assert model.backbone.pos_embed_resample == "timm"
    assert model.backbone.norm_stats == "pretrained" and model.backbone.mean == (0.5, 0.5, 0.5)  # timm's config
    assert model.decoder.conv1.dilation == (2, 2) and model.decoder.conv1.out_channels == 8
    assert model.memory.num_classes == 4 and model.memory.momentum == 0.3 and model.memory.min_count == 2
    assert model.project(torch.randn(2, D)).shape == (2, 10)
    assert model(torch.randn(1, 3, 16, 16)).cam.shape == (1, 4, 2, 2)


def test_set_head_trainable_keeps_fixed_parameters_fixed():
    model = tiny_model()
    model.set_head_trainable("proj_head", False)
    assert not any(p.requires_grad for p in model.proj_head.parameters())
    model.set_head_trainable("proj_head", True)
    gain = model.proj_head.weight_gain
    assert not gain.requires_grad  # fixed at 1 by construction, never unfrozen
    assert all(p.requires_grad for p in model.proj_head.parameters() if p is not gain)
    model.set_head_trainable("decoder", False)
    assert not any(p.requires_grad for p in model.decoder.parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert not any(p.requires_grad for p in model.proj_head_teacher.parameters())
    with pytest.raises(ValueError, match="unknown head 'proj_head_teacher'"):
        model.set_head_trainable("proj_head_teacher", True)


def test_model_normalisation_is_the_backbones_and_checkpoints_load_across_norm_stats():
    from utils.checkpoint import load_model_state

    imagenet, own = build_model(small_config(norm_stats="imagenet")), build_model(small_config())
    white = torch.full((1, 3, 8, 8), 255, dtype=torch.uint8)
    torch.testing.assert_close(own.normalize(white), torch.ones(1, 3, 8, 8))  # (1 - 0.5) / 0.5
    torch.testing.assert_close(imagenet.normalize(white), imagenet.backbone.normalize(white), rtol=0, atol=0)
    torch.testing.assert_close(imagenet.denormalize(imagenet.normalize(white)), torch.ones(1, 3, 8, 8))
    # The statistics add no checkpoint state: a checkpoint loads strictly into a model with either setting.
    state = imagenet.state_dict()
    assert not any("pixel_" in k for k in state)
    load_model_state(own, state, "imagenet.pth")
    assert own.backbone.mean == (0.5, 0.5, 0.5)
    # A config written before model.norm_stats existed builds with the published ImageNet statistics.
    old = small_config()
    del old.model["norm_stats"]
    assert build_model(old).backbone.norm_stats == "imagenet"
