"""ViTBackbone (SPEC §1.1): normalisation, dense token shapes, aux tokens, frozen pos_embed, prefix tokens, weights."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from models.backbone import IMAGENET_MEAN, IMAGENET_STD, ViTBackbone, normalize_images
from utils.errors import InputError, UserError

TINY = {"embed_dim": 32, "depth": 4, "num_heads": 2, "patch_size": 8, "img_size": 64}
TINY_NAME = "vit_tiny_patch16_224"


def tiny_backbone(**overrides) -> ViTBackbone:
    torch.manual_seed(0)
    kwargs = {**TINY, **overrides}
    return ViTBackbone(TINY_NAME, **kwargs).eval()


def manual_pass(vit: torch.nn.Module, x: torch.Tensor, aux_index: int) -> tuple[torch.Tensor, ...]:
    """Reference forward from timm's public pieces: returns (full normed sequence, block `aux_index` output)."""
    y = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    aux = None
    for i, block in enumerate(vit.blocks):
        y = block(y)
        if i == aux_index:
            aux = y
    return vit.norm(y), aux


# ------------------------------------------------------------------------------------------------ normalisation


def test_normalize_known_values_and_round_trip():
    bb = tiny_backbone()
    img = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    img[0, 0, 0, 0] = 255
    out = bb.normalize(img)
    assert out.dtype == torch.float32
    # 255 -> 1.0 -> (1 - 0.485) / 0.229 in the red channel; 0 -> -mean/std elsewhere.
    assert out[0, 0, 0, 0].item() == pytest.approx((1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], rel=1e-6)
    assert out[0, 2, 1, 1].item() == pytest.approx(-IMAGENET_MEAN[2] / IMAGENET_STD[2], rel=1e-6)
    # uint8 and the equivalent float input agree; denormalize inverts; the pure function with the same stats agrees.
    rnd = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    torch.testing.assert_close(bb.normalize(rnd), bb.normalize(rnd.float() / 255))
    torch.testing.assert_close(bb.denormalize(bb.normalize(rnd)), rnd.float() / 255, atol=1e-6, rtol=0)
    torch.testing.assert_close(bb.normalize(rnd), normalize_images(rnd, IMAGENET_MEAN, IMAGENET_STD), rtol=0, atol=0)
    assert bb.normalize(rnd.double() / 255).dtype == torch.float64


def test_normalize_rejects_bad_input():
    bb = tiny_backbone()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bb.normalize(torch.full((1, 3, 2, 2), 200.0))
    with pytest.raises(ValueError, match="RGB"):
        bb.normalize(torch.zeros(1, 4, 2, 2, dtype=torch.uint8))
    with pytest.raises(TypeError, match="dtype"):
        bb.normalize(torch.zeros(1, 3, 2, 2, dtype=torch.int32))


