"""IRN's boundary network (SPEC §9, Ahn et al., CVPR 2019): a timm ResNet and its class-boundary branch.

``BoundaryNet`` predicts one boundary logit map at stride 4 from five stages of a ResNet whose last stage keeps stride
16 (strides 2/2/2/1: the first block of ``layer4`` is patched to stride 1, without dilation):

- stem (``conv1``, ``bn1``, ``act1``, ``maxpool``; stride 4), ``layer1`` (4), ``layer2`` (8), ``layer3`` (16),
  ``layer4`` (16);
- per stage a 1x1 convolution to ``branch_channels`` (32), GroupNorm (4 groups), ReLU, upsampled bilinearly to the
  stem's output size; the five maps concatenated (5 x 32 channels) and a 1x1 convolution to one logit map.

Every BatchNorm of the backbone is frozen (``torchvision``'s ``FrozenBatchNorm2d``, through
``timm.layers.freeze_batch_norm_2d``): its statistics and affine parameters are buffers, fixed in ``.train()`` too.
With ``detach_backbone`` (IRN's choice) the backbone runs without gradient and none of its parameters is optimised;
only the branch trains. Otherwise the backbone's convolutions train too (a backbone from scratch, e.g. the demo's).

Weights follow the policy of stages 1 and 2 (``models/backbone.py``, ``models/stage2.py``): ``weights`` (a local
.pth / .pt / .bin / .safetensors file of the classification network, as timm or torchvision write it) is always
loaded when set and must cover every backbone weight; without it ``pretrained=True`` downloads timm's weights of the
name's tag (``resnet50.tv_in1k``: torchvision's ImageNet ResNet-50), ``False`` starts from scratch. A network from
scratch is initialised without timm's zero-initialised last BatchNorm of each residual branch: frozen at zero, those
branches would never train.

``load_boundary_net`` loads a trained network for the random walk (``rw.checkpoint``: an IRN run folder or one of its
checkpoint files).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from models.backbone import normalize_images, resolve_norm_stats
from models.stage2 import load_encoder_weights
from utils.checkpoint import LAST, checkpoint_dir, load_model_state, read_checkpoint
from utils.config import ConfigError, load_run_config
from utils.errors import InputError

logger = logging.getLogger(__name__)

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
# Each stage's stride once layer4 is patched (strides 2/2/2/1).
STAGE_STRIDES = (4, 4, 8, 16, 16)
GROUPS = 4  # GroupNorm groups of each branch projection (IRN)
# The side of the blank image whose feature sizes check the strides (a multiple of 16).
_PROBE_SIDE = 64


class BoundaryNet(nn.Module):
    """IRN's class-boundary network (module docstring).

    Args:
        backbone: a timm ResNet name, e.g. ``resnet50.tv_in1k`` (``irn.backbone``); ``resnet18`` / ``resnet10t``
            for small runs.
        branch_channels: width of each stage's projection (``irn.branch_channels``), a multiple of 4.
        detach_backbone: the backbone is not trained (``irn.detach_backbone``).
        pretrained: download timm's weights when ``weights`` is None (``model.pretrained``).
        weights: local backbone weight file, always loaded when set (``model.weights``).
        norm_stats: ``imagenet`` | ``pretrained`` (timm's mean / std of the name's tag) (``model.norm_stats``).

    Raises:
        InputError: a name that is not a timm ResNet, one whose stages do not have strides 4/4/8/16 after the patch,
            a bad ``branch_channels``, weights that cannot be fetched or do not fit (naming the key).
        FileNotFoundError: ``weights`` does not exist (naming ``model.weights``).
    """

    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(
        self,
        backbone: str = "resnet50.tv_in1k",
        *,
        branch_channels: int = 32,
        detach_backbone: bool = True,
        pretrained: bool = False,
        weights: str | Path | None = None,
        norm_stats: str = "imagenet",
    ) -> None:
        super().__init__()
        if branch_channels < GROUPS or branch_channels % GROUPS:
            raise InputError(
                f"irn.branch_channels must be a positive multiple of {GROUPS} (GroupNorm with {GROUPS} groups), "
                f"got {branch_channels}"
            )
        self.backbone_name, self.detach_backbone = str(backbone), bool(detach_backbone)
        download = bool(pretrained) and weights is None
        resnet = _create_resnet(self.backbone_name, download)
        mean, std = resolve_norm_stats(resnet, norm_stats, self.backbone_name)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(3, 1, 1), persistent=False)
        _patch_last_stride(resnet)
        self.backbone = freeze_batch_norm(resnet)
        if weights is not None:
            load_encoder_weights(self.backbone, weights, self.backbone_name, config_key="irn.backbone")
        if self.detach_backbone:
            self.backbone.requires_grad_(False)
        channels = self._check_strides()
        self.branch = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, branch_channels, 1, bias=False), nn.GroupNorm(GROUPS, branch_channels),
                          nn.ReLU(inplace=True))
            for c in channels
        )  # fmt: skip
        self.fuse = nn.Conv2d(len(STAGES) * branch_channels, 1, 1)

    def _check_strides(self) -> list[int]:
        """The stages' channels, after checking their strides on a blank image (4/4/8/16/16)."""
        with torch.no_grad():
            features = self.stage_features(torch.zeros(1, 3, _PROBE_SIDE, _PROBE_SIDE))
        sizes = tuple(int(f.shape[-1]) for f in features)
        if sizes != tuple(_PROBE_SIDE // s for s in STAGE_STRIDES):
            strides = tuple(round(_PROBE_SIDE / size, 2) if size else None for size in sizes)
            raise InputError(
                f"irn.backbone={self.backbone_name}: its stages {', '.join(STAGES)} have strides {strides} after "
                f"the layer4 patch, not {STAGE_STRIDES}; use a standard timm ResNet (resnet50.tv_in1k, resnet18, ...)"
            )
        return [int(f.shape[1]) for f in features]

    def normalize(self, images: torch.Tensor, *, check_range: bool = True) -> torch.Tensor:
        """RGB images (uint8, or float in [0, 1]) ``[B, 3, H, W]`` -> network input, with the backbone's mean / std."""
        return normalize_images(images, self.pixel_mean, self.pixel_std, check_range=check_range)

    def stage_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five stages' outputs of normalised images ``x`` ``[B, 3, H, W]``: ``[B, C_s, H / s, W / s]`` for the
        strides ``s`` of :data:`STAGE_STRIDES` (rounded up, as the convolutions round)."""
        r = self.backbone
        out = [r.maxpool(r.act1(r.bn1(r.conv1(x))))]
        for name in STAGES[1:]:
            out.append(getattr(r, name)(out[-1]))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Boundary logits ``[B, h, w]`` of normalised images ``x`` ``[B, 3, H, W]``; ``(h, w)`` is the stem's output
        size (stride 4: ``ceil(H / 4)``, ``ceil(W / 4)``)."""
        if self.detach_backbone:
            with torch.no_grad():  # IRN: detached features (nothing of the backbone is kept for backward)
                features = self.stage_features(x)
        else:
            features = self.stage_features(x)
        size = features[0].shape[-2:]
        side = []
        for project, feature in zip(self.branch, features, strict=True):
            y = project(feature)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            side.append(y)
        return self.fuse(torch.cat(side, dim=1))[:, 0]

    @torch.no_grad()
    def boundary(self, images: torch.Tensor, flip: bool = True) -> torch.Tensor:
        """Boundary probabilities ``[B, h, w]`` in [0, 1] at stride 4, what the random walk uses (SPEC §9).

        The sigmoid of the mean of the image's logits and the un-flipped logits of its horizontal flip (``flip``), or
        of the image's alone; in eval mode and fp32 whatever the caller's autocast (the mode is restored).

        Args:
            images: RGB ``[B, 3, H, W]``, uint8 or float in [0, 1].
            flip: average with the horizontal flip (``rw.flip``).
        """
        was_training = self.training
        self.eval()
        try:
            with torch.autocast(images.device.type, enabled=False):
                x = self.normalize(images)
                logits = self(x)
                if flip:
                    logits = 0.5 * (logits + self(x.flip(-1)).flip(-1))
        finally:
            self.train(was_training)
        return torch.sigmoid(logits.float())

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """SGD / AdamW groups at ``lr``: ``backbone`` (only without ``detach_backbone``) and ``branch``, each with
        its 1-d parameters (biases, GroupNorm) in a ``_no_decay`` group (weight decay 0). Frozen parameters are left
        out; empty groups are not listed."""
        buckets: dict[str, list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if param.requires_grad:
                part = "backbone" if name.startswith("backbone.") else "branch"
                buckets.setdefault(part if param.ndim > 1 else f"{part}_no_decay", []).append(param)
        order = ("backbone", "backbone_no_decay", "branch", "branch_no_decay")
        return [
            {"name": key, "params": buckets[key], "lr": lr, "lr_mult": 1.0,
             "weight_decay": 0.0 if key.endswith("_no_decay") else weight_decay}
            for key in order if key in buckets
        ]  # fmt: skip


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm2d replaced by a frozen one (statistics and affine parameters as buffers)."""
    from timm.layers import freeze_batch_norm_2d

    return freeze_batch_norm_2d(module)


def _create_resnet(name: str, download: bool) -> nn.Module:
    """The timm ResNet ``name`` without its classifier; from scratch unless ``download``."""
    import timm
    from timm.models.resnet import ResNet

    try:
        model = timm.create_model(name, pretrained=download, num_classes=0)
    except Exception as err:
        if isinstance(err, RuntimeError) and "Unknown model" in str(err):
            raise InputError(f"irn.backbone={name} is not a timm model name ({err}); e.g. resnet50.tv_in1k") from err
        if download:
            raise _fetch_error(name, err) from err
        raise
    if not isinstance(model, ResNet):
        raise InputError(
            f"irn.backbone={name} is a timm {type(model).__name__}, not a timm ResNet (conv1 / layer1..layer4); e.g. "
            "resnet50.tv_in1k, resnet101.tv_in1k, resnet18"
        )
    if not download:  # from scratch (or for a weight file): no zero-initialised residual branch under frozen BN
        model.init_weights(zero_init_last=False)
    return model


def _fetch_error(name: str, err: BaseException) -> InputError:
    return InputError(
        f"could not fetch the pretrained weights of irn.backbone={name} ({type(err).__name__}: {err}); when offline, "
        "download them once and set model.weights to the local .pth / .safetensors file, or model.pretrained=false "
        "to train from scratch"
    )


def _patch_last_stride(resnet: nn.Module) -> None:
    """Strides 2/2/2/1: the first block of ``layer4`` at stride 1, no dilation, in place.

    Its strided convolutions (the 3x3 and the 1x1 shortcut) get stride 1; its strided pools (the average-pool
    shortcut of ``avg_down`` ResNets, anti-aliasing pools) become identities, as timm builds a stride-1 block.
    """
    from timm.layers import BlurPool2d

    block = resnet.layer4[0]
    pools = (nn.AvgPool2d, nn.MaxPool2d, BlurPool2d)
    for name, module in list(block.named_modules()):
        if isinstance(module, nn.Conv2d) and tuple(module.stride) != (1, 1):
            module.stride = (1, 1)
        elif isinstance(module, pools) and _stride_of(module) != 1:
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, child, nn.Identity())


def _stride_of(pool: nn.Module) -> int:
    stride = getattr(pool, "stride", 1)
    return int(stride[0] if isinstance(stride, tuple | list) else stride)


def _from_config(cfg: Any, pretrained: bool, weights: str | Path | None) -> BoundaryNet:
    irn = cfg.irn
    return BoundaryNet(
        str(irn.backbone),
        branch_channels=int(irn.branch_channels),
        detach_backbone=bool(irn.detach_backbone),
        pretrained=pretrained,
        weights=weights,
        norm_stats=str(cfg.model.get("norm_stats", "imagenet")),
    )


def build_boundary_model(cfg: Any) -> BoundaryNet:
    """:class:`BoundaryNet` from ``cfg.irn.backbone`` / ``branch_channels`` / ``detach_backbone`` and
    ``cfg.model.pretrained`` / ``weights`` / ``norm_stats`` (configs/base.yaml)."""
    return _from_config(cfg, bool(cfg.model.pretrained), cfg.model.weights)


def boundary_checkpoint(source: str | Path) -> Path:
    """The checkpoint file ``rw.checkpoint`` names: the file itself, or an IRN run folder's ``checkpoints/last.pth``.

    Raises:
        FileNotFoundError: neither exists (naming ``rw.checkpoint``).
    """
    source = Path(source).expanduser()
    if source.is_dir():
        path = checkpoint_dir(source) / LAST
        if not path.is_file():
            raise FileNotFoundError(
                f"rw.checkpoint={source}: no {LAST} in {checkpoint_dir(source)}; train the boundary network into "
                "that folder first (task=irn), or name a checkpoint file"
            )
        return path
    if not source.is_file():
        raise FileNotFoundError(
            f"rw.checkpoint={source}: not found (an IRN run folder, or one of its checkpoint files)"
        )
    return source


def load_boundary_net(source: str | Path, device: torch.device | str = "cpu") -> BoundaryNet:
    """A trained boundary network in eval mode on ``device`` (``rw.checkpoint``).

    Args:
        source: an IRN run folder (its ``checkpoints/last.pth``, built from its ``config.yaml``) or a checkpoint file
            (built from the config it stores, else from the ``config.yaml`` of its run folder, the file's ``../..``).
        device: where the network goes.

    Raises:
        FileNotFoundError: ``source`` does not exist, or the folder holds no final checkpoint (naming
            ``rw.checkpoint``).
        ConfigError: the run is not an IRN run (``task`` is not ``irn``), naming ``rw.checkpoint``.
        CheckpointError: the checkpoint is damaged or holds another network.
    """
    source = Path(source).expanduser()
    path = boundary_checkpoint(source)
    payload = read_checkpoint(path)
    if source.is_dir():
        cfg = load_run_config(source)
    else:
        saved = payload.get("config")
        cfg = OmegaConf.create(saved) if saved else load_run_config(source.parent.parent)
    _check_irn_run(cfg, source)
    model = _from_config(cfg, pretrained=False, weights=None)  # the checkpoint holds every weight
    load_model_state(model, payload["model"], str(path))
    logger.info("loaded the boundary network %s", path)
    return model.to(device).eval()


def _check_irn_run(cfg: DictConfig, source: Path) -> None:
    task = str(cfg.get("task", "msfc"))
    if task != "irn":
        raise ConfigError(
            f"rw.checkpoint={source} is not an IRN run (its config says task={task}); train a boundary network with "
            "task=irn (configs/irn/) and name that run folder or checkpoint"
        )
