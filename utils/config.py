"""Configuration: ``configs/base.yaml`` <- experiment files (each with its ``_base_`` chain) <- ``key=value`` overrides.

``configs/base.yaml`` is the schema: every key the code reads. Anything else is rejected with the nearest valid key,
a value whose type contradicts the schema is rejected, and keys left at ``???`` must be set. Values are then checked
against :data:`RULES` (positive counts, probabilities in [0, 1], the choices of enumerated keys, ...) and the crop rule
(:func:`check_crop_sizes`); each error names the key and the rule. The resolved config is saved as
``<run.out_dir>/config.yaml`` and every tool can reload it (``--run-dir RUN_DIR``).

A resumed training run compares its config with the one its checkpoint was trained with (:func:`config_changes`):
only the keys of :data:`RESUME_MAY_CHANGE` may differ unless ``train.resume_allow_changes`` names the others.

Command line (all tools): ``--config FILE`` (repeatable: the files are layered in order, later wins) or
``--run-dir RUN_DIR``, then ``key=value`` overrides, e.g.
``python -m tools.train --config configs/voc.yaml --config my.yaml data.root=/data/VOC2012 train.max_iters=100``.
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from utils.errors import UserError
from utils.io import atomic_write_text

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
BASE_CONFIG = CONFIG_DIR / "base.yaml"
BASE_KEY = "_base_"
# Mappings whose sub-keys are free-form (passed straight to a library), so they are not checked against the schema.
OPEN_NODES = ("model.backbone_kwargs", "stage2.arch_kwargs")


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key or file."""


