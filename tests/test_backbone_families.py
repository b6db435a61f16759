"""Other timm ViT families through `build_model` (SPEC §1.1): DINOv2 (patch 14, registers) and CLIP (pre-norm, own
mean/std). Tiny random models (`pretrained=False`) on the same code path as the real weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from models import build_model
from models.backbone import IMAGENET_MEAN, IMAGENET_STD
from utils.config import BASE_CONFIG

# OpenAI CLIP statistics (timm.data.OPENAI_CLIP_MEAN / _STD), written out so that the test pins the values.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DIM = 48
SMALL = {"embed_dim": DIM, "depth": 2, "num_heads": 2}
DINOV2 = ("vit_small_patch14_dinov2", {**SMALL, "img_size": 56})  # 4x4 native grid of 14 px patches
DINOV2_REG = ("vit_small_patch14_reg4_dinov2", {**SMALL, "img_size": 56})  # + 4 registers, no pos_embed on prefix
# Registers that do carry a position embedding (no_embed_class=False): the prefix part of pos_embed has 5 rows.
DINOV2_REG_EMBEDDED = ("vit_small_patch14_reg4_dinov2", {**SMALL, "img_size": 56, "no_embed_class": False})
CLIP = ("vit_base_patch16_clip_224", {**SMALL, "img_size": 64})  # 4x4 grid of 16 px patches, LayerNorm norm_pre
FAMILIES = {"dinov2": DINOV2, "dinov2_reg4": DINOV2_REG, "dinov2_reg4_embedded": DINOV2_REG_EMBEDDED, "clip": CLIP}


def config(name: str, kwargs: dict[str, Any], **model: Any) -> DictConfig:
    """configs/base.yaml with `model.backbone=name`, `model.backbone_kwargs=kwargs`, small heads, no download."""
    base = OmegaConf.load(BASE_CONFIG)
    small_heads = {"decoder_channels": 8, "proj_hidden_dim": 16, "proj_bottleneck_dim": 8, "proj_out_dim": 12}
    overrides = {"backbone": name, "backbone_kwargs": kwargs, "pretrained": False, "aux_layer": -1, **small_heads}
    cfg = OmegaConf.merge(base, {"model": {**overrides, **model}})
    cfg.model.backbone_kwargs = kwargs  # replace, not merge into, base's {}
    return cfg


def build(family: str, **model: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    name, kwargs = FAMILIES[family]
    return build_model(config(name, kwargs, **model)).eval()


@torch.no_grad()
def make_visible(vit: torch.nn.Module) -> None:
    """Undo the near-identity initialisation so that a misplaced token or position row changes every output:
    DINOv2's LayerScale starts at 1e-5 (the blocks barely act), position embeddings and tokens at std 0.02."""
    for module in vit.modules():
        if hasattr(module, "gamma") and isinstance(module.gamma, torch.nn.Parameter):  # timm LayerScale
            module.gamma.fill_(1.0)
    for tensor in (vit.pos_embed, vit.cls_token, vit.reg_token):
        if tensor is not None:
            tensor.normal_()


