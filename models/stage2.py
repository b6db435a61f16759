"""The second-stage segmentation network (SPEC §10): an encoder-decoder of segmentation-models-pytorch (smp).

``Stage2Segmenter`` wraps one network behind the contract every inference path of this toolkit uses
(``engine.inference.predict_seg_logits``, validation, ``tools/infer_seg.py``): ``normalize(images)`` with the encoder's
statistics, ``patch_size`` (the side every input must be a multiple of) and ``forward(x, with_seg=True) ->
Stage2Output(seg_logits [B, C, H, W])``, the logits at the input resolution.

Architectures (``stage2.arch``):

- ``DeepLabV2`` (ours, on an smp encoder): the DeepLab-v2 head of Chen et al. (TPAMI 2018), ASPP-v2 = four parallel
  3x3 convolutions straight to class logits, dilations 6/12/18/24, summed, on the last encoder stage (output stride
  8 by dilation), upsampled bilinearly to the input. No BatchNorm, no image pooling, no 1x1 branch in the head; the
  head's weights start from N(0, 0.01²), biases 0. What remains different from the Caffe original: the encoder is a
  timm / torchvision ResNet-101 (the original used its own MSRA ResNet-101 with frozen BatchNorm, pretrained on
  ImageNet and often MS-COCO), and the image is not fed at several scales with max fusion during training (MSC).
- any smp architecture by its class name (``DeepLabV3``, ``DeepLabV3Plus``, ``Unet``, ``FPN``, ...), built by
  ``smp.create_model``; for ``DeepLabV3`` / ``DeepLabV3Plus`` ``stage2.output_stride``, ``decoder_channels`` and
  ``aspp_rates`` become smp's ``encoder_output_stride``, ``decoder_channels`` and ``decoder_atrous_rates``.

Encoders are smp encoder names; ``tu-<timm name>[.<tag>]`` is any timm model, the tag naming its weights (e.g.
``tu-resnet101.tv_in1k``, the torchvision ImageNet ResNet-101, or ``tu-tf_efficientnet_b7.ap_in1k``, MuSCLe's
AdvProp EfficientNet-B7). Weights follow stage 1's policy (``models/backbone.py``): ``weights`` (a local
.pth / .pt / .bin / .safetensors file) is always loaded when set and nothing is downloaded; without it
``pretrained=True`` downloads the encoder's weights (timm / smp's hub), ``False`` starts from scratch. A missing file
or one that does not cover every encoder weight is an error naming it, never a silent random start.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from models.backbone import _WRAPPER_PREFIXES, _read_state_dict, normalize_images, resolve_norm_stats
from utils.errors import InputError
from utils.text import preview

logger = logging.getLogger(__name__)

# Ours; every other name is an smp architecture class.
DEEPLAB_V2 = "DeepLabV2"
# smp architectures that take an output stride, a decoder width and atrous rates.
SMP_DEEPLABS = ("DeepLabV3", "DeepLabV3Plus")
DEFAULT_V2_RATES = (6, 12, 18, 24)
OUTPUT_STRIDES = (8, 16, 32)
# DeepLab-v2's classifier initialisation (Caffe prototxt): Gaussian std 0.01, zero bias.
V2_INIT_STD = 0.01


@dataclass
class Stage2Output:
    """What :meth:`Stage2Segmenter.forward` returns: ``seg_logits`` ``[B, C, H, W]`` at the input resolution."""

    seg_logits: torch.Tensor


class ASPPv2(nn.Module):
    """DeepLab-v2's atrous spatial pyramid pooling: the sum of parallel dilated 3x3 classifiers.

    Args:
        in_channels: channels of the encoder's last feature map.
        num_classes: C, the logits' channels.
        rates: one dilation (and padding) per branch.
    """

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = DEFAULT_V2_RATES) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=int(r), dilation=int(r)) for r in rates
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, std=V2_INIT_STD)
            nn.init.zeros_(conv.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([branch(features) for branch in self.branches]).sum(dim=0)


class DeepLabV2(nn.Module):
    """An smp encoder (dilated to ``output_stride``) + :class:`ASPPv2`, logits upsampled to the input size."""

    def __init__(self, encoder: nn.Module, num_classes: int, rates: Sequence[int] = DEFAULT_V2_RATES) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = ASPPv2(int(encoder.out_channels[-1]), num_classes, rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.encoder(x)[-1])
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


class Stage2Segmenter(nn.Module):
    """A second-stage segmentation network (module docstring) with the toolkit's model contract.

    Args:
        arch: ``DeepLabV2`` or an smp architecture class name.
        encoder: smp encoder name (``tu-<timm name>[.<tag>]`` for timm).
        num_classes: C, background included.
        output_stride: 8 | 16 (dilated last stages) | 32 (none; the only choice of non-DeepLab smp architectures).
        decoder_channels: DeepLabV3(+) decoder width (smp's ``decoder_channels``).
        aspp_rates: DeepLabV2's four dilations, or DeepLabV3(+)'s three; None = the architecture's defaults.
        arch_kwargs: more smp constructor keywords (``stage2.arch_kwargs``).
        pretrained: download the encoder's weights when ``weights`` is None.
        weights: local encoder weight file; always loaded when set.
        norm_stats: ``imagenet`` (ImageNet mean/std) | ``pretrained`` (the timm encoder's own, e.g. 0.5/0.5 for
            AdvProp EfficientNets), as ``model.norm_stats`` of stage 1.
        freeze_bn: keep the encoder's BatchNorm layers in eval mode with fixed affine parameters (DeepLab-v2 practice).

    Raises:
        InputError / FileNotFoundError: a bad architecture, encoder, output stride, weight file or norm_stats, each
            naming its ``stage2.*`` / ``model.*`` key.
    """

    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(
        self,
        arch: str,
        encoder: str,
        num_classes: int,
        *,
        output_stride: int = 8,
        decoder_channels: int = 256,
        aspp_rates: Sequence[int] | None = None,
        arch_kwargs: Mapping[str, Any] | None = None,
        pretrained: bool = False,
        weights: str | Path | None = None,
        norm_stats: str = "imagenet",
        freeze_bn: bool = False,
    ) -> None:
        super().__init__()
        if output_stride not in OUTPUT_STRIDES:
            raise InputError(f"stage2.output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
        self.arch, self.encoder_name, self.freeze_bn = arch, encoder, bool(freeze_bn)
        download = bool(pretrained) and weights is None
        self.net = _build_network(arch, encoder, num_classes, output_stride, decoder_channels, aspp_rates,
                                  dict(arch_kwargs or {}), download)  # fmt: skip
        timm_model = getattr(self.net.encoder, "model", None)  # smp's timm wrapper keeps the timm model here
        stats_source = timm_model if timm_model is not None else self.net.encoder
        self.mean, self.std = resolve_norm_stats(stats_source, norm_stats, encoder)
        self.register_buffer("pixel_mean", torch.tensor(self.mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.std).view(3, 1, 1), persistent=False)
        if weights is not None:
            load_encoder_weights(timm_model if timm_model is not None else self.net.encoder, weights, encoder)
        if self.freeze_bn:
            for module in self._encoder_norms():
                module.requires_grad_(False)

    def _encoder_norms(self) -> list[nn.Module]:
        return [m for m in self.net.encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    @property
    def patch_size(self) -> int:
        """The side every input must be a multiple of: the encoder's output stride (inference rounds to it)."""
        return int(self.net.encoder.output_stride)

    def normalize(self, images: torch.Tensor, *, check_range: bool = True) -> torch.Tensor:
        """RGB images (uint8, or float in [0, 1]) -> network input, with the encoder's mean / std."""
        return normalize_images(images, self.pixel_mean, self.pixel_std, check_range=check_range)

    def forward(self, x: torch.Tensor, with_seg: bool = True) -> Stage2Output:
        """Logits of normalised images ``x`` ``[B, 3, H, W]`` (H, W multiples of :attr:`patch_size`).

        ``with_seg`` is accepted for the shared model contract (``model(x, with_seg=True).seg_logits``); a
        segmentation network always computes its logits.
        """
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"Stage2Segmenter: input {height}x{width} is not a multiple of the output stride {self.patch_size}"
            )
        return Stage2Output(seg_logits=self.net(x))

    def train(self, mode: bool = True) -> Stage2Segmenter:
        super().train(mode)
        if self.freeze_bn:  # frozen statistics: the encoder's norms stay in eval mode while the rest trains
            for module in self._encoder_norms():
                module.eval()
        return self

    def param_groups(self, lr: float, head_lr_mult: float = 10.0, weight_decay: float = 0.01) -> list[dict[str, Any]]:
        """AdamW groups: the encoder at ``lr``, decoder and head at ``lr * head_lr_mult``; 1-d parameters (biases,
        norms) without weight decay (groups suffixed ``_no_decay``, as stage 1's). Frozen parameters are left out."""
        buckets: dict[str, list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if param.requires_grad:
                part = "encoder" if name.startswith("net.encoder.") else "heads"
                buckets.setdefault(part if param.ndim > 1 else f"{part}_no_decay", []).append(param)
        groups = []
        for key, params in sorted(buckets.items(), key=lambda item: not item[0].startswith("encoder")):
            mult = 1.0 if key.startswith("encoder") else float(head_lr_mult)
            decay = 0.0 if key.endswith("_no_decay") else weight_decay
            groups.append({"name": key, "params": params, "lr": lr * mult, "lr_mult": mult, "weight_decay": decay})
        return groups


def _build_network(
    arch: str,
    encoder: str,
    num_classes: int,
    output_stride: int,
    decoder_channels: int,
    aspp_rates: Sequence[int] | None,
    arch_kwargs: dict[str, Any],
    download: bool,
) -> nn.Module:
    import segmentation_models_pytorch as smp

    # smp: tu- encoders take True to download, its own encoders the name of their weights
    encoder_weights = (True if encoder.startswith("tu-") else "imagenet") if download else None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is deprecated.*")
            if arch == DEEPLAB_V2:
                rates = DEFAULT_V2_RATES if aspp_rates is None else tuple(aspp_rates)
                body = smp.encoders.get_encoder(encoder, depth=5, weights=encoder_weights, output_stride=output_stride,
                                                **arch_kwargs)  # fmt: skip
                return DeepLabV2(body, num_classes, rates)
            if arch in SMP_DEEPLABS:
                arch_kwargs = {"encoder_output_stride": output_stride, "decoder_channels": decoder_channels,
                               **({} if aspp_rates is None else {"decoder_atrous_rates": tuple(aspp_rates)}),
                               **arch_kwargs}  # fmt: skip
            elif output_stride != 32 or aspp_rates is not None:
                raise InputError(
                    f"stage2.arch={arch}: stage2.output_stride ({output_stride}) and stage2.aspp_rates ({aspp_rates}) "
                    f"apply to {DEEPLAB_V2} and {' / '.join(SMP_DEEPLABS)} only; set output_stride=32 and "
                    "aspp_rates=null, and the architecture's own keywords through stage2.arch_kwargs"
                )
            return smp.create_model(arch, encoder_name=encoder, encoder_weights=encoder_weights, classes=num_classes,
                                    **arch_kwargs)  # fmt: skip
    except InputError:
        raise
    except KeyError as err:  # smp's unknown architecture / encoder / weights
        raise InputError(f"stage2.arch={arch} / stage2.encoder={encoder}: {err.args[0] if err.args else err}") from err
    except Exception as err:
        if download:
            raise InputError(
                f"could not fetch the pretrained weights of stage2.encoder={encoder} ({type(err).__name__}: {err}); "
                "when offline, download them once and set model.weights to the local .pth / .safetensors file, or "
                "model.pretrained=false to train from scratch"
            ) from err
        raise InputError(f"cannot build stage2.arch={arch} with stage2.encoder={encoder}: {err}") from err


def load_encoder_weights(module: nn.Module, path: str | Path, encoder: str, config_key: str = "stage2.encoder") -> None:
    """Load a local weight file into an encoder, covering every one of its weights.

    The file is a (bare or ``model`` / ``state_dict``-wrapped) state dict of the classification network, as timm or
    torchvision write it; wrapper prefixes (``module.``) are stripped and keys the encoder does not have (the
    classifier, a final conv head) are dropped and logged. Errors name ``config_key`` = ``encoder`` (the key that chose
    the encoder: ``stage2.encoder``, or ``irn.backbone`` for IRN's ResNet).

    Raises:
        FileNotFoundError: ``path`` does not exist (naming ``model.weights``).
        InputError: the file cannot be read, or it misses encoder weights or has them in another shape.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file not found: {path} (model.weights for {config_key}={encoder})")
    state = {}
    for key, value in _read_state_dict(path).items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        state[key] = value
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    reshaped = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                      if k in state and state[k].shape != v.shape)  # fmt: skip
    if missing or reshaped:
        raise InputError(
            f"encoder weights {path} do not fit {config_key}={encoder}: {len(missing)} of its {len(own)} weights "
            f"missing [{preview(missing)}]; shape mismatches (file vs encoder) {len(reshaped)} [{preview(reshaped)}]"
        )
    extra = sorted(set(state) - set(own))
    if extra:
        logger.info("encoder weights %s: %d key(s) the encoder has no use for were dropped [%s]", path, len(extra),
                    preview(extra))  # fmt: skip
    module.load_state_dict({k: state[k] for k in own}, strict=True)
    logger.info("loaded encoder weights for %s from %s", encoder, path)


def build_stage2_model(cfg: Any) -> Stage2Segmenter:
    """:class:`Stage2Segmenter` from ``cfg.stage2.*``, ``model.pretrained`` / ``model.weights`` /
    ``model.norm_stats`` and ``data.num_classes`` (configs/base.yaml)."""
    s, m = cfg.stage2, cfg.model
    rates = None if s.aspp_rates is None else [int(r) for r in s.aspp_rates]
    kwargs = s.arch_kwargs
    if OmegaConf.is_config(kwargs):  # smp must see plain Python
        kwargs = OmegaConf.to_container(kwargs, resolve=True)
    return Stage2Segmenter(
        str(s.arch),
        str(s.encoder),
        int(cfg.data.num_classes),
        output_stride=int(s.output_stride),
        decoder_channels=int(s.decoder_channels),
        aspp_rates=rates,
        arch_kwargs=dict(kwargs or {}),
        pretrained=bool(m.pretrained),
        weights=m.weights,
        norm_stats=str(m.get("norm_stats", "imagenet")),
        freeze_bn=bool(s.freeze_bn),
    )
