"""One MSFC training step (SPEC §3, §4): views, no-grad multi-scale CAMs, forwards, every active loss term.

Shared by ``tools/train.py`` and the tests. The step reads its constants from the config once, in
:meth:`TrainStep.__init__`; everything it computes per iteration is plain tensors.

Order of work in a step (each part only when a term needs it — weight 0 or before its start ⇒ not computed):

0. the main view: by default the augmented global view G1 of the crop (``views.main=g1``, SPEC §3; its flip also
   mirrors ``img_box``), or the clean crop (``views.main=clean``, G1 then built separately for CTC);
1. no-grad multi-scale CAM and CAM_aux of the main view (§2.1), class-masked, in fp32 unless ``cam.precision=train``;
2. one forward per distinct input size over all views of that size — main view, SMCM rotation and G2 (and G1 when
   main is clean) share the crop size, so they run as one batch; the SMCM rescaled view, the SMCM quadrants and the
   local crops each run as one batch;
3. loss terms; ``losses.combine`` sums them once with their weights.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from core import cam as camlib
from core import labels as lablib
from core import views as viewlib
from core.views import PhotometricAugment, flip_boxes
from engine.inference import autocast
from losses import (
    BalancedCrossEntropy,
    ClassTokenContrast,
    EnergyLoss,
    MemoryContrast,
    MultiLabelSoftMargin,
    MultiViewContrast,
    PatchTokenContrast,
    active_terms,
    adaptive_memory_weight,
    combine,
)
from models import MSFCOutput, normalize
from models.par import PAR
from utils.checkpoint import unwrap

# Terms that train a head of their own; the head is frozen while none of its terms is active (docs/design.md).
HEAD_TERMS = {"decoder": ("seg", "reg"), "proj_head": ("ctc",)}
# Terms that need the no-grad multi-scale CAMs of the main crop.
CAM_TERMS = ("ptc", "ctc", "smc", "mem", "seg", "reg")
MAIN_VIEWS = ("g1", "clean")
CAM_PRECISIONS = ("fp32", "train")


def label_cam_precision(cam_precision: str, train_precision: str) -> str:
    """Precision of the CAMs that are thresholded into labels (SPEC §8): fp32, or train.precision on request."""
    if cam_precision not in CAM_PRECISIONS:
        raise ValueError(f"cam.precision must be one of {CAM_PRECISIONS}, got {cam_precision!r}")
    return str(train_precision) if cam_precision == "train" else "fp32"


def _augment(node: Mapping) -> PhotometricAugment:
    names = {field.name for field in dataclasses.fields(PhotometricAugment)}
    return PhotometricAugment(**{key: value for key, value in node.items() if key in names})


def _slice_output(out: MSFCOutput, start: int, stop: int) -> MSFCOutput:
    return MSFCOutput(
        **{
            field.name: None if (value := getattr(out, field.name)) is None else value[start:stop]
            for field in dataclasses.fields(out)
        }
    )


def forward_grouped(model: nn.Module, views: Mapping[str, torch.Tensor], with_seg: str | None) -> dict[str, MSFCOutput]:
    """Run every view through ``model`` with one forward per distinct spatial size.

    Args:
        views: name -> normalised ``[B_v, 3, H_v, W_v]``.
        with_seg: the view whose segmentation logits are needed (its size group runs the decoder), or None.
    """
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    for name, x in views.items():
        groups[tuple(x.shape[-2:])].append(name)
    outputs: dict[str, MSFCOutput] = {}
    for names in groups.values():
        batch = torch.cat([views[name] for name in names]) if len(names) > 1 else views[names[0]]
        out = model(batch, with_seg=with_seg in names)
        start = 0
        for name in names:
            stop = start + views[name].shape[0]
            outputs[name] = _slice_output(out, start, stop) if len(names) > 1 else out
            start = stop
    return outputs


def heads_in_use(cfg: DictConfig, step: int) -> dict[str, bool]:
    """Which term-specific heads receive gradient at ``step`` (the DDP phase)."""
    active = set(active_terms(cfg.loss.weight, cfg.loss.start_iter, cfg.loss.ramp_iters, step))
    return {head: any(term in active for term in terms) for head, terms in HEAD_TERMS.items()}


def set_heads_trainable(model: nn.Module, heads: Mapping[str, bool]) -> None:
    """Freeze or unfreeze the term-specific heads (parameters fixed by construction stay fixed)."""
    bare = unwrap(model)
    for head, trainable in heads.items():
        bare.set_head_trainable(head, trainable)


class TrainStep:
    """Computes the loss terms of one micro-batch.

    ``step(model, batch, step, generator) -> (total, logs)``: ``model`` may be DDP-wrapped; ``batch`` is a training
    batch from ``datasets.build_dataset(..., mode="train")`` already on the device; ``generator`` is the CPU
    generator that draws the view augmentations and local-crop placements (checkpointed with the run).
    """

    def __init__(self, cfg: DictConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.crop = int(cfg.data.crop_size)
        self.ignore = int(cfg.data.ignore_index)
        self.high, self.low, self.bkg = float(cfg.cam.high_thre), float(cfg.cam.low_thre), float(cfg.cam.bkg_thre)
        self.g1, self.g2 = _augment(cfg.views.g1), _augment(cfg.views.g2)
        if cfg.views.main not in MAIN_VIEWS:
            raise ValueError(f"views.main must be one of {MAIN_VIEWS}, got {cfg.views.main!r}")
        self.main_is_g1 = cfg.views.main == "g1"
        self.cam_precision = label_cam_precision(str(cfg.cam.precision), str(cfg.train.precision))
        # The local source must stay in the frame of the ROI map its crops are placed on, so it is not flipped;
        # each cut crop is flipped on its own instead (with the configured probability).
        self.local = dataclasses.replace(_augment(cfg.views.local), flip_p=0.0)
        self.local_flip_p = float(cfg.views.local.flip_p)
        self.par = PAR(tuple(cfg.par.dilations), int(cfg.par.num_iter)).to(device)
        self.losses = nn.ModuleDict(
            {
                "cls": MultiLabelSoftMargin(),
                "ptc": PatchTokenContrast(),
                "ctc": ClassTokenContrast(float(cfg.loss.ctc_temp), normalize=bool(cfg.loss.ctc_normalize)),
                "smc": MultiViewContrast(reduction=str(cfg.loss.smc_reduction)),
                "mem": MemoryContrast(self.high, self.low, self.ignore),
                "seg": BalancedCrossEntropy(self.ignore),
                "reg": EnergyLoss(mode=str(cfg.loss.reg_mode), sigma_xy=float(cfg.loss.reg_sigma_xy),
                                  sigma_rgb=float(cfg.loss.reg_sigma_rgb),
                                  inner_weight=float(cfg.loss.reg_inner_weight),
                                  kernel_radius=int(cfg.loss.reg_kernel_radius)),
            }
        )  # fmt: skip
        # The published dense energy sees the image nearest-downsampled; the window variant kept its bilinear input.
        self.reg_image_mode = "nearest" if cfg.loss.reg_mode == "dense" else "bilinear"
        if cfg.train.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"train.precision must be fp32, bf16 or fp16, got {cfg.train.precision!r}")

    def autocast(self) -> torch.autocast:
        return autocast(self.device, str(self.cfg.train.precision))

    def active(self, step: int) -> list[str]:
        loss = self.cfg.loss
        return active_terms(loss.weight, loss.start_iter, loss.ramp_iters, step)

    def __call__(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], step: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        active = set(self.active(step))
        bare = unwrap(model)
        crop01 = batch["img"].float() / 255.0  # [B, 3, S, S] the clean crop
        labels = batch["label"].float()  # [B, C_fg]
        box = batch["img_box"]  # [B, 4]
        size = (self.crop, self.crop)
        if self.main_is_g1:
            # main = G1 (SPEC §3): every main-view computation sees this augmented view. Its flip mirrors img_box and
            # the clean crop, which stays in the main frame as the local source.
            images01, flipped = self.g1(crop01, generator)
            box = flip_boxes(box, flipped, self.crop)
            crop01 = torch.where(flipped[:, None, None, None], crop01.flip(-1), crop01)
        else:
            images01 = crop01
        x = normalize(images01, check_range=False)  # [0, 1] by construction: no range check, no device sync
        terms: dict[str, torch.Tensor] = {}
        logs: dict[str, float] = {}

        need_cams = bool(active & set(CAM_TERMS)) or self.cfg.loss.weight.mem > 0
        if need_cams:
            with torch.no_grad(), autocast(self.device, self.cam_precision):
                cam, cam_aux = camlib.multiscale_cam(bare, x, tuple(self.cfg.cam.scales), int(self.cfg.cam.max_batch))
            mask = labels[:, :, None, None]
            cam, cam_aux = cam.float() * mask, cam_aux.float() * mask  # [B, C_fg, S, S] in [0, 1]

        views = {"main": x}
        if "smc" in active:
            smcm = viewlib.smcm_views(x, float(self.cfg.views.smcm.scale), bare.patch_size)
            views.update({f"smcm_{name}": view for name, view in smcm.items()})
        if "ctc" in active:
            if not self.main_is_g1:
                g1, _ = self.g1(images01, generator)
                views["g1"] = normalize(g1, check_range=False)
            g2, _ = self.g2(batch["g2"].float() / 255.0, generator)
            source, _ = self.local(crop01, generator)
            roi = viewlib.roi_map(cam_aux, self.high, self.low)
            # Centres are drawn where ROI <= 1; marking the zero padding 2 keeps local crops on the image.
            roi = torch.where(camlib.box_mask(box, size, size), roi, torch.full_like(roi, 2))
            local_cfg = self.cfg.views.local
            tops, negative = viewlib.place_local_crops(
                roi, int(local_cfg.num_crops), int(local_cfg.size), float(local_cfg.neg_roi_thre), generator
            )
            crops = viewlib.cut_crops(source, tops, int(local_cfg.size))  # [B·n, 3, size, size]
            flip = torch.rand(crops.shape[0], generator=generator) < self.local_flip_p
            crops = torch.where(flip.to(crops.device)[:, None, None, None], crops.flip(-1), crops)
            views.update(g2=normalize(g2, check_range=False), local=normalize(crops, check_range=False))

        with self.autocast():
            outs = forward_grouped(model, views, with_seg="main" if active & {"seg", "reg"} else None)
        main = outs["main"]
        grid = tuple(main.tokens.shape[-2:])

        if "cls" in active:
            terms["cls"] = self.losses["cls"](main.cls_logits, labels)
        if "cls_aux" in active:
            terms["cls_aux"] = self.losses["cls"](main.cls_logits_aux, labels)
        if need_cams:
            cam_tok, cam_aux_tok = camlib.resize_to_tokens(cam, grid), camlib.resize_to_tokens(cam_aux, grid)
        if "ptc" in active:
            token_lbl = lablib.token_labels(cam_aux_tok, box, size, self.high, self.low, self.ignore)
            terms["ptc"] = self.losses["ptc"](main.tokens, lablib.pair_labels(token_lbl, self.ignore))
        if "ctc" in active:
            terms["ctc"] = self._ctc(bare, outs, negative)
        if "smc" in active:
            mapped = viewlib.smcm_to_main({name: outs[f"smcm_{name}"].cam for name in smcm}, grid)
            valid = camlib.box_mask(box, grid, size)
            terms["smc"] = self.losses["smc"](mapped.float(), cam_tok, labels, valid)
        if self.cfg.loss.weight.mem > 0:
            proto = lablib.prototype_labels(cam_tok, box, size, self.bkg)
            bare.memory.accumulate(main.tokens.detach().float(), proto)
            if "mem" in active and bare.memory.any_initialized():
                terms["mem"], logs["mem_weight"] = self._mem(bare, main, labels, box, cam_tok, cam_aux_tok)
        if active & {"seg", "reg"}:
            terms.update(self._seg(main, cam, cam_aux, labels, images01, box, step, active))

        total, loss_logs = combine(
            terms, self.cfg.loss.weight, self.cfg.loss.start_iter, self.cfg.loss.ramp_iters, step
        )
        return total, {**loss_logs, **logs}

    def _ctc(self, bare: nn.Module, outs: Mapping[str, MSFCOutput], negative: torch.Tensor) -> torch.Tensor:
        """Class-token contrast (§4.3): student = all 10 views, teacher = the 2 global views (detached)."""
        batch, num_local = negative.shape
        first = outs["main"] if self.main_is_g1 else outs["g1"]  # main = G1: encoded once
        global_tokens = torch.cat([first.cls_token, outs["g2"].cls_token])  # [2B, D], view-major
        student_global = bare.project(global_tokens).float().view(2, batch, -1).transpose(0, 1)  # [B, 2, K]
        student_local = bare.project(outs["local"].cls_token).float().view(batch, num_local, -1)  # [B, n, K]
        teacher = bare.project_teacher(global_tokens.detach()).float().view(2, batch, -1).transpose(0, 1)
        is_negative = torch.cat([torch.zeros_like(negative[:, :2]), negative], dim=1)  # globals are positive
        return self.losses["ctc"](torch.cat([student_global, student_local], dim=1), teacher, is_negative)

    def _mem(self, bare, main, labels, box, cam_tok, cam_aux_tok) -> tuple[torch.Tensor, float]:
        """Memory contrast (§4.5) times its adaptive weight."""
        tokens = main.tokens.float()
        similarity = bare.memory.similarity(tokens.detach(), labels)  # [B, C_fg, h, w]
        # An image none of whose present classes is in the bank has S = 0 everywhere, which §2.3 would read as
        # "all background" and pull all its tokens together; give it an empty box so all its tokens are ignored.
        matched = similarity.flatten(1).amax(dim=1) > 0
        box = torch.where(matched[:, None], box, torch.zeros_like(box))
        weight = adaptive_memory_weight(similarity, cam_aux_tok, cam_tok)
        loss = self.losses["mem"](tokens, similarity, box, (self.crop, self.crop))
        return weight * loss, float(weight)

    def _seg(self, main, cam, cam_aux, labels, images01, box, step, active) -> dict[str, torch.Tensor]:
        """Online segmentation labels (§2.4) -> balanced CE and the energy regulariser (§4.6)."""
        source = cam_aux if step < int(self.cfg.loss.seg_cam_switch_iter) else cam
        with torch.no_grad():
            target = lablib.online_seg_labels(source, labels, images01, box, self.par, self.high, self.low, self.ignore)
        logits = main.seg_logits.float()
        terms = {}
        if "seg" in active:
            full = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
            terms["seg"] = self.losses["seg"](full, target)
        if "reg" in active:
            half = (self.crop // 2, self.crop // 2)
            prob = F.interpolate(logits, size=half, mode="bilinear", align_corners=False).softmax(dim=1)
            corners = None if self.reg_image_mode == "nearest" else False
            image = F.interpolate(images01, size=half, mode=self.reg_image_mode, align_corners=corners) * 255.0
            valid = camlib.box_mask(box, half, (self.crop, self.crop))
            ignored = (F.interpolate(target[:, None].float(), size=half, mode="nearest")[:, 0] == self.ignore) & valid
            terms["reg"] = self.losses["reg"](prob, image, valid, ignored)
        return terms