def reference_sequence(vit: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The published forward written out: pos_embed bicubic-resampled without antialiasing, prefix tokens first,
    norm_pre, the blocks (outputs kept, before the final norm), the final norm. Returns (normed sequence, blocks)."""
    patches = vit.patch_embed(x)  # [B, h, w, D] under dynamic_img_size
    batch, h, w, dim = patches.shape
    gh, gw = vit.patch_embed.grid_size
    n_prefix = vit.num_prefix_tokens
    n_embedded = 0 if vit.no_embed_class else n_prefix  # prefix rows of pos_embed
    table = vit.pos_embed[:, n_embedded:].reshape(1, gh, gw, dim).permute(0, 3, 1, 2)
    grid_pos = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    prefix = torch.cat([t for t in (vit.cls_token, vit.reg_token) if t is not None], dim=1).expand(batch, -1, -1)
    assert prefix.shape[1] == n_prefix
    if n_embedded:
        prefix = prefix + vit.pos_embed[:, :n_embedded]
    seq = vit.norm_pre(torch.cat([prefix, patches.reshape(batch, h * w, dim) + grid_pos], dim=1))
    blocks = []
    for block in vit.blocks:
        seq = block(seq)
        blocks.append(seq)
    return vit.norm(seq), blocks


def as_map(seq: torch.Tensor, n_prefix: int, h: int, w: int) -> torch.Tensor:
    return seq[:, n_prefix:].transpose(1, 2).reshape(seq.shape[0], -1, h, w)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("grid", [(3, 5), (4, 4), (6, 2)])
def test_family_builds_and_returns_the_token_grid(family: str, grid: tuple[int, int]):
    model = build(family)
    bb = model.backbone
    p = {"clip": 16}.get(family, 14)
    assert bb.patch_size == p == model.patch_size  # read from the model, not from the name
    assert bb.num_prefix_tokens == (1 if family in ("dinov2", "clip") else 5)
    h, w = grid
    x = torch.randn(2, 3, h * p, w * p)
    make_visible(bb.vit)
    with torch.no_grad():
        out = model(x)
        final, blocks = reference_sequence(bb.vit, x)
    assert out.tokens.shape == out.tokens_aux.shape == (2, DIM, h, w)
    assert out.cls_token.shape == (2, DIM)
    assert out.cam.shape == (2, 20, h, w) and out.seg_logits.shape == (2, 21, h, w)
    n = bb.num_prefix_tokens
    # Patch tokens start after every prefix token (class + registers); the class token is the first; aux_layer=-1
    # is the last block's output before the final norm.
    torch.testing.assert_close(out.tokens, as_map(final, n, h, w), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cls_token, final[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.tokens_aux, as_map(blocks[-1], n, h, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["dinov2_reg4", "dinov2_reg4_embedded"])
def test_registers_keep_their_position_embedding_when_the_grid_is_resampled(family: str):
    vit = build(family).backbone.vit
    make_visible(vit)  # a non-smooth table makes a misplaced row visible
    with torch.no_grad():
        seq = vit._pos_embed(torch.zeros(1, 3, 5, DIM))  # zero patch embeddings: only tokens + position remain
        _, blocks = reference_sequence(vit, torch.zeros(1, 3, 42, 70))
    expected_prefix = torch.cat([vit.cls_token, vit.reg_token], dim=1)
    if not vit.no_embed_class:
        expected_prefix = expected_prefix + vit.pos_embed[:, :5]
    torch.testing.assert_close(seq[:, :5], expected_prefix)
    assert seq.shape == (1, 5 + 15, DIM) and blocks[0].shape == (1, 5 + 15, DIM)


def test_aux_layer_counts_blocks_of_the_family():
    x = torch.randn(1, 3, 42, 56)
    for aux_layer, block in ((0, 0), (-2, 0), (1, 1)):
        model = build("dinov2_reg4", aux_layer=aux_layer)
        make_visible(model.backbone.vit)
        assert model.backbone.aux_index == block
        with torch.no_grad():
            _, blocks = reference_sequence(model.backbone.vit, x)
            aux = model(x, with_seg=False).tokens_aux
        torch.testing.assert_close(aux, as_map(blocks[block], 5, 3, 4), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"aux_layer must be in \[-2, 1\] for vit_small_patch14_reg4_dinov2"):
        build("dinov2_reg4", aux_layer=-3)


def test_clip_pre_norm_is_applied():
    bb = build("clip").backbone
    vit = bb.vit
    assert isinstance(vit.norm_pre, torch.nn.LayerNorm)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        vit.norm_pre.weight.mul_(3.0)  # a visible pre-norm
        vit.norm_pre.bias.add_(0.5)
        out = bb(x)
        final, _ = reference_sequence(vit, x)
        pre_norm, vit.norm_pre = vit.norm_pre, torch.nn.Identity()
        without, _ = reference_sequence(vit, x)
        vit.norm_pre = pre_norm
    torch.testing.assert_close(out.tokens, as_map(final, 1, 3, 3), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.tokens, as_map(without, 1, 3, 3), atol=1e-3)


@pytest.mark.parametrize("family", ["clip", "dinov2"])
def test_norm_stats_pretrained_reads_the_weights_own_statistics(family: str):
    default, own = build(family), build(family, norm_stats="pretrained")
    assert default.backbone.norm_stats == "imagenet"
    assert (default.backbone.mean, default.backbone.std) == (IMAGENET_MEAN, IMAGENET_STD)
    expected_mean, expected_std = (CLIP_MEAN, CLIP_STD) if family == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
    assert own.backbone.mean == pytest.approx(expected_mean, abs=1e-8)
    assert own.backbone.std == pytest.approx(expected_std, abs=1e-8)
    # The statistics are the ones applied: a uint8 image normalises to (x / 255 - mean) / std per channel.
    img = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    rgb = torch.tensor([0.0, 128 / 255, 1.0])
    for model, (mean, std) in ((own, (expected_mean, expected_std)), (default, (IMAGENET_MEAN, IMAGENET_STD))):
        want = ((rgb - torch.tensor(mean)) / torch.tensor(std)).view(1, 3, 1, 1).expand(1, 3, 2, 2)
        torch.testing.assert_close(model.normalize(img), want)
    if family == "clip":
        assert not torch.allclose(own.normalize(img), default.normalize(img), atol=1e-3)
