"""The assembled MSFC network (SPEC §1): backbone, classifiers, decoder, projection heads and the memory bank.

No losses live here; `forward` has no side effects (the EMA teacher and the bank are updated by the training loop).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.backbone import ViTBackbone
from models.heads import LargeFOV, ProjectionHead, TokenClassifier
from models.memory import MemoryBank

# Sub-modules that `set_head_trainable` may freeze (the backbone is always trained, the teacher never is).
TRAINABLE_HEADS: tuple[str, ...] = ("classifier", "classifier_aux", "decoder", "proj_head")


@dataclass
class MSFCOutput:
    """Named outputs of `MSFC.forward` (fixed fields, SPEC §1.2).

    Attributes:
        cls_logits: `[B, C_fg]` image logits of the classifier on the global max pool of `tokens`.
        cls_logits_aux: `[B, C_fg]` the same for the auxiliary classifier on `tokens_aux`.
        cam: `[B, C_fg, h, w]` classifier weights on `tokens` (no bias, no ReLU).
        cam_aux: `[B, C_fg, h, w]` auxiliary classifier weights on `tokens_aux`.
        tokens: `[B, D, h, w]` final patch tokens (after the final norm).
        tokens_aux: `[B, D, h, w]` auxiliary patch tokens (block `aux_layer`, before the final norm).
        cls_token: `[B, D]` class token after the final norm.
        seg_logits: `[B, C, h, w]` LargeFOV logits at token resolution, or None when `with_seg=False`.
    """

    cls_logits: torch.Tensor
    cls_logits_aux: torch.Tensor
    cam: torch.Tensor
    cam_aux: torch.Tensor
    tokens: torch.Tensor
    tokens_aux: torch.Tensor
    cls_token: torch.Tensor
    seg_logits: torch.Tensor | None


class MSFC(nn.Module):
    """Multi-Source Feature Contrast network (SPEC §1).

    Args:
        backbone: the ViT encoder.
        num_classes: C including background (VOC 21, COCO 81).
        decoder_channels: LargeFOV width.
        decoder_dilation: LargeFOV dilation.
        proj_hidden_dim: projection head MLP width.
        proj_bottleneck_dim: projection head bottleneck.
        proj_out_dim: projection head output dimension.
        teacher_momentum: EMA momentum m of the teacher head, `t <- m·t + (1-m)·s`.
        memory: the MP2M bank with `num_classes - 1` classes and dim D; None builds one with the SPEC defaults.
    """

    def __init__(
        self,
        backbone: ViTBackbone,
        num_classes: int = 21,
        decoder_channels: int = 512,
        decoder_dilation: int = 5,
        proj_hidden_dim: int = 2048,
        proj_bottleneck_dim: int = 256,
        proj_out_dim: int = 1024,
        teacher_momentum: float = 0.9,
        memory: MemoryBank | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(
                f"MSFC: num_classes (data.num_classes) counts background and must be >= 2, got {num_classes}"
            )
        if not 0.0 <= teacher_momentum <= 1.0:
            raise ValueError(
                f"MSFC: teacher_momentum (model.teacher_momentum) must be in [0, 1], got {teacher_momentum}"
            )
        dim = backbone.embed_dim
        num_fg = num_classes - 1
        self.num_classes = num_classes
        self.teacher_momentum = float(teacher_momentum)
        self.backbone = backbone
        self.classifier = TokenClassifier(dim, num_fg)
        self.classifier_aux = TokenClassifier(dim, num_fg)
        self.decoder = LargeFOV(dim, num_classes, channels=decoder_channels, dilation=decoder_dilation)
        self.proj_head = ProjectionHead(dim, proj_hidden_dim, proj_bottleneck_dim, proj_out_dim)
        # SPEC §1.2: the teacher is a copy of the projection head only; the encoder is shared.
        self.proj_head_teacher = copy.deepcopy(self.proj_head)
        self.proj_head_teacher.requires_grad_(False)
        if memory is None:
            memory = MemoryBank(num_fg, dim)
        if memory.num_classes != num_fg or memory.dim != dim:
            raise ValueError(
                f"MSFC: memory bank is [{memory.num_classes}, {memory.dim}], expected [{num_fg}, {dim}] "
                "(foreground classes, embedding dim)"
            )
        self.memory = memory
        # Parameters fixed by construction (frozen pos_embed, weight-norm gain, teacher) never enter the optimiser,
        # while heads frozen temporarily by the curriculum do; record the former now, before any such freezing.
        self._fixed_params = frozenset(name for name, p in self.named_parameters() if not p.requires_grad)

    @property
    def num_fg_classes(self) -> int:
        """C_fg = C - 1."""
        return self.num_classes - 1

    @property
    def embed_dim(self) -> int:
        """Token dimension D."""
        return self.backbone.embed_dim

    @property
    def patch_size(self) -> int:
        """Backbone patch size p."""
        return self.backbone.patch_size

    def normalize(self, images: torch.Tensor, *, check_range: bool = True) -> torch.Tensor:
        """The backbone's input normalisation: `[B, 3, H, W]` uint8 or float in [0, 1] -> the model's input."""
        return self.backbone.normalize(images, check_range=check_range)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Invert `normalize`: the model's input `[B, 3, H, W]` -> RGB in [0, 1] (clamped), e.g. for PAR."""
        return self.backbone.denormalize(x)

    def forward(self, x: torch.Tensor, with_seg: bool = True) -> MSFCOutput:
        """Encode and classify.

        Args:
            x: `[B, 3, H, W]` images normalised by `normalize` (the backbone's statistics), H and W multiples of p.
            with_seg: also run the LargeFOV decoder.

        Returns:
            `MSFCOutput` (h = H / p, w = W / p).
        """
        feats = self.backbone(x)
        return MSFCOutput(
            cls_logits=self.classifier(feats.tokens),
            cls_logits_aux=self.classifier_aux(feats.tokens_aux),
            cam=self.classifier.cam(feats.tokens),
            cam_aux=self.classifier_aux.cam(feats.tokens_aux),
            tokens=feats.tokens,
            tokens_aux=feats.tokens_aux,
            cls_token=feats.cls_token,
            seg_logits=self.decoder(feats.tokens) if with_seg else None,
        )

    def project(self, cls_token: torch.Tensor) -> torch.Tensor:
        """Student projection `cls_token [N, D]` -> `[N, proj_out_dim]`, with gradient (SPEC §4.3)."""
        return self.proj_head(cls_token)

    @torch.no_grad()
    def project_teacher(self, cls_token: torch.Tensor) -> torch.Tensor:
        """Teacher projection of detached class tokens `[N, D]` -> `[N, proj_out_dim]`, no gradient (SPEC §4.3)."""
        return self.proj_head_teacher(cls_token.detach())

    @torch.no_grad()
    def ema_update(self, momentum: float | None = None) -> None:
        """`t <- m·t + (1-m)·s` over the projection-head parameters; called by the loop after `optimizer.step()`.

        Args:
            momentum: m; None uses `teacher_momentum`.
        """
        m = self.teacher_momentum if momentum is None else float(momentum)
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"MSFC.ema_update: momentum must be in [0, 1], got {m}")
        for teacher, student in zip(self.proj_head_teacher.parameters(), self.proj_head.parameters(), strict=True):
            # lerp: t + (1-m)(s - t), the EMA written as the step it takes.
            teacher.lerp_(student.detach(), 1.0 - m)

    def set_head_trainable(self, head: str, trainable: bool) -> None:
        """Freeze or unfreeze one head while its loss terms are inactive (curriculum phases, design.md).

        Parameters fixed by construction (weight-norm gain, frozen pos_embed) stay fixed; the teacher and the bank
        are not heads.

        Args:
            head: one of `TRAINABLE_HEADS` ("classifier", "classifier_aux", "decoder", "proj_head").
            trainable: the new `requires_grad` of the head's parameters.
        """
        if head not in TRAINABLE_HEADS:
            raise ValueError(f"MSFC.set_head_trainable: unknown head {head!r}; expected one of {TRAINABLE_HEADS}")
        for name, param in getattr(self, head).named_parameters(prefix=head):
            if name not in self._fixed_params:
                param.requires_grad_(trainable)

    def param_groups(self, lr: float, head_lr_mult: float = 10.0, weight_decay: float = 0.01) -> list[dict[str, Any]]:
        """Named AdamW parameter groups (SPEC §6).

        "backbone" is the ViT at `lr`; "heads" are the classifiers, decoder and student projection head at
        `lr * head_lr_mult`. Biases, norm weights (all 1-d parameters) and the ViT's class/register tokens get no
        weight decay (groups suffixed "_no_decay"). Each group carries `lr_mult` so a schedule can set
        `group["lr"] = lr(step) * group["lr_mult"]`. Parameters fixed by construction (frozen pos_embed,
        weight-norm gain, teacher head) are left out; empty groups are dropped.

        Returns:
            List of dicts with keys `name`, `params`, `lr`, `lr_mult`, `weight_decay`.
        """
        no_decay_vit = {f"backbone.vit.{n}" for n in getattr(self.backbone.vit, "no_weight_decay", set)()}
        buckets: dict[str, list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if name in self._fixed_params or name.startswith("proj_head_teacher."):
                continue
            part = "backbone" if name.startswith("backbone.") else "heads"
            decay = param.ndim > 1 and name not in no_decay_vit
            buckets.setdefault(part if decay else f"{part}_no_decay", []).append(param)
        groups = []
        for key in ("backbone", "backbone_no_decay", "heads", "heads_no_decay"):
            if not buckets.get(key):
                continue
            mult = 1.0 if key.startswith("backbone") else float(head_lr_mult)
            groups.append(
                {
                    "name": key,
                    "params": buckets[key],
                    "lr": lr * mult,
                    "lr_mult": mult,
                    "weight_decay": weight_decay if not key.endswith("_no_decay") else 0.0,
                }
            )
        return groups