def test_norm_stats_imagenet_by_default_even_where_timms_config_differs():
    """SPEC §1.1: the published ImageNet statistics, although timm's config of these weights says 0.5 / 0.5."""
    assert timm.create_model(TINY_NAME, pretrained=False).pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    default, own = tiny_backbone(), tiny_backbone(norm_stats="pretrained")
    assert default.norm_stats == "imagenet" and (default.mean, default.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert own.norm_stats == "pretrained" and own.mean == (0.5, 0.5, 0.5) and own.std == (0.5, 0.5, 0.5)
    white = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    torch.testing.assert_close(own.normalize(white), torch.ones(1, 3, 2, 2))
    torch.testing.assert_close(own.denormalize(-torch.ones(1, 3, 2, 2)), torch.zeros(1, 3, 2, 2))


def test_norm_stats_errors_name_the_key():
    with pytest.raises(InputError, match=r"model\.norm_stats must be one of \('imagenet', 'pretrained'\)"):
        tiny_backbone(norm_stats="clip")
    # A model whose timm config carries no mean/std cannot normalise with "its own" statistics.
    with pytest.raises(InputError, match=r"model\.norm_stats=pretrained: .*vit_tiny_patch16_224 has no usable"):
        tiny_backbone(norm_stats="pretrained", pretrained_cfg_overlay={"mean": None, "std": None})
    # timm's own way to give a model statistics is honoured.
    custom = tiny_backbone(norm_stats="pretrained", pretrained_cfg_overlay={"mean": (0.1, 0.2, 0.3), "std": (1, 2, 3)})
    assert custom.mean == (0.1, 0.2, 0.3) and custom.std == (1.0, 2.0, 3.0)


def test_norm_stats_are_not_checkpoint_state_and_follow_the_device_and_dtype():
    imagenet, own = tiny_backbone(), tiny_backbone(norm_stats="pretrained")
    # No new keys: a state dict saved before (or with other statistics) loads strictly, and vice versa.
    assert set(imagenet.state_dict()) == {f"vit.{k}" for k in imagenet.vit.state_dict()}
    own.load_state_dict(imagenet.state_dict(), strict=True)
    imagenet.load_state_dict(own.state_dict(), strict=True)
    assert own.mean == (0.5, 0.5, 0.5)  # loading weights does not change the statistics
    assert {n for n, _ in imagenet.named_buffers()} == {"pixel_mean", "pixel_std"}
    # Buffers move with the module (.to(device) too); the images' dtype decides the result's.
    imagenet.to(torch.float64)
    assert (
        imagenet.pixel_mean.dtype == torch.float64 and imagenet.normalize(torch.rand(1, 3, 2, 2)).dtype == torch.float32
    )
    rnd = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    torch.testing.assert_close(imagenet.normalize(rnd), (rnd - mean) / std, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- forward


def test_shapes_non_square_and_other_size_than_img_size():
    bb = tiny_backbone()
    out = bb(torch.randn(2, 3, 48, 80))  # img_size is 64; 48x80 with p=8 -> 6x10 tokens
    assert out.cls_token.shape == (2, 32)
    assert out.tokens.shape == (2, 32, 6, 10)
    assert out.tokens_aux.shape == (2, 32, 6, 10)
    assert bb.patch_size == 8 and bb.embed_dim == 32 and bb.num_prefix_tokens == 1


def test_tokens_match_manual_pass_and_aux_is_pre_norm_block_output():
    bb = tiny_backbone(aux_layer=-3)  # depth 4: -3 -> block index 1
    assert bb.aux_index == 1
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        out = bb(x)
        final, aux = manual_pass(bb.vit, x, aux_index=1)
    h, w = 5, 7
    ref_tokens = final[:, 1:].transpose(1, 2).reshape(2, 32, h, w)
    ref_aux = aux[:, 1:].transpose(1, 2).reshape(2, 32, h, w)
    torch.testing.assert_close(out.cls_token, final[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.tokens, ref_tokens, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.tokens_aux, ref_aux, atol=1e-6, rtol=0)
    # The aux tokens are neither the final tokens nor the normed block output.
    assert not torch.allclose(out.tokens_aux, out.tokens, atol=1e-3)
    normed_aux = bb.vit.norm(aux)[:, 1:].transpose(1, 2).reshape(2, 32, h, w)
    assert not torch.allclose(out.tokens_aux, normed_aux, atol=1e-3)


def _published_pos_embed(vit: torch.nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """Reference for SPEC §1.1: the patch part of pos_embed through F.interpolate(bicubic, align_corners=False)."""
    gh, gw = vit.patch_embed.grid_size
    patch = vit.pos_embed.detach()[:, 1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    out = torch.nn.functional.interpolate(patch, size=grid, mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)


@pytest.mark.parametrize("grid", [(3, 3), (6, 6), (7, 5), (8, 8), (12, 16)])
def test_pos_embed_resampled_as_published_bicubic_without_antialias(grid):
    bb = tiny_backbone()  # 8x8 native grid
    assert bb.pos_embed_resample == "bicubic"
    vit = bb.vit
    with torch.no_grad():
        vit.pos_embed.normal_()  # a non-smooth embedding makes kernel differences visible
        zeros = torch.zeros(2, *grid, TINY["embed_dim"])
        seq = vit._pos_embed(zeros)  # patch embeddings 0 -> the sequence is the (resampled) position embedding
    torch.testing.assert_close(seq[:, 1:], _published_pos_embed(vit, grid).expand(2, -1, -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(seq[:, 0], (vit.cls_token + vit.pos_embed[:, :1])[:, 0].expand(2, -1))


def test_pos_embed_timm_option_keeps_timms_antialiased_resampling():
    published, timm_style = tiny_backbone(), tiny_backbone(pos_embed_resample="timm")
    timm_style.load_state_dict(published.state_dict())
    with torch.no_grad():
        for bb in (published, timm_style):
            bb.vit.pos_embed.copy_(torch.randn_like(bb.vit.pos_embed, generator=torch.Generator().manual_seed(1)))
        zeros = torch.zeros(1, 3, 3, TINY["embed_dim"])
        expected = resample_abs_pos_embed(timm_style.vit.pos_embed, new_size=[3, 3], old_size=[8, 8])
        torch.testing.assert_close(timm_style.vit._pos_embed(zeros), expected)
        # Downsampling is where antialiasing matters: the two kernels differ clearly on a 3x3 grid.
        diff = (published.vit._pos_embed(zeros) - expected)[:, 1:]
        assert diff.norm() / expected[:, 1:].norm() > 0.05
        # At the native grid both are the identity, so the backbones agree exactly.
        x = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(published(x).tokens, timm_style(x).tokens, rtol=0, atol=0)


def test_pos_embed_resample_survives_deepcopy_and_rejects_unknown_kernel():
    import copy

    bb = tiny_backbone()
    twin = copy.deepcopy(bb)
    assert twin.vit._pos_embed.__self__ is twin.vit  # bound to the copy, not to the original
    x = torch.randn(1, 3, 48, 40)
    torch.testing.assert_close(twin(x).tokens, bb(x).tokens, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pos_embed_resample"):
        tiny_backbone(pos_embed_resample="bilinear")


def test_pos_embed_frozen_by_default_and_trainable_on_request():
    assert tiny_backbone().vit.pos_embed.requires_grad is False
    assert tiny_backbone(freeze_pos_embed=False).vit.pos_embed.requires_grad is True
    # Every other parameter stays trainable.
    assert all(p.requires_grad for n, p in tiny_backbone().named_parameters() if not n.endswith("pos_embed"))


def test_bad_arguments_raise():
    bb = tiny_backbone()
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        bb(torch.randn(1, 3, 44, 64))
    with pytest.raises(ValueError, match="aux_layer"):
        tiny_backbone(aux_layer=-5)
    with pytest.raises(ValueError, match="num_classes"):
        ViTBackbone(TINY_NAME, num_classes=10, **TINY)


def test_dinov2_registers_patch14_grid():
    torch.manual_seed(0)
    bb = ViTBackbone("vit_small_patch14_reg4_dinov2", embed_dim=32, depth=3, num_heads=2, img_size=56).eval()
    assert bb.patch_size == 14 and bb.num_prefix_tokens == 5  # class token + 4 registers
    x = torch.randn(2, 3, 42, 70)  # 3x5 grid
    with torch.no_grad():
        out = bb(x)
        seq = bb.vit.forward_features(x)  # [B, 5 + 15, D], normed
    assert out.tokens.shape == (2, 32, 3, 5) and out.tokens_aux.shape == (2, 32, 3, 5)
    # The patch tokens start after all 5 prefix tokens; the class token is the first one.
    torch.testing.assert_close(out.tokens, seq[:, 5:].transpose(1, 2).reshape(2, 32, 3, 5), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.cls_token, seq[:, 0], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------------ weights


def test_missing_weights_file_names_it(tmp_path: Path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ViTBackbone(TINY_NAME, weights=path, **TINY)


def test_unknown_suffix_rejected(tmp_path: Path):
    path = tmp_path / "weights.ckpt"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"\.ckpt"):
        ViTBackbone(TINY_NAME, weights=path, **TINY)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("garbage.safetensors", r"cannot be read as a \.safetensors file \(.*header"),
        ("garbage.npz", r"cannot be read as an \.npz archive"),
    ],
)
def test_garbage_weights_file_error_names_the_file_and_what_was_expected(tmp_path: Path, name: str, expected: str):
    """Issue #10 item 10: safetensors alone says `header too large`, with no file name."""
    path = tmp_path / name
    path.write_bytes(b"<html>not found</html>" * 4)  # e.g. a failed download saved under the weights' name
    with pytest.raises(ValueError, match=rf"backbone weights {re.escape(str(path))}: {expected}") as caught:
        ViTBackbone(TINY_NAME, weights=path, **TINY)
    assert isinstance(caught.value, UserError)  # a tool prints it as one line, without a traceback


def test_pos_embed_of_other_grid_is_resampled(tmp_path: Path):
    src = timm.create_model(TINY_NAME, pretrained=False, num_classes=0, **TINY)  # 64 / 8 -> 8x8 grid
    path = tmp_path / "tiny.pth"
    torch.save(src.state_dict(), path)
    bb = ViTBackbone(TINY_NAME, weights=path, **{**TINY, "img_size": 96})  # 12x12 grid
    expected = resample_abs_pos_embed(src.pos_embed.detach(), new_size=[12, 12], old_size=[8, 8], num_prefix_tokens=1)
    assert bb.vit.pos_embed.shape == (1, 145, 32)
    torch.testing.assert_close(bb.vit.pos_embed.detach(), expected)
    torch.testing.assert_close(bb.vit.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight, atol=0, rtol=0)


@pytest.fixture(scope="module")
def vit_b_files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A random timm ViT-B/16 (with its 1000-class head) saved as a wrapped .pth and a bare .safetensors file."""
    torch.manual_seed(1)
    ref = timm.create_model("vit_base_patch16_224", pretrained=False, dynamic_img_size=True).eval()
    folder = tmp_path_factory.mktemp("vitb")
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert "head.weight" in state  # the head must be dropped by the loader
    # A DDP-style checkpoint: {"model": {"module.<key>": ...}}.
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "step": 3}, folder / "vitb.pth")
    save_file(state, str(folder / "vitb.safetensors"))
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        seq = ref.forward_features(x)
    return {"folder": folder, "x": x, "seq": seq}


@pytest.mark.slow
@pytest.mark.parametrize("filename", ["vitb.pth", "vitb.safetensors"])
def test_vit_b_local_file_reproduces_timm_features(vit_b_files: dict, filename: str):
    # timm's own resampling, so that the features must equal timm's forward bit for bit (2x3 grid from 14x14).
    path = vit_b_files["folder"] / filename
    bb = ViTBackbone("vit_base_patch16_224", weights=path, pos_embed_resample="timm").eval()
    with torch.no_grad():
        out = bb(vit_b_files["x"])
    seq = vit_b_files["seq"]  # [1, 1 + 2*3, 768]
    assert torch.equal(out.cls_token, seq[:, 0])
    assert torch.equal(out.tokens, seq[:, 1:].transpose(1, 2).reshape(1, 768, 2, 3))


@pytest.mark.slow
def test_deit_small_file_into_vit_b_names_mismatched_keys(tmp_path: Path):
    deit = timm.create_model("deit_small_patch16_224", pretrained=False)
    path = tmp_path / "deit_s.pth"
    torch.save(deit.state_dict(), path)
    with pytest.raises(ValueError) as info:
        ViTBackbone("vit_base_patch16_224", weights=path)
    msg = str(info.value)
    assert "vit_base_patch16_224" in msg and "deit_s.pth" in msg
    # Same key set (both are 12-block ViTs) but D = 384 vs 768: every tensor mismatches, names listed with counts.
    assert "blocks.0.attn.qkv.weight (1152, 384) vs (2304, 768)" in msg
    n_keys = len(deit.state_dict()) - 2  # minus head.weight / head.bias, which are dropped
    assert f"shape mismatches (file vs model) {n_keys} [" in msg
    assert "missing keys 0 []" in msg and "unexpected keys 0 []" in msg


def test_wrong_depth_file_names_missing_keys(tmp_path: Path):
    src = timm.create_model(TINY_NAME, pretrained=False, num_classes=0, **{**TINY, "depth": 3})
    path = tmp_path / "shallow.safetensors"
    save_file(src.state_dict(), str(path))
    with pytest.raises(ValueError, match=r"missing keys 12 \[blocks\.3\.") as info:
        ViTBackbone(TINY_NAME, weights=path, **TINY)
    assert TINY_NAME in str(info.value)


# ---------------------------------------------------------------------------------------------------------- npz


def to_google_npz(vit: torch.nn.Module, path: Path) -> None:
    """Write a timm ViT in the original Google ViT .npz naming (the inverse of timm's `_load_weights` layout).

    Conv kernels are HWIO, dense kernels [in, out], attention q/k/v kernels [D, heads, head_dim] and the attention
    output kernel [heads, head_dim, D]; non-big-vision blocks use LayerNorm_0/2, attention _1 and MlpBlock_3.
    """
    sd = {k: v.detach().numpy() for k, v in vit.state_dict().items()}
    dim = sd["cls_token"].shape[-1]
    heads = vit.blocks[0].attn.num_heads
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    for i in range(len(vit.blocks)):
        b, g = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        att = g + "MultiHeadDotProductAttention_1/"
        out[g + "LayerNorm_0/scale"], out[g + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        out[g + "LayerNorm_2/scale"], out[g + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w = sd[b + "attn.qkv.weight"].reshape(3, dim, dim)  # rows: q, k, v outputs
        qkv_b = sd[b + "attn.qkv.bias"].reshape(3, heads, dim // heads)
        for j, name in enumerate(("query", "key", "value")):
            out[att + f"{name}/kernel"] = qkv_w[j].T.reshape(dim, heads, dim // heads)
            out[att + f"{name}/bias"] = qkv_b[j]
        out[att + "out/kernel"] = sd[b + "attn.proj.weight"].reshape(dim, heads, dim // heads).transpose(1, 2, 0)
        out[att + "out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            out[g + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            out[g + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **out)


def test_npz_google_format_reproduces_features(tmp_path: Path):
    torch.manual_seed(2)
    src = timm.create_model(TINY_NAME, pretrained=False, num_classes=0, dynamic_img_size=True, **TINY).eval()
    path = tmp_path / "tiny.npz"
    to_google_npz(src, path)
    bb = ViTBackbone(TINY_NAME, weights=path, pos_embed_resample="timm", **TINY).eval()  # compared with timm's forward
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        seq = src.forward_features(x)
        out = bb(x)
    torch.testing.assert_close(out.cls_token, seq[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.tokens, seq[:, 1:].transpose(1, 2).reshape(1, 32, 4, 6), atol=1e-5, rtol=1e-5)
    # A file with another depth is rejected instead of half-loaded.
    with pytest.raises(ValueError, match="4 encoder blocks.*has 3"):
        ViTBackbone(TINY_NAME, weights=path, **{**TINY, "depth": 3})
