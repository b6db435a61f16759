"""ViT backbone over timm (SPEC §1.1): dense token maps, an auxiliary block output, and strict weight loading.

The backbone owns its input normalisation: `ViTBackbone.normalize` / `denormalize` use the mean/std chosen at
construction (`norm_stats`: the published ImageNet statistics, or the weights' own from timm's pretrained config).
`normalize_images` / `denormalize_images` are the pure functions behind them, with the statistics passed explicitly.
"""

from __future__ import annotations

import logging
import math
import re
import types
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from utils.errors import InputError
from utils.text import preview

logger = logging.getLogger(__name__)

# SPEC §1.1: the published normalisation, ImageNet statistics for every backbone (norm_stats="imagenet"), kept even
# for orig_in21k_ft_in1k whose own timm config says 0.5 / 0.5.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Where a backbone's mean/std come from (model.norm_stats): the published ImageNet statistics, or the weights' own
# from timm's pretrained config of the created model (CLIP weights need theirs).
NORM_STATS = ("imagenet", "pretrained")

Stats = tuple[float, float, float]

DEFAULT_BACKBONE = "vit_base_patch16_224.orig_in21k_ft_in1k"

# How the position embedding is resampled to an input's token grid (SPEC §1.1): the published bicubic
# F.interpolate without antialiasing, or timm's own dynamic_img_size resampling (antialiased).
POS_EMBED_RESAMPLE = ("bicubic", "timm")