def _leaf_items(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``(dotted.key, value)`` for every leaf; lists and open nodes are leaves."""
    if isinstance(node, (dict, DictConfig)) and prefix not in OPEN_NODES:
        items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else node.items()
        for key, value in items:
            yield from _leaf_items(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def _schema() -> dict[str, Any]:
    with open(BASE_CONFIG) as f:
        return dict(_leaf_items(yaml.safe_load(f)))


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # a misspelt leaf under a correct section, e.g. train.max_iter
        section = key.rsplit(".", 1)[0]
        close = difflib.get_close_matches(key, [k for k in valid if k.startswith(section + ".")], n=1, cutoff=0.0)
    return f"; did you mean '{close[0]}'?" if close else ""


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple, ListConfig)):
        return "list"
    if isinstance(value, (dict, DictConfig)):
        return "mapping"
    return "string"


def _check_types(key: str, default: Any, value: Any, source: str) -> None:
    """Reject values whose kind contradicts the schema default (null defaults and ??? accept anything)."""
    if default is None or default == "???" or value is None or value == "???":
        return
    if isinstance(value, str) and value.startswith("${"):  # OmegaConf interpolation, checked when resolved
        return
    want, got = _type_name(default), _type_name(value)
    if isinstance(default, int) and not isinstance(default, bool):  # counts stay integers (range(), indexing)
        want = "integer"
        got = "integer" if isinstance(value, int) and not isinstance(value, bool) else got
    if want != got:
        article = "an" if want[0] in "aeiou" else "a"
        raise ConfigError(
            f"config key '{key}' from {source} expects {article} {want} (default {default!r}), got {value!r}"
        )


# Booleans that pseudo.refine replaced, in its order; a config that still has them (a run saved before) is read as
# the list they mean.
RETIRED_REFINERS = ("par", "crf")


def _retire_keys(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` with ``pseudo.par`` / ``pseudo.crf`` rewritten as the ``pseudo.refine`` list they mean."""
    pseudo = data.get("pseudo")
    if not isinstance(pseudo, dict) or not any(name in pseudo for name in RETIRED_REFINERS):
        return data
    pseudo = dict(pseudo)
    flags = {name: pseudo.pop(name) for name in RETIRED_REFINERS if name in pseudo}
    if "refine" in pseudo:
        raise ConfigError(f"{source} sets pseudo.refine and the retired {', '.join(f'pseudo.{k}' for k in flags)}: "
                          "keep pseudo.refine only")  # fmt: skip
    pseudo["refine"] = [name for name in RETIRED_REFINERS if flags.get(name) is True]
    if pseudo["refine"]:
        logger.warning("%s: pseudo.par / pseudo.crf are retired; read as pseudo.refine=[%s]", source,
                       ", ".join(pseudo["refine"]))  # fmt: skip
    return {**data, "pseudo": pseudo}


def _validate(node: Any, schema: dict[str, Any], source: str) -> None:
    valid = sorted(schema)
    for key, value in _leaf_items(node):
        if key in schema:
            _check_types(key, schema[key], value, source)
            continue
        if any(key.startswith(open_node + ".") for open_node in OPEN_NODES):
            continue
        # A mapping given where the schema has a leaf, or a key missing from the schema altogether.
        raise ConfigError(f"unknown config key '{key}' in {source}{_suggest(key, valid)}")


@dataclass(frozen=True)
class Rule:
    """A constraint on one config value: ``holds(value)``; ``text`` completes "<key> must be ..."."""

    text: str
    holds: Callable[[Any], bool]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_from(low: int, text: str) -> Rule:
    return Rule(text, lambda v: _integer(v) and v >= low)


def _between(low: float, high: float, text: str) -> Rule:
    return Rule(text, lambda v: _number(v) and low <= v <= high)


def _choices(*names: str) -> Rule:
    return Rule(f"one of {names}", lambda v: v in names)


def _list_of(item: Callable[[Any], bool], text: str, length: int | None = None) -> Rule:
    """A non-empty list whose items all satisfy ``item`` (of exactly ``length`` items when given)."""

    def holds(value: Any) -> bool:
        sized = len(value) == length if length is not None else len(value) > 0
        return isinstance(value, (list, tuple)) and sized and all(map(item, value))

    return Rule(text, holds)


def _range(low: float, high: float, text: str) -> Rule:
    """A ``[lo, hi]`` pair with ``low < lo <= hi <= high``."""
    pair = _list_of(_number, text, 2)
    return Rule(text, lambda v: pair.holds(v) and low < v[0] <= v[1] <= high)


def _text(text: str) -> Rule:
    """A non-blank string."""
    return Rule(text, lambda v: isinstance(v, str) and v.strip() != "")


POSITIVE_INT = _int_from(1, "a positive integer")
COUNT = _int_from(0, "a non-negative integer")
POSITIVE = Rule("a positive number", lambda v: _number(v) and v > 0)
NON_NEGATIVE = Rule("a non-negative number", lambda v: _number(v) and v >= 0)
UNIT = _between(0.0, 1.0, "a number in [0, 1]")
SCALES = _list_of(lambda x: _number(x) and x > 0, "a non-empty list of positive numbers")
INF = float("inf")

# Value rules, by key or fnmatch pattern (the first matching entry applies). A key with a null default may also be
# null. The choices mirror the modules that read them (tests/test_config.py checks that they agree).
RULES: dict[str, Rule] = {
    "run.seed": COUNT,
    "run.device": _choices("auto", "cpu", "cuda"),
    "run.num_threads": COUNT,
    "run.shard_index": COUNT,
    "run.num_shards": POSITIVE_INT,
    # a layout of datasets.LAYOUTS (voc, coco, or one registered by an extension; build_dataset names the choices)
    "data.name": Rule("a dataset layout name such as voc or coco", lambda v: isinstance(v, str) and v.isidentifier()),
    "data.num_classes": _int_from(2, "an integer >= 2 (background and at least one class)"),
    "data.crop_size": POSITIVE_INT,
    "data.scale_range": _range(0.0, INF, "a [low, high] pair with 0 < low <= high"),
    "data.ignore_index": Rule("an integer in 0..255 (a label PNG value)", lambda v: _integer(v) and 0 <= v <= 255),
    "data.num_workers": COUNT,
    "data.max_images": POSITIVE_INT,
    "views.main": _choices("g1", "clean"),
    "views.*_p": UNIT,
    "views.*.brightness": NON_NEGATIVE,
    "views.*.contrast": NON_NEGATIVE,
    "views.*.saturation": NON_NEGATIVE,
    "views.*.hue": _between(0.0, 0.5, "a number in [0, 0.5]"),
    "views.*.blur_sigma": _range(0.0, INF, "a [low, high] pair with 0 < low <= high"),
    "views.g2.scale": _range(0.0, 1.0, "a [low, high] area-fraction pair with 0 < low <= high <= 1"),
    "views.local.num_crops": POSITIVE_INT,
    "views.local.size": POSITIVE_INT,
    "views.local.neg_roi_thre": UNIT,
    "views.smcm.scale": POSITIVE,
    "model.pos_embed_resample": _choices("bicubic", "timm"),
    "model.norm_stats": _choices("imagenet", "pretrained"),
    "eval.precision": _choices("fp32", "bf16", "fp16"),
    "model.decoder_*": POSITIVE_INT,
    "model.proj_*_dim": POSITIVE_INT,
    "model.teacher_momentum": UNIT,
    "memory.update_every": POSITIVE_INT,
    "memory.momentum": UNIT,
    "memory.min_count": POSITIVE_INT,
    "memory.fuse_lambda": NON_NEGATIVE,
    "cam.scales": SCALES,
    "cam.*_thre": UNIT,
    "cam.max_batch": POSITIVE_INT,
    "cam.precision": _choices("fp32", "train"),
    "cam.label_agreement": _choices("none", "background", "both"),
    "cam.file_dtype": _choices("float16", "uint8"),
    "cam.write_threads": COUNT,
    "par.dilations": _list_of(lambda x: _integer(x) and x > 0, "a non-empty list of positive integers"),
    "par.num_iter": COUNT,
    "loss.weight.*": NON_NEGATIVE,
    "loss.start_iter.*": COUNT,
    "loss.ramp_iters.*": COUNT,
    "loss.ctc_temp": POSITIVE,
    "loss.smc_reduction": _choices("all_terms", "group_sum", "to_main"),
    "loss.seg_cam_switch_iter": COUNT,
    "loss.reg_mode": _choices("dense", "window"),
    "loss.reg_sigma_*": POSITIVE,
    "loss.reg_inner_weight": NON_NEGATIVE,
    "loss.reg_kernel_radius": POSITIVE_INT,
    "train.max_iters": POSITIVE_INT,
    "train.batch_size": POSITIVE_INT,
    "train.accum_steps": POSITIVE_INT,
    "train.precision": _choices("fp32", "bf16", "fp16"),
    "train.lr": POSITIVE,
    "train.head_lr_mult": NON_NEGATIVE,
    "train.weight_decay": NON_NEGATIVE,
    "train.betas": _list_of(lambda b: _number(b) and 0 <= b < 1, "a [beta1, beta2] pair of numbers in [0, 1)", 2),
    "train.warmup_iters": COUNT,
    "train.warmup_ratio": UNIT,
    "train.poly_power": NON_NEGATIVE,
    "train.grad_clip": NON_NEGATIVE,
    "train.log_every": POSITIVE_INT,
    "train.eval_every": COUNT,
    "train.ckpt_every": POSITIVE_INT,
    "train.keep_ckpts": COUNT,
    "train.stop_iter": POSITIVE_INT,
    "train.num_vis": COUNT,
    "train.resume_allow_changes": Rule(
        "a list of config keys or sections",
        lambda v: isinstance(v, (list, tuple)) and all(isinstance(k, str) for k in v),
    ),
    "eval.scales": SCALES,
    "eval.resize": POSITIVE_INT,
    "eval.resize_mode": _choices("long_side", "square"),
    "eval.*_fusion": _choices("sum", "mean", "max"),
    "eval.crf_workers": COUNT,
    "eval.crf_min_prob": UNIT,
    "eval.num_overlays": COUNT,
    "eval.sweep_start": UNIT,
    "eval.sweep_stop": UNIT,
    "eval.sweep_step": _between(1e-9, 1.0, "a number in (0, 1]"),
    "crf.iters": POSITIVE_INT,
    "crf.*_sxy": POSITIVE,
    "crf.bilateral_srgb": POSITIVE,
    "crf.*_compat": NON_NEGATIVE,
    "pseudo.cam_key": _choices("cam", "cam_aux"),
    "pseudo.bkg_thre": UNIT,
    "pseudo.soft_dtype": _choices("uint8", "float16"),
    "pseudo.refine": Rule(
        "an ordered subset of [rw, par, crf] (in that order), e.g. [rw] or [par, crf]",
        lambda v: isinstance(v, (list, tuple)) and _ordered_refiners(v),
    ),
    "pseudo.folder": _text("a folder name in the run"),
    "train.optimizer": _choices("adamw", "sgd"),
    "train.momentum": _between(0.0, 1.0, "a number in [0, 1]"),
    "task": _choices("msfc", "stage2", "irn"),
    "irn.relations": _text("a folder path"),
    "irn.*_thre": UNIT,
    "irn.crf_gt_prob": Rule("a number in (0, 1)", lambda v: _number(v) and 0 < v < 1),
    "irn.crf_iters": POSITIVE_INT,
    "irn.crf_*_sxy": POSITIVE,
    "irn.crf_bilateral_srgb": POSITIVE,
    "irn.crf_*_compat": NON_NEGATIVE,
    "irn.backbone": _text("a timm ResNet name such as resnet50.tv_in1k"),
    "irn.branch_channels": POSITIVE_INT,
    "irn.radius": _int_from(2, "an integer >= 2"),
    "rw.checkpoint": _text("an IRN run folder or checkpoint file"),
    "rw.radius": _int_from(2, "an integer >= 2"),
    "rw.beta": POSITIVE,
    "rw.exp_times": COUNT,
    "rw.bkg_thre": UNIT,
    "rw.mode": _choices("sparse", "dense"),
    "stage2.labels": _text("a folder path"),
    "stage2.target": _choices("hard", "soft"),
    "stage2.arch": Rule("an architecture name such as DeepLabV2 or DeepLabV3Plus", lambda v: str(v).isidentifier()),
    "stage2.encoder": _text("an smp encoder name such as tu-resnet101"),
    "stage2.output_stride": Rule("one of 8, 16, 32", lambda v: _integer(v) and v in (8, 16, 32)),
    "stage2.decoder_channels": POSITIVE_INT,
    "stage2.aspp_rates": _list_of(lambda x: _integer(x) and x > 0, "a non-empty list of positive integers"),
}
# Pairs (low key, high key) whose values must be ordered.
ORDERED = (("cam.low_thre", "cam.high_thre"), ("eval.sweep_start", "eval.sweep_stop"))
_PATCH_IN_NAME = re.compile(r"patch(\d+)")


# pseudo.refine: the refiners of tools/make_pseudo_labels.py, in the one order they compose (rw walks CAM scores;
# PAR and DenseCRF refine probabilities, PAR first).
REFINERS = ("rw", "par", "crf")


def _ordered_refiners(names: Sequence[Any]) -> bool:
    """Whether ``names`` are distinct :data:`REFINERS` in their order (a subsequence of it)."""
    if not all(isinstance(n, str) and n in REFINERS for n in names) or len(set(names)) != len(names):
        return False
    return list(names) == sorted(names, key=REFINERS.index)


def rule_for(key: str) -> Rule | None:
    """The :data:`RULES` entry of a dotted key (exact match first, then the first matching pattern)."""
    if key in RULES:
        return RULES[key]
    return next((rule for pattern, rule in RULES.items() if fnmatch.fnmatchcase(key, pattern)), None)


def _positive_patch(value: Any) -> int | None:
    """A patch size given as ``N`` or as a square ``[N, N]`` pair (timm accepts both); None otherwise."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    return value if _integer(value) and value > 0 else None


def backbone_patch(model: Mapping[str, Any]) -> tuple[int, str] | None:
    """``(patch size, where it comes from)`` of a ``model`` config section, or None when it cannot be told.

    ``model.backbone_kwargs.patch_size`` when given (``N`` or ``[N, N]``), else the ``patch<N>`` of a timm name such
    as ``vit_base_patch16_224`` or the DINOv2 ``vit_base_patch14_dinov2.lvd142m`` (patch 14).
    """
    kwargs = model.get("backbone_kwargs") or {}
    if "patch_size" in kwargs:
        patch = _positive_patch(kwargs["patch_size"])
        return None if patch is None else (patch, "model.backbone_kwargs.patch_size")
    match = _PATCH_IN_NAME.search(str(model.get("backbone", "")))
    return (int(match.group(1)), f"model.backbone {model.get('backbone')!r}") if match else None


def _nearby_multiples(value: int, multiple: int) -> str:
    """The multiples of ``multiple`` on either side of ``value``, for an error's hint: ``'e.g. 84 or 98'``."""
    below = value // multiple * multiple
    return "e.g. " + " or ".join(str(v) for v in (below, below + multiple) if v > 0)


def _size_rules(cfg: Mapping[str, Any], patch: int) -> Iterator[tuple[str, Any, int, str]]:
    """``(key, value, multiple, why)`` for every image side the training step feeds the backbone.

    Mirrors ``engine/step.py``: the main view (and G2) is the crop itself; with ``loss.weight.smc > 0``
    ``core/views.py`` ``smcm_views`` cuts it into 4 quadrants of ``data.crop_size / 2``; with ``loss.weight.ctc > 0``
    ``cut_crops`` cuts local crops of ``views.local.size``. The SMCM rescaled view needs no rule: its side is
    ``round_to_patch(data.crop_size * views.smcm.scale)``, whole patches by construction (as the multi-scale CAMs).
    """
    crop, local = cfg["data"]["crop_size"], cfg["views"]["local"]["size"]
    weight = cfg["loss"]["weight"]
    yield "data.crop_size", crop, patch, "the main view must tile into whole patches"
    if weight.get("smc", 0) > 0:
        yield (
            "data.crop_size",
            crop,
            2 * patch,
            "SMCM, on while loss.weight.smc > 0, cuts the crop into 4 quadrants of data.crop_size / 2 px, "
            "which must tile into whole patches",
        )
    if weight.get("ctc", 0) > 0:
        yield "views.local.size", local, patch, "CTC's local crops, on while loss.weight.ctc > 0, go through the ViT"


def check_crop_sizes(cfg: Mapping[str, Any]) -> None:
    """The crop rule (SPEC §3): every side the backbone sees is a whole number of patches (:func:`_size_rules`):
    ``data.crop_size`` a multiple of the patch (of 2·patch with SMCM on), ``views.local.size`` a multiple of the patch
    with CTC on. Skipped when the patch size cannot be told (:func:`backbone_patch`).

    Raises:
        ConfigError: naming the key, its value, the patch size and where it comes from, and valid values nearby.
    """
    found = backbone_patch(cfg["model"])
    if found is None:
        return
    patch, source = found
    for key, value, multiple, why in _size_rules(cfg, patch):
        if not _integer(value) or value % multiple == 0:
            continue
        size = f"the patch size {patch}" if multiple == patch else f"2·patch = {multiple}"
        raise ConfigError(
            f"{key} must be a multiple of {size} ({why}; patch {patch} from {source}), got {value}; "
            f"{_nearby_multiples(value, multiple)}"
        )


def check_values(cfg: Mapping[str, Any]) -> None:
    """Check a resolved config (plain containers) against :data:`RULES`, :data:`ORDERED` and the crop rule.

    Raises:
        ConfigError: the first violation, as ``<key> must be <rule>, got <value>``.
    """
    schema = _schema()
    flat = dict(_leaf_items(cfg))
    for key, value in flat.items():
        if value == "???":
            continue
        rule = rule_for(key)
        if rule is None:
            continue
        if value is None:
            if schema.get(key, 0) is None:
                continue
            raise ConfigError(f"{key} must be {rule.text}, got null")
        if not rule.holds(value):
            raise ConfigError(f"{key} must be {rule.text}, got {value!r}")
    for low, high in ORDERED:
        if _number(flat.get(low)) and _number(flat.get(high)) and flat[low] > flat[high]:
            raise ConfigError(f"{low} must not exceed {high}, got {flat[low]!r} > {flat[high]!r}")
    for entry in flat.get("train.resume_allow_changes") or ():
        known = entry in schema or any(k.startswith(entry + ".") for k in schema)
        if not known and not any(entry.startswith(node + ".") for node in OPEN_NODES):
            raise ConfigError(
                f"train.resume_allow_changes names {entry!r}, which is not a config key or section"
                f"{_suggest(entry, sorted(schema))}"
            )
    if flat.get("task", "msfc") == "msfc":  # the crop rule of the ViT's patches; stage 2 checks its own where it is
        check_crop_sizes(cfg)  # built, the IRN ResNet takes any size


# Keys a resumed training run may change freely. None changes what a training step computes from the checkpoint's
# state: where the run writes and reads (out_dir, data.root, the label cache), how fast it runs (device, threads,
# loader workers), how often it logs / validates / checkpoints, where it stops, what the inference tools do (eval,
# crf, pseudo), and the initial weights (replaced by the checkpoint's). Two exceptions are deliberate: run.device
# (moving a run between CPU and GPU changes float rounding) and train.max_iters (extending a finished run is its
# purpose; the poly schedule of the remaining steps then follows the new length, which the resume log line says).
# Everything else (the recipe: losses, views, model, optimiser, batch, seed, data lists) needs
# train.resume_allow_changes.
RESUME_MAY_CHANGE = (
    "run.out_dir",
    "run.device",
    "run.num_threads",
    "data.root",
    "data.cache_dir",
    "data.num_workers",
    "model.pretrained",
    "model.weights",
    "train.max_iters",
    "train.stop_iter",
    "train.log_every",
    "train.eval_every",
    "train.ckpt_every",
    "train.keep_ckpts",
    "train.num_vis",
    "train.resume",
    "train.resume_allow_changes",
    "train.compile",  # the same computation, compiled or not (tests/test_compile.py)
    "run.num_shards",  # the inference tools' machine shards
    "run.shard_index",
    "cam.file_dtype",  # how make_cam stores its files
    "cam.write_threads",
    "eval",
    "crf",
    "pseudo",
    "rw",  # the random walk of the pseudo labels (an inference tool's)
)
# Marks a key that only one of two compared configs has (a checkpoint from before the key existed, say).
ABSENT = "(absent)"


def _all_leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Like :func:`_leaf_items` but open nodes are flattened too (their sub-keys are compared one by one)."""
    if isinstance(node, Mapping):  # an empty mapping has no leaves: {} and a missing section compare equal
        for key, value in node.items():
            yield from _all_leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def covers(entry: str, key: str) -> bool:
    """Whether an allow-list entry (a key or a section) covers the dotted ``key``."""
    return key == entry or key.startswith(entry + ".")


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every leaf whose value differs between two resolved configs: ``{key: (saved value, current value)}``.

    A key present in only one of them maps to :data:`ABSENT` on the other side. A key the saved config lacks whose
    current value is its ``configs/base.yaml`` default is no change: keys are added to the schema with the default
    that reproduces the behaviour from before they existed (e.g. ``model.norm_stats: imagenet``).
    """
    old, new = dict(_all_leaves(saved)), dict(_all_leaves(current))
    defaults = _schema()
    changes = {}
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, ABSENT), new.get(key, ABSENT)
        if before is ABSENT and key in defaults and after == defaults[key]:
            continue
        if before != after:
            changes[key] = (before, after)
    return changes


