"""One MSFC training step (SPEC §3, §4): views, no-grad multi-scale CAMs, forwards, every active loss term.

The step reads the config once, in :meth:`TrainStep.__init__` (into :class:`StepSettings`, a term schedule, the view
builder and the loss modules); per iteration it computes plain tensors. Order of work (each part only when a term
needs it — weight 0 or before its start ⇒ not computed):

0. the main view (``core.views.TrainViews.main``): by default the augmented global view G1 of the crop
   (``views.main=g1``, SPEC §3; its flip also mirrors ``img_box``), or the clean crop (``views.main=clean``);
1. no-grad multi-scale CAM and CAM_aux of the main view (§2.1), class-masked, in fp32 unless ``cam.precision=train``;
2. one forward per distinct input size over all views of that size — main view, SMCM rotation and G2 (and G1 when
   main is clean) share the crop size, so they run as one batch; the SMCM rescaled view, the SMCM quadrants and the
   local crops each run as one batch;
   Each phase runs under a ``torch.profiler.record_function`` label (``step/cams``, ``step/views``,
   ``step/forward/<views>``, ``step/term/<name>``, ``step/combine``): free unless a profiler is recording, and how
   ``tools/benchmark.py`` breaks a step down;
3. the loss terms, one method each (``TrainStep.terms``: name -> ``fn(ctx) -> tensor``); ``losses.combine`` sums them
   once with their weights. A new term is a loss module, a method here and its keys under ``loss.*``
   (docs/design.md, "How to extend").

MP2M in training is driven from here only: :meth:`TrainStep._memory` accumulates the bank and computes L_mem, and
:meth:`TrainStep.after_optimizer_step` moves the bank every ``memory.update_every`` steps (with the EMA teacher).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.profiler import record_function

from core import cam as camlib
from core import labels as lablib
from core.views import LocalCrops, MainView, PhotometricAugment, TrainViews, smcm_to_main
from engine.inference import autocast
from losses import (
    BalancedCrossEntropy,
    ClassTokenContrast,
    EnergyLoss,
    MemoryContrast,
    MultiLabelSoftMargin,
    MultiViewContrast,
    PatchTokenContrast,
    TermSchedule,
    adaptive_memory_weight,
)
from models import MSFCOutput
from models.par import PAR
from utils.checkpoint import unwrap
from utils.syncs import host_item

# Terms that need the no-grad multi-scale CAMs of the main crop.
CAM_TERMS = ("ptc", "ctc", "smc", "mem", "seg", "reg")
MAIN_VIEWS = ("g1", "clean")
CAM_PRECISIONS = ("fp32", "train")
PRECISIONS = ("fp32", "bf16", "fp16")
# The non-photometric keys of each views.* node (the rest must be PhotometricAugment fields).
VIEW_EXTRA_KEYS = {"g1": (), "g2": ("scale",), "local": ("num_crops", "size", "neg_roi_thre")}


def label_cam_precision(cam_precision: str, train_precision: str) -> str:
    """Precision of the CAMs that are thresholded into labels (SPEC §8): fp32, or train.precision on request."""
    if cam_precision not in CAM_PRECISIONS:
        raise ValueError(f"cam.precision must be one of {CAM_PRECISIONS}, got {cam_precision!r}")
    return str(train_precision) if cam_precision == "train" else "fp32"


@dataclass(frozen=True)
class StepSettings:
    """The constants of a training step, read once from the config."""

    crop: int
    ignore_index: int
    high: float
    low: float
    bkg: float
    cam_scales: tuple[float, ...]
    cam_max_batch: int
    cam_precision: str  # precision of the label CAMs (label_cam_precision)
    precision: str  # train.precision: autocast of the forwards
    seg_cam_switch_iter: int
    label_agreement: str  # cam.label_agreement: none (published) | background | both (StepContext.label_maps)
    reg_image_mode: str  # how the energy's image is downsampled: nearest (dense, published) | bilinear (window)
    use_memory: bool  # loss.weight.mem > 0: the bank accumulates from step 0 and is updated on its cadence
    memory_every: int

    @classmethod
    def from_config(cls, cfg: DictConfig) -> StepSettings:
        if cfg.train.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {cfg.train.precision!r}")
        return cls(
            crop=int(cfg.data.crop_size), ignore_index=int(cfg.data.ignore_index), high=float(cfg.cam.high_thre),
            low=float(cfg.cam.low_thre), bkg=float(cfg.cam.bkg_thre), cam_scales=tuple(map(float, cfg.cam.scales)),
            cam_max_batch=int(cfg.cam.max_batch),
            cam_precision=label_cam_precision(str(cfg.cam.precision), str(cfg.train.precision)),
            precision=str(cfg.train.precision), seg_cam_switch_iter=int(cfg.loss.seg_cam_switch_iter),
            label_agreement=str(cfg.cam.label_agreement),
            reg_image_mode="nearest" if cfg.loss.reg_mode == "dense" else "bilinear",
            use_memory=float(cfg.loss.weight.mem) > 0, memory_every=int(cfg.memory.update_every),
        )  # fmt: skip


def build_views(views: Mapping) -> TrainViews:
    """The step's view builder from ``cfg.views`` (unknown keys of a view are an error naming the key)."""
    if views.main not in MAIN_VIEWS:
        raise ValueError(f"views.main must be one of {MAIN_VIEWS}, got {views.main!r}")
    recipes = {
        name: PhotometricAugment.from_mapping(views[name], f"views.{name}", extra)
        for name, extra in VIEW_EXTRA_KEYS.items()
    }
    local = views.local
    return TrainViews(
        g1=recipes["g1"], g2=recipes["g2"],
        # The local source must stay in the frame of the ROI map its crops are placed on, so it is not flipped; each
        # cut crop is flipped on its own instead (with the configured probability).
        local=dataclasses.replace(recipes["local"], flip_p=0.0),
        crops=LocalCrops(int(local.num_crops), int(local.size), float(local.neg_roi_thre), float(local.flip_p)),
        main_is_g1=views.main == "g1", smcm_scale=float(views.smcm.scale),
    )  # fmt: skip


