"""MSFC models: timm ViT backbone, heads, memory bank and the assembled network. `build_model` reads the config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.backbone import BackboneOutput, ViTBackbone, denormalize, normalize
from models.memory import MemoryBank, fuse_similarity
from models.msfc import MSFC, MSFCOutput

__all__ = [
    "MSFC",
    "BackboneOutput",
    "MSFCOutput",
    "MemoryBank",
    "ViTBackbone",
    "build_model",
    "denormalize",
    "fuse_similarity",
    "normalize",
]


def _plain(value: Any) -> Any:
    """An OmegaConf container as plain Python (timm must not see DictConfig/ListConfig); anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # plain dicts only
        return value
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def build_model(cfg: Any) -> MSFC:
    """Build `MSFC` from the config: `cfg.model.*`, `cfg.memory.*` and `cfg.data.num_classes` (configs/base.yaml).

    This is the only place in `models/` that reads the config.
    """
    m, mem = cfg.model, cfg.memory
    kwargs = _plain(m.backbone_kwargs) or {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"model.backbone_kwargs must be a mapping of timm overrides, got {type(kwargs).__name__}")
    backbone = ViTBackbone(
        str(m.backbone),
        aux_layer=int(m.aux_layer),
        pretrained=bool(m.pretrained),
        weights=m.weights,
        freeze_pos_embed=bool(m.freeze_pos_embed),
        pos_embed_resample=str(m.pos_embed_resample),
        **dict(kwargs),
    )
    num_classes = int(cfg.data.num_classes)
    memory = MemoryBank(
        num_classes=num_classes - 1,
        dim=backbone.embed_dim,
        momentum=float(mem.momentum),
        min_count=int(mem.min_count),
    )
    return MSFC(
        backbone,
        num_classes=num_classes,
        decoder_channels=int(m.decoder_channels),
        decoder_dilation=int(m.decoder_dilation),
        proj_hidden_dim=int(m.proj_hidden_dim),
        proj_bottleneck_dim=int(m.proj_bottleneck_dim),
        proj_out_dim=int(m.proj_out_dim),
        teacher_momentum=float(m.teacher_momentum),
        memory=memory,
    )