def format_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
    """``key: old -> new; ...`` for messages and log lines."""

    def show(value: Any) -> str:
        return value if value == ABSENT else repr(value)

    return "; ".join(f"{key}: {show(old)} -> {show(new)}" for key, (old, new) in changes.items())


def _flow_slip(node: Any) -> str | None:
    """The first ``key:value`` written without a space in a flow mapping, at any depth, or None.

    YAML reads ``{depth:4}`` as the key ``'depth:4'`` with a null value (a plain scalar may contain ``:``), so the
    intended ``depth`` would silently keep its default. Such a key is never meant: it is reported instead.
    """
    if isinstance(node, Mapping):
        for key, value in node.items():
            if value is None and isinstance(key, str) and ":" in key:
                return key
            found = _flow_slip(value)
            if found is not None:
                return found
    elif isinstance(node, (list, tuple)):
        return next((found for found in map(_flow_slip, node) if found is not None), None)
    return None


def _check_flow_slips(data: Any, source: str) -> None:
    """Reject the ``{key:value}`` slip of :func:`_flow_slip` in ``data``, naming ``source`` and the fix."""
    key = _flow_slip(data)
    if key is not None:
        name, value = key.split(":", 1)
        raise ConfigError(
            f"{source} has the key {key!r} with no value (YAML reads {{{key}}} as one key); "
            f"write {{{name}: {value}}} (a space after the colon)"
        )


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"cannot parse config file {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    _check_flow_slips(data, f"config file {path}")
    return data