# Keys of a classification checkpoint that have no counterpart in a head-less (num_classes=0) backbone.
_HEAD_PREFIXES = ("head.", "head_dist.", "pre_logits.")
# Wrapper prefixes added by DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _stats_like(
    images: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mean`, `std` as `[3, 1, 1]` tensors on the device and in the (floating) dtype of `images`.

    Tensors already there (the backbone's buffers) are used as they are: no host-to-device copy, no synchronisation.
    """
    dtype = images.dtype if images.is_floating_point() else torch.float32
    mean_t, std_t = (torch.as_tensor(v, dtype=dtype, device=images.device).reshape(3, 1, 1) for v in (mean, std))
    return mean_t, std_t


def _check_rgb(images: torch.Tensor, name: str) -> None:
    if images.dim() < 3 or images.shape[-3] != 3:
        raise ValueError(f"{name}: expected an RGB tensor [..., 3, H, W], got shape {tuple(images.shape)}")


def normalize_images(
    images: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    *,
    check_range: bool = True,
) -> torch.Tensor:
    """Normalise RGB images with explicit statistics, on the images' own device (SPEC §1.1).

    Args:
        images: `[B, 3, H, W]` (or `[3, H, W]`), either uint8 in 0..255 or floating point in [0, 1].
        mean: per-channel mean (3 values, RGB), a sequence or a tensor.
        std: per-channel std (3 values, RGB).
        check_range: for float input, verify max <= 1 (a host-device synchronisation); the training step passes
            False for views it built itself in [0, 1].

    Returns:
        Float tensor of the same shape, `(x - mean) / std`; float32 for uint8 input, else the input's dtype.
    """
    _check_rgb(images, "normalize(images)")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    elif not images.is_floating_point():
        raise TypeError(f"normalize(images): expected uint8 or a float tensor in [0, 1], got dtype {images.dtype}")
    elif check_range and images.numel() and float(images.max()) > 1.0 + 1e-3:
        # A float image on the 0..255 scale would silently be off by a factor 255; catch it here.
        raise ValueError(
            f"normalize(images): float input must be in [0, 1], got max {float(images.max()):.3g}; "
            "pass uint8 images or divide by 255 first"
        )
    mean_t, std_t = _stats_like(images, mean, std)
    return (images - mean_t) / std_t


def denormalize_images(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Invert `normalize_images`: `[B, 3, H, W]` normalised -> RGB in [0, 1] (clamped), e.g. for PAR (SPEC §1.3)."""
    _check_rgb(x, "denormalize(x)")
    mean_t, std_t = _stats_like(x, mean, std)
    return (x * std_t + mean_t).clamp_(0.0, 1.0)


def resolve_norm_stats(vit: nn.Module, norm_stats: str, arch: str) -> tuple[Stats, Stats]:
    """The `(mean, std)` a backbone normalises with (SPEC §1.1).

    Args:
        vit: the created timm model; its `pretrained_cfg` is read for `norm_stats="pretrained"`.
        norm_stats: `imagenet` (the published choice, whatever the weights) or `pretrained` (timm's
            `pretrained_cfg["mean"]` / `["std"]` of the model's name and tag, e.g. OpenAI CLIP statistics).
        arch: model name, for error messages.

    Raises:
        InputError: an unknown `norm_stats`, or `pretrained` for a model whose timm config has no usable mean/std.
    """
    _check_norm_stats(norm_stats)
    if norm_stats == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    cfg = getattr(vit, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if not (_is_stats(mean) and _is_stats(std) and min(std) > 0):
        raise InputError(
            f"model.norm_stats=pretrained: timm's pretrained config of {arch} has no usable RGB mean/std "
            f"(mean {mean!r}, std {std!r}); use model.norm_stats=imagenet, or give them through "
            "model.backbone_kwargs.pretrained_cfg_overlay {mean: [r, g, b], std: [r, g, b]}"
        )
    return _as_stats(mean), _as_stats(std)


def _check_norm_stats(norm_stats: str) -> None:
    if norm_stats not in NORM_STATS:
        raise InputError(f"model.norm_stats must be one of {NORM_STATS}, got {norm_stats!r}")


def _is_stats(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and len(value) == 3
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def _as_stats(value: Sequence[float]) -> Stats:
    return float(value[0]), float(value[1]), float(value[2])


@dataclass
class BackboneOutput:
    """Outputs of `ViTBackbone.forward`.

    Attributes:
        cls_token: `[B, D]` class token after the final norm.
        tokens: `[B, D, h, w]` patch tokens after the final norm.
        tokens_aux: `[B, D, h, w]` patch tokens of block `aux_layer`, before the final norm.
    """

    cls_token: torch.Tensor
    tokens: torch.Tensor
    tokens_aux: torch.Tensor


class ViTBackbone(nn.Module):
    """A timm Vision Transformer that returns dense token maps at any input size that is a multiple of the patch.

    Args:
        name: timm model name, optionally with a pretrained tag (e.g. `deit_base_patch16_224.fb_in1k`).
        aux_layer: block whose output (before the final norm) is returned as `tokens_aux`; negative counts from
            the end (-3 = 10th of 12 blocks, SPEC §1.1).
        pretrained: download timm's own weights for `name` when `weights` is None.
        weights: local `.pth` / `.pt` / `.npz` / `.safetensors` file; when set it is always loaded (an explicit
            file is never ignored) and timm is not asked to download anything.
        freeze_pos_embed: keep the absolute position embedding fixed (`requires_grad=False`, SPEC §1.1).
        pos_embed_resample: `bicubic` resamples the position embedding to each input's grid with
            `F.interpolate(mode="bicubic", align_corners=False)` and no antialiasing, as the published ViT does;
            `timm` keeps timm's `dynamic_img_size` resampling, which antialiases (the 6×6 / 7×7 grids of local crops,
            quadrants and half-scale CAMs then differ by up to ~25 % RMS).
        norm_stats: input normalisation (`NORM_STATS`): `imagenet` = ImageNet mean/std whatever the weights (the
            published choice, SPEC §1.1); `pretrained` = the mean/std of timm's pretrained config for `name` (its tag
            names the weights, also when they come from `weights`), e.g. OpenAI CLIP statistics for CLIP ViTs.
            Held as non-persistent buffers: they follow `.to(device)` but are not part of the state dict.
        **timm_kwargs: `timm.create_model` overrides (embed_dim, depth, num_heads, patch_size, img_size, ...).

    Attributes:
        norm_stats: the `norm_stats` argument.
        mean: `(r, g, b)` mean that `normalize` subtracts; `std` likewise (plain tuples, as resolved at construction).

    Raises:
        FileNotFoundError: `weights` does not exist.
        ValueError: bad `aux_layer`, an unsupported architecture, or weights that do not fit the architecture;
            an unknown `norm_stats`, or `pretrained` for a model whose timm config has no mean/std (`InputError`).
    """

    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(
        self,
        name: str = DEFAULT_BACKBONE,
        *,
        aux_layer: int = -3,
        pretrained: bool = False,
        weights: str | Path | None = None,
        freeze_pos_embed: bool = True,
        pos_embed_resample: str = "bicubic",
        norm_stats: str = "imagenet",
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        if pos_embed_resample not in POS_EMBED_RESAMPLE:
            raise ValueError(
                f"model.pos_embed_resample must be one of {POS_EMBED_RESAMPLE}, got {pos_embed_resample!r}"
            )
        _check_norm_stats(norm_stats)  # before timm may download anything
        for key in ("num_classes", "dynamic_img_size"):
            if key in timm_kwargs:
                raise ValueError(f"ViTBackbone: timm keyword {key!r} is fixed by the backbone and cannot be overridden")
        self.name = name
        self.vit = _create_vit(name, pretrained=pretrained and weights is None, **timm_kwargs)
        self._check_architecture()
        self.norm_stats = norm_stats
        self.mean, self.std = resolve_norm_stats(self.vit, norm_stats, name)
        # Non-persistent: checkpoints keep their keys, and normalising needs no host-to-device copy per call.
        self.register_buffer("pixel_mean", torch.tensor(self.mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.std).view(3, 1, 1), persistent=False)
        if weights is not None:
            load_backbone_weights(self.vit, weights, arch=name)
        depth = len(self.vit.blocks)
        if not -depth <= aux_layer < depth:
            raise ValueError(
                f"aux_layer must be in [{-depth}, {depth - 1}] for {name} with {depth} blocks, got {aux_layer}"
            )
        self.aux_index = aux_layer % depth
        if freeze_pos_embed and self.vit.pos_embed is not None:
            self.vit.pos_embed.requires_grad_(False)
        self.pos_embed_resample = pos_embed_resample
        if pos_embed_resample == "bicubic" and self.vit.pos_embed is not None:
            # timm's forward_intermediates calls vit._pos_embed; this instance uses the published resampling instead.
            self.vit._pos_embed = types.MethodType(_pos_embed_bicubic, self.vit)

    def _check_architecture(self) -> None:
        vit = self.vit
        for attr in ("patch_embed", "blocks", "norm", "forward_intermediates", "num_prefix_tokens"):
            if not hasattr(vit, attr):
                raise ValueError(f"{self.name} is not a timm ViT with {attr!r}; ViTBackbone needs a plain timm ViT")
        if getattr(vit, "cls_token", None) is None:
            # CTC (SPEC §4.3) projects the class token; a ViT without one has nothing to project.
            raise ValueError(f"{self.name} has no class token; MSFC needs one (SPEC §1.1, §4.3)")
        if not isinstance(getattr(vit, "patch_drop", nn.Identity()), nn.Identity):
            raise ValueError(f"{self.name}: patch_drop_rate must be 0, dense token maps need every patch")

    @property
    def embed_dim(self) -> int:
        """Token dimension D."""
        return int(self.vit.embed_dim)

    @property
    def patch_size(self) -> int:
        """Patch size p in pixels (square patches)."""
        ph, pw = _pair(self.vit.patch_embed.patch_size)
        if ph != pw:
            raise ValueError(f"{self.name}: non-square patches {ph}x{pw} are not supported")
        return ph

    @property
    def num_prefix_tokens(self) -> int:
        """Class token plus register/distillation tokens in front of the patch tokens."""
        return int(self.vit.num_prefix_tokens)

    def normalize(self, images: torch.Tensor, *, check_range: bool = True) -> torch.Tensor:
        """This backbone's input normalisation (SPEC §1.1): RGB images (uint8 or float in [0, 1]) -> `forward` input.

        Uses `mean` / `std` (from `norm_stats`) on the images' device; see `normalize_images` for the arguments.
        """
        return normalize_images(images, self.pixel_mean, self.pixel_std, check_range=check_range)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Invert `normalize`: normalised `[B, 3, H, W]` -> RGB in [0, 1] (clamped), e.g. for PAR (SPEC §1.3)."""
        return denormalize_images(x, self.pixel_mean, self.pixel_std)

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        """Run the ViT on normalised images.

        Args:
            x: `[B, 3, H, W]` images normalised by `normalize`, H and W multiples of the patch size p.

        Returns:
            `BackboneOutput` with `cls_token [B, D]`, `tokens [B, D, h, w]`, `tokens_aux [B, D, h, w]`,
            h = H / p, w = W / p. The position embedding is resampled to (h, w) as `pos_embed_resample` says.
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"ViTBackbone: expected x [B, 3, H, W], got shape {tuple(x.shape)}")
        p = self.patch_size
        height, width = x.shape[-2:]
        if height % p or width % p:
            raise ValueError(f"ViTBackbone: input size {height}x{width} is not a multiple of the patch size {p}")
        h, w = height // p, width // p
        # forward_intermediates runs patch_embed, _pos_embed, patch_drop, norm_pre, every block, and the final norm
        # (on the returned sequence only); intermediates come back before the norm, without prefix tokens, NCHW.
        final, (aux,) = self.vit.forward_intermediates(x, indices=[self.aux_index], norm=False, output_fmt="NCHW")
        n_prefix = self.num_prefix_tokens
        # The class token is the first prefix token in timm ViTs (registers follow it), SPEC §1.1.
        cls_token = final[:, 0]
        tokens = final[:, n_prefix:].transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return BackboneOutput(cls_token=cls_token, tokens=tokens, tokens_aux=aux)


def resample_grid_bicubic(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Published position-embedding resampling: bicubic, `align_corners=False`, no antialiasing.

    Args:
        grid: `[1, gh, gw, D]` position embedding of the patch grid (prefix tokens removed).
        size: target grid `(h, w)`.

    Returns:
        `[1, h·w, D]` in the dtype of `grid` (interpolated in float32); `grid` itself, flattened, when the size is
        unchanged (bicubic at scale 1 is the identity).
    """
    _, gh, gw, dim = grid.shape
    if (gh, gw) != tuple(size):
        chw = grid.permute(0, 3, 1, 2).float()
        resized = F.interpolate(chw, size=tuple(size), mode="bicubic", align_corners=False)
        grid = resized.permute(0, 2, 3, 1).to(grid.dtype)
    return grid.reshape(1, -1, dim)


def _pos_embed_bicubic(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Replacement for timm's `VisionTransformer._pos_embed` (dynamic_img_size) with the published resampling.

    Args:
        vit: the timm ViT (bound as `self`).
        x: `[B, h, w, D]` patch embeddings (timm's NHWC layout under dynamic_img_size).

    Returns:
        `[B, prefix + h·w, D]`: prefix tokens and patch tokens with the position embedding added, as timm's own.
    """
    batch, h, w, dim = x.shape
    prefix = [token.expand(batch, -1, -1) for token in (vit.cls_token, vit.reg_token) if token is not None]
    pos = vit.pos_embed
    num_pos_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    gh, gw = vit.patch_embed.grid_size
    grid = resample_grid_bicubic(pos[:, num_pos_prefix:].reshape(1, gh, gw, dim), (h, w))
    x = x.reshape(batch, h * w, dim)
    if vit.no_embed_class:  # the position embedding covers the patch tokens only
        x = torch.cat([*prefix, x + grid], dim=1)
    else:
        x = torch.cat([*prefix, x], dim=1) + torch.cat([pos[:, :num_pos_prefix], grid], dim=1)
    return vit.pos_drop(x)


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


def _create_vit(name: str, *, pretrained: bool, **timm_kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, dynamic_img_size=True, **timm_kwargs)
    except Exception as err:
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not fetch timm's pretrained weights for {name!r} ({err}); when offline, download them once and "
            "point model.weights at the local .pth/.npz/.safetensors file"
        ) from err


# ----------------------------------------------------------------------------------------------- weight loading


def load_backbone_weights(vit: nn.Module, path: str | Path, *, arch: str) -> None:
    """Load a local weight file into a head-less timm ViT, strictly.

    `.npz` files are original Google (JAX) ViT checkpoints read by timm's own converter; `.pth` / `.pt` /
    `.safetensors` files are PyTorch state dicts, bare or wrapped under `model` / `state_dict`, optionally with a
    `module.` prefix. Classification heads are dropped; a position embedding for another grid is resampled.

    Args:
        vit: the timm model (created with `num_classes=0`).
        path: the weight file.
        arch: architecture name, for error messages.

    Raises:
        FileNotFoundError: `path` does not exist.
        InputError (a ValueError): unknown suffix, unreadable file, or keys / shapes that do not match the
            architecture; the message names the file and what was expected.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path} (model.weights for {arch})")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        _load_npz(vit, path, arch)
    elif suffix in (".pth", ".pt", ".bin", ".safetensors"):
        state = _read_state_dict(path)
        state = _adapt_state_dict(state, vit)
        _check_state_dict(state, vit, path, arch)
        vit.load_state_dict(state, strict=True)
    else:
        raise InputError(
            f"backbone weights {path}: unknown suffix {suffix!r}; expected .pth, .pt, .bin, .npz or .safetensors"
        )
    logger.info("loaded backbone weights for %s from %s", arch, path)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError, ValueError) as err:  # the library's messages name no file
            raise InputError(
                f"backbone weights {path}: cannot be read as a .safetensors file ({err}); expected a safetensors "
                "file of tensors (e.g. written by safetensors.torch.save_file), not a truncated download or another "
                "format"
            ) from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # weights_only refuses pickled Python objects (e.g. saved argparse namespaces) for safety.
        raise InputError(
            f"backbone weights {path}: cannot be read as a tensors-only PyTorch checkpoint ({err}); "
            "re-save just its state dict with torch.save(state_dict, path)"
        ) from err
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(
            f"backbone weights {path}: expected a state dict (bare or under 'model' / 'state_dict'), got {type(obj)}"
        )
    return dict(obj)


def _adapt_state_dict(state: dict[str, torch.Tensor], vit: nn.Module) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes, drop classification heads, resample a pos_embed of another grid."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if key.startswith(_HEAD_PREFIXES):
            continue
        out[key] = value
    target = getattr(vit, "pos_embed", None)
    source = out.get("pos_embed")
    if target is not None and source is not None:
        out["pos_embed"] = _resample_pos_embed(source, target, vit)
    return out


def _resample_pos_embed(source: torch.Tensor, target: torch.Tensor, vit: nn.Module) -> torch.Tensor:
    # Only a different *grid* is resampled; another embedding dim is a real mismatch left for the key check.
    if source.dim() != 3 or source.shape[-1] != target.shape[-1] or source.shape[1] == target.shape[1]:
        return source
    num_prefix = 0 if getattr(vit, "no_embed_class", False) else int(vit.num_prefix_tokens)
    side = round((source.shape[1] - num_prefix) ** 0.5)
    if side * side != source.shape[1] - num_prefix:
        return source  # not a square grid: reported as a shape mismatch
    new_size = list(vit.patch_embed.grid_size)
    logger.info("resampling pos_embed from %dx%d to %dx%d", side, side, *new_size)
    return resample_abs_pos_embed(source, new_size=new_size, old_size=[side, side], num_prefix_tokens=num_prefix)


def _check_state_dict(state: dict[str, torch.Tensor], vit: nn.Module, path: Path, arch: str) -> None:
    expected = vit.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or unexpected or mismatched:
        raise InputError(
            f"backbone weights {path} do not match architecture {arch}: "
            f"missing keys {len(missing)} [{preview(missing)}]; unexpected keys {len(unexpected)} "
            f"[{preview(unexpected)}]; shape mismatches (file vs model) {len(mismatched)} [{preview(mismatched)}]"
        )


def _load_npz(vit: nn.Module, path: Path, arch: str) -> None:
    """Load an original Google ViT `.npz` through timm's converter, turning its failures into clear errors."""
    import numpy as np

    if not hasattr(vit, "load_pretrained"):
        raise InputError(f"backbone weights {path}: {arch} has no .npz loader in timm; use .pth or .safetensors")
    try:
        with np.load(path, allow_pickle=False) as archive:
            blocks = {int(m.group(1)) for k in archive.files if (m := re.search(r"encoderblock_(\d+)/", k))}
    except (OSError, ValueError, zipfile.BadZipFile) as err:  # numpy's messages name no file
        raise InputError(
            f"backbone weights {path}: cannot be read as an .npz archive ({err}); expected an original Google ViT "
            ".npz checkpoint"
        ) from err
    depth = len(vit.blocks)
    # timm's converter reads the blocks the model has and ignores the rest, so a deeper file would load silently.
    if blocks and len(blocks) != depth:
        raise InputError(f"backbone weights {path} have {len(blocks)} encoder blocks, architecture {arch} has {depth}")
    try:
        vit.load_pretrained(str(path))
    except KeyError as err:
        raise InputError(f"backbone weights {path} do not match architecture {arch}: missing key {err}") from err
    except RuntimeError as err:
        raise InputError(f"backbone weights {path} do not match architecture {arch}: {err}") from err