def _host_max_present(batch: Mapping) -> int | None:
    """The most classes of an image in the batch, from the loader's CPU labels (``batch["host"]["label"]``).

    The trainer passes the loader's batch under ``"host"``; reading it is a host read of a host tensor, never a device
    sync. Without it (a batch built on the device) None: the online labels then read the device labels instead.
    """
    host = batch.get("host")
    if not host or "label" not in host:
        return None
    labels = host["label"]
    return int(host_item(labels.gt(0).sum(dim=1).max())) if labels.shape[0] > 0 else 0


def _slice_output(out: MSFCOutput, start: int, stop: int) -> MSFCOutput:
    return MSFCOutput(
        **{
            field.name: None if (value := getattr(out, field.name)) is None else value[start:stop]
            for field in dataclasses.fields(out)
        }
    )


def forward_grouped(model: nn.Module, views: Mapping[str, torch.Tensor], seg_view: str | None) -> dict[str, MSFCOutput]:
    """Run every view through ``model`` with one forward per distinct spatial size.

    Args:
        views: name -> normalised ``[B_v, 3, H_v, W_v]``.
        seg_view: the view whose segmentation logits are needed (its size group runs the decoder), or None.
    """
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    for name, x in views.items():
        groups[tuple(x.shape[-2:])].append(name)
    outputs: dict[str, MSFCOutput] = {}
    for names in groups.values():
        batch = torch.cat([views[name] for name in names]) if len(names) > 1 else views[names[0]]
        with record_function(f"step/forward/{'+'.join(names)}"):
            out = model(batch, with_seg=seg_view in names)
        start = 0
        for name in names:
            stop = start + views[name].shape[0]
            outputs[name] = _slice_output(out, start, stop) if len(names) > 1 else out
            start = stop
    return outputs