def _file_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """The files to merge, furthest ancestor first, following ``_base_`` (relative to each file)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config files include each other in a cycle: {' -> '.join(map(str, (*seen, path)))}")
    data = _read_yaml(path)
    parent = data.pop(BASE_KEY, None)
    chain = [] if parent is None else _file_chain((path.parent / parent), (*seen, path))
    if path == BASE_CONFIG.resolve():
        return []
    return [*chain, (path, data)]


ConfigPaths = str | Path | Sequence[str | Path] | None


def _as_paths(paths: ConfigPaths) -> list[Path]:
    """``None`` | one path | a sequence of paths, as a list."""
    if paths is None:
        return []
    if isinstance(paths, (str, Path)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def config_files(paths: ConfigPaths) -> list[tuple[Path, dict[str, Any]]]:
    """The files merged over base.yaml for the experiment files ``paths``, in merge order (later wins).

    Each path contributes its ``_base_`` chain (furthest ancestor first) and then itself. A file that the combined
    chain reaches twice (``--config a.yaml --config b.yaml`` where b's ``_base_`` is a) is merged once, at its first
    position: merging it again would silently undo whatever the files between the two positions set. So
    ``train_run_COCO.sh --config configs/toco_coco.yaml`` (whose ``_base_`` is coco.yaml) merges coco.yaml <-
    toco_coco.yaml, and a repeated ``--config`` of a file already merged changes nothing.
    """
    merged: dict[Path, dict[str, Any]] = {}
    for path in _as_paths(paths):
        for file, data in _file_chain(path):
            merged.setdefault(file, data)
    return list(merged.items())


def _parse_value(item: str, raw: str) -> Any:
    """The YAML value of the override ``item`` (whose text after ``=`` is ``raw``)."""
    if raw == "":
        return ""
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError) as err:  # an unclosed [ or {, or a list split by the shell at a space
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"command-line override {item!r}: the value is not valid YAML ({reason}); check its brackets, and "
            f"quote an override with spaces whole in the shell, e.g. 'cam.scales=[1.0, 0.5]'"
        ) from err
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; on a command line it means a number
    _check_flow_slips(value, f"command-line override {item!r}")
    return value


def _parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"command-line override {item!r} must look like key=value (e.g. train.max_iters=100)")
        key, raw = item.split("=", 1)
        value = _parse_value(item, raw)
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command-line override {item!r} conflicts with another override of '{part}'")
        node[parts[-1]] = value
    return nested


def load_config(paths: ConfigPaths = None, overrides: Sequence[str] = (), require: bool = True) -> DictConfig:
    """Build the read-only config: base.yaml <- each of ``paths`` (with its ``_base_`` chain) <- ``overrides``.

    Args:
        paths: experiment YAML files (or a run's saved ``config.yaml``), layered in order, later wins; one path or
            None (= base.yaml alone) also do. A file reached twice is merged once, at its first position
            (:func:`config_files`).
        overrides: ``key=value`` strings; values are parsed as YAML (``[1, 2]``, ``null``, ``1e-4``,
            ``{depth: 4}``).
        require: raise if a ``???`` key is still unset.

    Raises:
        ConfigError: an unknown key (with the nearest valid one), a wrongly typed value, a missing file, an unset
            required key, a ``{key:value}`` written without its space, or a value that breaks a rule of
            :data:`RULES` / the crop rule (naming key and rule).
    """
    schema = _schema()
    cfg = OmegaConf.create(_read_yaml(BASE_CONFIG))
    layers = [(str(path), data) for path, data in config_files(paths)]
    layers.append(("the command line", _parse_overrides(overrides)))
    for source, data in layers:
        data = _retire_keys(data, source)
        _validate(data, schema, source)
        cfg = OmegaConf.merge(cfg, data)
    if require:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            hint = " ".join(f"{key}=..." for key in missing)
            raise ConfigError(f"required config key(s) not set: {', '.join(missing)} (add {hint} to the command)")
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # an interpolation that names a missing key, say
        raise ConfigError(f"cannot resolve the config: {err}") from err
    check_values(resolved)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, run_dir: str | Path) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` (atomically) and return the path."""
    target = Path(run_dir) / "config.yaml"
    atomic_write_text(target, to_yaml(cfg))
    return target


def load_run_config(run_dir: str | Path, overrides: Sequence[str] = (), extra: Sequence[str | Path] = ()) -> DictConfig:
    """Reload a run's saved config, with optional ``extra`` files layered over it and overrides (e.g. another
    data.root on another machine)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder: {path} not found (train first or pass --config)")
    return load_config([path, *extra], overrides)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The shared command line: ``--config FILE`` (repeatable) | ``--run-dir RUN_DIR``, then ``key=value`` overrides.

    ``args.config`` is the list of files in the order given (None without ``--config``); :func:`load_config` layers
    them, later wins. With ``--run-dir`` they are layered over the run's saved config.
    """
    parser.add_argument(
        "--config",
        type=Path,
        action="append",
        help="experiment YAML merged over configs/base.yaml (with its _base_ chain); repeat it to layer files, "
        "later wins: --config a.yaml --config b.yaml = base <- a <- b",
    )
    parser.add_argument(
        "--run-dir",
        dest="run",
        type=Path,
        help="a run folder; its config.yaml is reloaded (a --config file is then layered over it, e.g. "
        "configs/irn/muscle.yaml)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_iters=100")


def config_from_args(args: argparse.Namespace) -> DictConfig:
    """Load the config named by :func:`add_config_arguments`' arguments.

    With ``--run-dir`` and no explicit ``run.out_dir`` override, outputs go into that run folder; ``--config`` files
    given with it are layered over the run's config (e.g. another random-walk setting for its pseudo labels).
    """
    if args.run is not None:
        overrides = list(args.overrides)
        if not any(o.startswith("run.out_dir=") for o in overrides):
            overrides.append(f"run.out_dir={args.run}")
        return load_run_config(args.run, overrides, extra=args.config or ())
    return load_config(args.config, args.overrides)