@dataclass
class StepContext:
    """What the term methods of one step read.

    Attributes:
        model: the bare model (not DDP-wrapped).
        step: the optimiser step.
        active: the terms computed at this step.
        labels: ``[B, C_fg]`` float image labels.
        main: the main view (images in [0, 1], box, local source).
        outs: view name -> model output (``main``, ``smcm_*``, ``g1``, ``g2``, ``local`` as built).
        cam, cam_aux: ``[B, C_fg, S, S]`` class-masked no-grad CAMs of the main view (None when no term needs them).
        cam_tok, cam_aux_tok: the same at the token grid.
        negative: ``[B, n]`` bool, the negative local crops (CTC only).
        most_present: the most classes any image of the batch has, known on the host (from the loader's CPU
            labels, ``batch["host"]``), or None when the batch came without them (it is then read from the device).
        logs: extra scalars to log (e.g. the adaptive memory weight), 0-dim tensors: ``losses.combine`` reads them
            with the loss values, in its one transfer.
    """

    model: nn.Module
    step: int
    active: set[str]
    labels: torch.Tensor
    main: MainView
    outs: dict[str, MSFCOutput]
    cam: torch.Tensor | None = None
    cam_aux: torch.Tensor | None = None
    cam_tok: torch.Tensor | None = None
    cam_aux_tok: torch.Tensor | None = None
    negative: torch.Tensor | None = None
    most_present: int | None = None
    logs: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.main.images01.shape[-2:])

    @staticmethod
    def label_maps(
        source: torch.Tensor, other: torch.Tensor, agreement: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (foreground-test, background-test) maps of a label rule whose published map is ``source``.

        ``cam.label_agreement``: ``none`` → (source, None), the published rule (one map for both tests);
        ``background`` → (source, max(source, other)): background only where both CAMs are at or below the
        threshold; ``both`` → (min, max) of the two (``core.labels.agreement_pair``): foreground only where both are
        above it too. ``other`` is the other branch's CAM (CAM for CAM_aux and vice versa).
        """
        if agreement == "none":
            return source, None
        lower, upper = lablib.agreement_pair(source, other)
        return (lower if agreement == "both" else source), upper


class TrainStep:
    """Computes the loss terms of one micro-batch.

    ``step(model, batch, step, generator) -> (total, logs)``: ``model`` may be DDP-wrapped; ``batch`` is a training
    batch from ``datasets.build_dataset(..., mode="train")`` already on the device, optionally with the loader's
    CPU batch under ``"host"`` (as the trainer passes it); ``generator`` is the CPU generator that draws the view
    augmentations and local-crop placements (checkpointed with the run).

    Host reads (device synchronisations on CUDA, ``utils/syncs.py``): one per call, the ``tolist`` in
    ``losses.combine`` that brings every logged number to the host and checks the losses for NaN/Inf. The random
    draws of the CPU generator and the batch's class count (from ``batch["host"]``) are host values in every run.
    Without ``batch["host"]`` the online segmentation labels read the class count from the device (one more read);
    ``MemoryBank.any_initialized`` reads the bank's flags only after they changed (at the first step, then after
    each bank update until a class is ready); ``MSFC_DEBUG=1`` adds the input checks that read values.
    """

    def __init__(self, cfg: DictConfig, device: torch.device):
        self.settings = s = StepSettings.from_config(cfg)
        self.device = device
        self.schedule = TermSchedule.from_config(cfg.loss)
        self.views = build_views(cfg.views)
        self.par = PAR(tuple(cfg.par.dilations), int(cfg.par.num_iter)).to(device)
        loss = cfg.loss
        self.losses = nn.ModuleDict(
            {
                "cls": MultiLabelSoftMargin(),
                "ptc": PatchTokenContrast(),
                "ctc": ClassTokenContrast(float(loss.ctc_temp), normalize=bool(loss.ctc_normalize)),
                "smc": MultiViewContrast(reduction=str(loss.smc_reduction)),
                "mem": MemoryContrast(s.high, s.low, s.ignore_index),
                "seg": BalancedCrossEntropy(s.ignore_index),
                "reg": EnergyLoss(mode=str(loss.reg_mode), sigma_xy=float(loss.reg_sigma_xy),
                                  sigma_rgb=float(loss.reg_sigma_rgb), inner_weight=float(loss.reg_inner_weight),
                                  kernel_radius=int(loss.reg_kernel_radius)),
            }
        )  # fmt: skip
        # Term name -> method computing it from the step context; seg and reg share one method (one set of labels).
        self.terms: dict[str, Callable[[StepContext], torch.Tensor]] = {
            "cls": lambda ctx: self.losses["cls"](ctx.outs["main"].cls_logits, ctx.labels),
            "cls_aux": lambda ctx: self.losses["cls"](ctx.outs["main"].cls_logits_aux, ctx.labels),
            "ptc": self._ptc,
            "ctc": self._ctc,
            "smc": self._smc,
        }

    def autocast(self) -> torch.autocast:
        return autocast(self.device, self.settings.precision)

    def active(self, step: int) -> list[str]:
        return self.schedule.active(step)

    def __call__(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], step: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        s, active, bare = self.settings, set(self.active(step)), unwrap(model)
        crop01 = batch["img"].float() / 255.0  # [B, 3, S, S] the clean crop
        labels = batch["label"].float()  # [B, C_fg]
        with record_function("step/views"):
            main = self.views.main(crop01, batch["img_box"], generator)
            x = bare.normalize(main.images01, check_range=False)  # [0, 1] by construction: no device sync

        cam = cam_aux = None
        if active & set(CAM_TERMS) or s.use_memory:
            with record_function("step/cams"), torch.no_grad(), autocast(self.device, s.cam_precision):
                cam, cam_aux = camlib.multiscale_cam(bare, x, s.cam_scales, s.cam_max_batch)
            mask = labels[:, :, None, None]
            cam, cam_aux = cam.float() * mask, cam_aux.float() * mask  # [B, C_fg, S, S] in [0, 1]

        views, negative = {"main": x}, None
        with record_function("step/views"):
            if "smc" in active:
                views.update(self.views.smcm(x, bare.patch_size))
            if "ctc" in active:
                ctc_views, negative = self.views.ctc(main, batch["g2"].float() / 255.0, cam_aux, s.high, s.low,
                                                     generator)  # fmt: skip
                views.update({name: bare.normalize(view, check_range=False) for name, view in ctc_views.items()})
        with self.autocast():
            outs = forward_grouped(model, views, seg_view="main" if active & {"seg", "reg"} else None)

        ctx = StepContext(bare, step, active, labels, main, outs, cam, cam_aux, negative=negative,
                          most_present=_host_max_present(batch))  # fmt: skip
        if cam is not None:
            grid = tuple(outs["main"].tokens.shape[-2:])
            ctx.cam_tok, ctx.cam_aux_tok = camlib.resize_to_tokens(cam, grid), camlib.resize_to_tokens(cam_aux, grid)
        terms = {}
        for name, fn in self.terms.items():
            if name in active:
                with record_function(f"step/term/{name}"):
                    terms[name] = fn(ctx)
        if s.use_memory:
            with record_function("step/term/mem"):
                terms.update(self._memory(ctx))
        if active & {"seg", "reg"}:
            with record_function("step/term/seg+reg"):
                terms.update(self._seg(ctx))
        with record_function("step/combine"):
            total, logs = self.schedule.combine(terms, step, extra=ctx.logs)  # the step's one host read
        return total, logs

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """After the optimiser step ``step``: the EMA teacher, and the memory bank on its cadence (all ranks)."""
        bare = unwrap(model)
        bare.ema_update()
        if self.settings.use_memory and (step + 1) % self.settings.memory_every == 0:
            bare.memory.update(return_ids=False)  # listing the updated classes would be a host read

    def _ptc(self, ctx: StepContext) -> torch.Tensor:
        """Patch-token contrast (§4.2) on the final tokens, token labels from CAM_aux."""
        s = self.settings
        fg, bg = ctx.label_maps(ctx.cam_aux_tok, ctx.cam_tok, s.label_agreement)
        token_lbl = lablib.token_labels(fg, ctx.main.box, ctx.size, s.high, s.low, s.ignore_index, bg_scores=bg)
        return self.losses["ptc"](ctx.outs["main"].tokens, lablib.pair_labels(token_lbl, s.ignore_index))

    def _ctc(self, ctx: StepContext) -> torch.Tensor:
        """Class-token contrast (§4.3): student = all 10 views, teacher = the 2 global views (detached)."""
        outs, bare = ctx.outs, ctx.model
        batch, num_local = ctx.negative.shape
        first = outs["main"] if self.views.main_is_g1 else outs["g1"]  # main = G1: encoded once
        global_tokens = torch.cat([first.cls_token, outs["g2"].cls_token])  # [2B, D], view-major
        student_global = bare.project(global_tokens).float().view(2, batch, -1).transpose(0, 1)  # [B, 2, K]
        student_local = bare.project(outs["local"].cls_token).float().view(batch, num_local, -1)  # [B, n, K]
        teacher = bare.project_teacher(global_tokens.detach()).float().view(2, batch, -1).transpose(0, 1)
        is_negative = torch.cat([torch.zeros_like(ctx.negative[:, :2]), ctx.negative], dim=1)  # globals: positive
        return self.losses["ctc"](torch.cat([student_global, student_local], dim=1), teacher, is_negative)

    def _smc(self, ctx: StepContext) -> torch.Tensor:
        """SMCM (§4.4): the views' CAMs mapped back onto the main view, against its no-grad CAM."""
        grid = tuple(ctx.cam_tok.shape[-2:])
        view_cams = {name.removeprefix("smcm_"): out.cam for name, out in ctx.outs.items() if name.startswith("smcm_")}
        mapped = smcm_to_main(view_cams, grid)
        valid = camlib.box_mask(ctx.main.box, grid, ctx.size)
        return self.losses["smc"](mapped.float(), ctx.cam_tok, ctx.labels, valid)

    def _memory(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        """MP2M (§4.5): accumulate this batch's prototypes; L_mem × its adaptive weight once the bank has a class."""
        bare, main = ctx.model, ctx.outs["main"]
        s = self.settings
        fg, bg = ctx.label_maps(ctx.cam_tok, ctx.cam_aux_tok, s.label_agreement)
        proto = lablib.prototype_labels(fg, ctx.main.box, ctx.size, s.bkg, s.ignore_index, bg_cam=bg)
        bare.memory.accumulate(main.tokens.detach().float(), proto)
        if "mem" not in ctx.active or not bare.memory.any_initialized():
            return {}
        tokens = main.tokens.float()
        similarity = bare.memory.similarity(tokens.detach(), ctx.labels)  # [B, C_fg, h, w]
        weight = adaptive_memory_weight(similarity, ctx.cam_aux_tok, ctx.cam_tok)
        ctx.logs["mem_weight"] = weight  # a tensor: read with the losses
        return {"mem": weight * self.losses["mem"](tokens, similarity, ctx.main.box, ctx.size)}

    def _seg(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Online segmentation labels (§2.4) -> balanced CE and the energy regulariser (§4.6)."""
        s, images01, box = self.settings, ctx.main.images01, ctx.main.box
        if ctx.step < s.seg_cam_switch_iter:  # the COCO curriculum: CAM_aux alone
            fg, bg = ctx.cam_aux, None
        else:
            fg, bg = ctx.label_maps(ctx.cam, ctx.cam_aux, s.label_agreement)
        with torch.no_grad():
            target = lablib.online_seg_labels(fg, ctx.labels, images01, box, self.par, s.high, s.low,
                                              s.ignore_index, most_present=ctx.most_present, bg_cam=bg)  # fmt: skip
        logits = ctx.outs["main"].seg_logits.float()
        terms = {}
        if "seg" in ctx.active:
            full = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
            terms["seg"] = self.losses["seg"](full, target)
        if "reg" in ctx.active:
            half = (s.crop // 2, s.crop // 2)
            prob = F.interpolate(logits, size=half, mode="bilinear", align_corners=False).softmax(dim=1)
            corners = None if s.reg_image_mode == "nearest" else False
            image = F.interpolate(images01, size=half, mode=s.reg_image_mode, align_corners=corners) * 255.0
            valid = camlib.box_mask(box, half, (s.crop, s.crop))
            ignored = F.interpolate(target[:, None].float(), size=half, mode="nearest")[:, 0] == s.ignore_index
            terms["reg"] = self.losses["reg"](prob, image, valid, ignored & valid)
        return terms
