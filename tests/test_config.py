"""utils/config.py: schema-checked loading, overrides, inheritance, saving and reloading."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from utils.config import (
    ABSENT,
    RULES,
    ConfigError,
    _schema,
    backbone_patch,
    config_changes,
    format_changes,
    load_config,
    load_run_config,
    rule_for,
    save_config,
)

REQUIRED = ["data.root=/data/voc", "run.out_dir=/tmp/run"]
CONFIGS = sorted(Path("configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p))
def test_every_shipped_config_loads(path):
    cfg = load_config(path, REQUIRED)
    assert cfg.data.num_classes in (21, 81)
    # crops must tile into whole patches, and the SMCM quadrants too (SPEC §3)
    patch = cfg.model.backbone_kwargs.get("patch_size", 16)
    assert cfg.data.crop_size % (2 * patch) == 0
    assert cfg.views.local.size % patch == 0


def test_overrides_are_typed_and_applied():
    cfg = load_config(
        "configs/voc.yaml", [*REQUIRED, "train.max_iters=7", "cam.scales=[1.0, 2.0]", "train.resume=auto"]
    )
    assert cfg.train.max_iters == 7
    assert list(cfg.cam.scales) == [1.0, 2.0]
    assert cfg.train.resume == "auto"
    assert cfg.train.lr == pytest.approx(6e-5)  # untouched default
    assert load_config("configs/voc.yaml", [*REQUIRED, "train.lr=1e-3"]).train.lr == pytest.approx(1e-3)


def test_dataset_file_overrides_only_what_differs():
    voc = load_config("configs/voc.yaml", REQUIRED)
    coco = load_config("configs/coco.yaml", REQUIRED)
    assert (voc.cam.high_thre, coco.cam.high_thre) == (0.70, 0.65)
    assert (voc.cam.bkg_thre, coco.cam.bkg_thre) == (0.50, 0.45)
    assert (voc.loss.ctc_temp, coco.loss.ctc_temp) == (0.5, 1.0)
    assert coco.loss.start_iter.seg == 8000 and coco.loss.start_iter.ptc == 12000
    assert voc.loss.start_iter.seg == 2000 and voc.loss.start_iter.ptc == 0


@pytest.mark.parametrize("dataset", ["voc", "coco"])
def test_toco_baseline_is_msfc_without_smcm_and_mp2m(dataset):
    msfc = OmegaConf.to_container(load_config(f"configs/{dataset}.yaml", REQUIRED))
    toco = OmegaConf.to_container(load_config(f"configs/toco_{dataset}.yaml", REQUIRED))
    assert (toco["loss"]["weight"]["smc"], toco["loss"]["weight"]["mem"]) == (0.0, 0.0)
    assert msfc["loss"]["weight"]["smc"] > 0 and msfc["loss"]["weight"]["mem"] > 0
    toco["loss"]["weight"].update(smc=msfc["loss"]["weight"]["smc"], mem=msfc["loss"]["weight"]["mem"])
    assert toco == msfc  # nothing else differs: same recipe, same protocol


def test_published_defaults_of_the_fidelity_keys():
    """SPEC §1.1, §3, §4.3, §4.4, §4.6, §5.2, §8: the defaults compute what the published code computes."""
    voc = load_config("configs/voc.yaml", REQUIRED)
    assert voc.model.pos_embed_resample == "bicubic" and voc.views.main == "g1" and voc.cam.precision == "fp32"
    assert voc.loss.ctc_normalize is False and voc.loss.smc_reduction == "all_terms"
    assert (voc.loss.reg_mode, voc.loss.reg_sigma_xy, voc.loss.reg_sigma_rgb) == ("dense", 50.0, 15.0)
    assert voc.loss.reg_inner_weight == pytest.approx(1e-7)
    assert (voc.eval.checkpoint, voc.eval.cam_split) == ("last", "train")
    assert (voc.eval.resize, voc.eval.flip_fusion, voc.eval.scale_fusion) == (None, "sum", "max")
    coco = load_config("configs/coco.yaml", REQUIRED)
    assert (coco.eval.resize, coco.eval.resize_mode) == (448, "square")
    assert (coco.eval.flip_fusion, coco.eval.scale_fusion, coco.eval.cam_split) == ("max", "sum", "val")


def test_base_chain_is_followed(tmp_path):
    (tmp_path / "parent.yaml").write_text("train: {max_iters: 11, lr: 1.0e-3}\n")
    (tmp_path / "child.yaml").write_text("_base_: parent.yaml\ntrain: {max_iters: 22}\n")
    cfg = load_config(tmp_path / "child.yaml", REQUIRED)
    assert (cfg.train.max_iters, cfg.train.lr) == (22, 1e-3)


def test_base_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml", REQUIRED)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.max_iter=3", "did you mean 'train.max_iters'"),
        ("trian.max_iters=3", "did you mean 'train.max_iters'"),
        ("loss.weight.ctx=0.1", "did you mean 'loss.weight.ctc'"),
    ],
)
def test_misspelt_key_is_rejected_with_a_suggestion(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config("configs/voc.yaml", [*REQUIRED, override])


def test_misspelt_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("cam:\n  hihg_thre: 0.6\n")
    with pytest.raises(ConfigError, match=r"cam.hihg_thre.*exp.yaml.*did you mean 'cam.high_thre'"):
        load_config(path, REQUIRED)


@pytest.mark.parametrize("override", ["train.max_iters=abc", "train.max_iters=2.5", "cam.scales=3", "run.seed=true"])
def test_wrongly_typed_value_is_rejected(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config("configs/voc.yaml", [*REQUIRED, override])


def test_unset_required_key_is_named():
    with pytest.raises(ConfigError, match="data.root"):
        load_config("configs/voc.yaml", ["run.out_dir=/tmp/run"])


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="key=value"):
        load_config("configs/voc.yaml", [*REQUIRED, "train.max_iters"])
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config("configs/nope.yaml", REQUIRED)


def test_open_node_accepts_free_keys():
    cfg = load_config("configs/demo.yaml", [*REQUIRED, "model.backbone_kwargs.qkv_bias=false"])
    assert cfg.model.backbone_kwargs.qkv_bias is False
    assert cfg.model.backbone_kwargs.embed_dim == 96  # inherited keys survive


def test_config_is_read_only():
    cfg = load_config("configs/voc.yaml", REQUIRED)
    with pytest.raises(Exception, match="read-only"):
        cfg.train.max_iters = 3


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config("configs/coco.yaml", [*REQUIRED, "train.max_iters=123"])
    save_config(cfg, tmp_path)
    again = load_run_config(tmp_path)
    # the saved file is resolved (eval.precision: ${train.precision} is written as its value)
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg, resolve=True)
    moved = load_run_config(tmp_path, ["data.root=/elsewhere"])
    assert moved.data.root == "/elsewhere" and moved.train.max_iters == 123


def test_missing_run_folder_is_explained(tmp_path):
    with pytest.raises(ConfigError, match="not a run folder"):
        load_run_config(tmp_path)


# One case per rule family; each error names the key and states the rule (and the value given).
RULE_CASES = {
    "positive integer": [
        ("train.max_iters=0", "train.max_iters must be a positive integer, got 0"),
        ("train.ckpt_every=0", "train.ckpt_every must be a positive integer, got 0"),
        ("memory.update_every=0", "memory.update_every must be a positive integer, got 0"),
        ("train.accum_steps=0", "train.accum_steps must be a positive integer, got 0"),
        ("train.batch_size=0", "train.batch_size must be a positive integer, got 0"),
        ("train.stop_iter=0", "train.stop_iter must be a positive integer, got 0"),
        ("train.max_iters=null", "train.max_iters must be a positive integer, got null"),
    ],
    "non-negative integer": [
        ("train.eval_every=-1", "train.eval_every must be a non-negative integer, got -1"),
        ("loss.start_iter.seg=-5", "loss.start_iter.seg must be a non-negative integer, got -5"),
        ("data.num_workers=-2", "data.num_workers must be a non-negative integer, got -2"),
    ],
    "number bounds": [
        ("train.lr=-1e-4", "train.lr must be a positive number, got -0.0001"),
        ("train.lr=0", "train.lr must be a positive number, got 0"),
        ("loss.weight.ctc=-0.5", "loss.weight.ctc must be a non-negative number, got -0.5"),
        ("cam.high_thre=1.5", r"cam.high_thre must be a number in \[0, 1\], got 1.5"),
        ("views.g2.flip_p=2", r"views.g2.flip_p must be a number in \[0, 1\], got 2"),
        ("cam.low_thre=0.9", "cam.low_thre must not exceed cam.high_thre, got 0.9 > 0.7"),
    ],
    "list": [
        ("cam.scales=[]", "cam.scales must be a non-empty list of positive numbers, got \\[\\]"),
        ("data.scale_range=[2.0, 0.5]", r"data.scale_range must be a \[low, high\] pair with 0 < low <= high"),
        ("train.betas=[0.9, 1.0]", r"train.betas must be a \[beta1, beta2\] pair of numbers in \[0, 1\)"),
        ("par.dilations=[1, 0]", "par.dilations must be a non-empty list of positive integers"),
    ],
    "choices": [
        ("views.main=g2", r"views.main must be one of \('g1', 'clean'\), got 'g2'"),
        ("cam.precision=fp16", r"cam.precision must be one of \('fp32', 'train'\)"),
        ("loss.reg_mode=sparse", r"loss.reg_mode must be one of \('dense', 'window'\)"),
        ("loss.smc_reduction=sum", r"loss.smc_reduction must be one of \('all_terms', 'group_sum', 'to_main'\)"),
        ("eval.resize_mode=sqaure", r"eval\.resize_mode must be one of \('long_side', 'square'\)"),
        ("model.pos_embed_resample=nearest", r"model.pos_embed_resample must be one of \('bicubic', 'timm'\)"),
        ("train.precision=fp8", r"train.precision must be one of \('fp32', 'bf16', 'fp16'\)"),
        ("eval.flip_fusion=avg", r"eval.flip_fusion must be one of \('sum', 'mean', 'max'\)"),
        ("eval.scale_fusion=min", r"eval.scale_fusion must be one of \('sum', 'mean', 'max'\)"),
        ("data.name=city-scapes", r"data.name must be a dataset layout name"),
    ],
}


@pytest.mark.parametrize(
    ("override", "expected"),
    [case for cases in RULE_CASES.values() for case in cases],
    ids=[f"{family}: {override}" for family, cases in RULE_CASES.items() for override, _ in cases],
)
def test_nonsense_values_are_rejected_naming_the_key_and_the_rule(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config("configs/voc.yaml", [*REQUIRED, override])


@pytest.mark.parametrize(
    ("config", "overrides", "expected"),
    [
        # patch 8 from model.backbone_kwargs.patch_size (smoke.yaml)
        ("configs/smoke.yaml", ["data.crop_size=72"],
         r"data.crop_size must be a multiple of 2·patch = 16 .*patch 8 from model.backbone_kwargs.patch_size.*got 72"),
        ("configs/smoke.yaml", ["views.local.size=12"], "views.local.size must be a multiple of the patch size 8"),
        # patch 16 parsed from the timm name: 464 is a multiple of 16 but not of 32
        ("configs/voc.yaml", ["data.crop_size=464"],
         r"multiple of 2·patch = 32 .*model.backbone 'vit_base_patch16_224.orig_in21k_ft_in1k'"),
        ("configs/voc.yaml", ["views.local.size=88"], "views.local.size must be a multiple of the patch size 16"),
        # patch_size given: it wins over the name (464 = 29 x 16)
        ("configs/voc.yaml", ["data.crop_size=464", "model.backbone_kwargs.patch_size=8"], None),
        # no patch in the name and none given: nothing to check against
        ("configs/voc.yaml", ["data.crop_size=72", "model.backbone=resnet50"], None),
        # SMCM off: no quadrants, so the crop needs whole patches only (72 = 9 x 8) ...
        ("configs/smoke.yaml", ["data.crop_size=72", "loss.weight.smc=0"], None),
        # ... but still whole patches: the main view goes through the ViT
        ("configs/smoke.yaml", ["data.crop_size=68", "loss.weight.smc=0"],
         r"^data.crop_size must be a multiple of the patch size 8 \(the main view .*\), got 68; e.g. 64 or 72$"),
        # CTC off: no local crops, so their size is not checked
        ("configs/smoke.yaml", ["views.local.size=12", "loss.weight.ctc=0"], None),
        # DINOv2: patch 14 from the name; 448 = 16 x 28 passes, the default local size 96 does not
        ("configs/voc.yaml", ["model.backbone=vit_base_patch14_dinov2.lvd142m"],
         r"^views.local.size must be a multiple of the patch size 14 \(CTC's local crops, on while loss.weight.ctc > 0"
         r".*patch 14 from model.backbone 'vit_base_patch14_dinov2.lvd142m'\), got 96; e.g. 84 or 98$"),
        ("configs/voc.yaml", ["model.backbone=vit_base_patch14_dinov2.lvd142m", "views.local.size=98"], None),
        ("configs/voc.yaml", ["model.backbone=vit_small_patch14_reg4_dinov2.lvd142m", "views.local.size=98",
                              "data.crop_size=462"],
         r"^data.crop_size must be a multiple of 2·patch = 28 \(SMCM, on while loss.weight.smc > 0, cuts the crop into"
         r" 4 quadrants of data.crop_size / 2 px.*patch 14 from model.backbone.*\), got 462; e.g. 448 or 476$"),
        # DINOv2 patch given as timm's square pair
        ("configs/smoke.yaml", ["model.backbone_kwargs.patch_size=[14, 14]", "data.crop_size=70"],
         r"data.crop_size must be a multiple of 2·patch = 28 .*patch 14 from model.backbone_kwargs.patch_size"),
    ],
    ids=["kwargs_crop", "kwargs_local", "name_crop", "name_local", "kwargs_win", "unknown_patch", "smc_off_crop",
         "smc_off_main_view", "ctc_off_local", "dinov2_local", "dinov2_ok", "dinov2_crop", "kwargs_pair"],
)  # fmt: skip
def test_crop_rule(config, overrides, expected):
    if expected is None:
        load_config(config, [*REQUIRED, *overrides])
    else:
        with pytest.raises(ConfigError, match=expected):
            load_config(config, [*REQUIRED, *overrides])


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"backbone": "vit_base_patch14_dinov2.lvd142m"}, 14),
        ({"backbone": "vit_small_patch14_reg4_dinov2.lvd142m", "backbone_kwargs": {}}, 14),
        ({"backbone": "vit_base_patch16_224", "backbone_kwargs": {"patch_size": 14}}, 14),
        ({"backbone": "vit_base_patch16_224", "backbone_kwargs": {"patch_size": [14, 14]}}, 14),
        ({"backbone": "vit_base_patch16_224", "backbone_kwargs": {"patch_size": [14, 16]}}, None),
        ({"backbone": "resnet50"}, None),
    ],
)
def test_backbone_patch_covers_dinov2(model, expected):
    found = backbone_patch(model)
    assert (found[0] if found else None) == expected


def test_the_smcm_rescaled_view_needs_no_load_check():
    """The rescaled view's side is rounded to whole patches by the code itself (core/views.py smcm_views), so a scale
    with a fractional side (64 x 0.7 = 44.8 px) is valid; if the rounding ever goes, check_crop_sizes needs a rule."""
    import torch

    from core.views import smcm_views

    cfg = load_config("configs/smoke.yaml", [*REQUIRED, "views.smcm.scale=0.7"])
    patch = cfg.model.backbone_kwargs.patch_size
    crop = cfg.data.crop_size
    views = smcm_views(torch.zeros(1, 3, crop, crop), float(cfg.views.smcm.scale), patch)
    assert views["scaled"].shape[-2:] == (48, 48) and 48 % patch == 0
    assert views["quads"].shape[-1] == crop // 2


def test_every_rule_applies_to_a_schema_key():
    schema = _schema()
    for pattern in RULES:
        assert any(rule_for(key) is RULES[pattern] for key in schema), pattern


def test_choices_agree_with_the_modules_that_read_them():
    from core.camfile import CAM_KEYS
    from core.pseudo_labels import SOFT_DTYPES
    from engine.inference import FUSIONS, RESIZE_MODES
    from engine.step import CAM_PRECISIONS, MAIN_VIEWS, PRECISIONS
    from losses.energy import ENERGY_MODES
    from losses.multiview import SMC_REDUCTIONS
    from models.backbone import NORM_STATS, POS_EMBED_RESAMPLE

    expected = {"views.main": MAIN_VIEWS, "cam.precision": CAM_PRECISIONS, "loss.reg_mode": ENERGY_MODES,
                "loss.smc_reduction": SMC_REDUCTIONS, "model.pos_embed_resample": POS_EMBED_RESAMPLE,
                "model.norm_stats": NORM_STATS, "eval.precision": PRECISIONS,
                "eval.resize_mode": RESIZE_MODES, "eval.flip_fusion": FUSIONS, "eval.scale_fusion": FUSIONS,
                "pseudo.cam_key": CAM_KEYS, "pseudo.soft_dtype": SOFT_DTYPES}  # fmt: skip
    for key, choices in expected.items():
        assert rule_for(key).text == f"one of {tuple(choices)}", key


def test_resume_allow_list_names_real_keys_or_sections():
    with pytest.raises(ConfigError, match=r"train.resume_allow_changes names 'train.lrr'.*did you mean 'train.lr'"):
        load_config("configs/voc.yaml", [*REQUIRED, "train.resume_allow_changes=[train.lrr]"])
    cfg = load_config("configs/voc.yaml", [*REQUIRED, "train.resume_allow_changes=[loss.weight, train.lr, "
                                                      "model.backbone_kwargs.drop_path_rate]"])  # fmt: skip
    assert list(cfg.train.resume_allow_changes) == ["loss.weight", "train.lr", "model.backbone_kwargs.drop_path_rate"]


def test_a_key_added_with_its_old_behaviour_as_default_is_no_change():
    """A checkpoint saved before model.norm_stats existed resumes: the key's default is what it did then."""
    saved = {"model": {"pos_embed_resample": "bicubic"}}
    assert config_changes(saved, {"model": {"pos_embed_resample": "bicubic", "norm_stats": "imagenet"}}) == {}
    assert config_changes(saved, {"model": {"pos_embed_resample": "bicubic", "norm_stats": "pretrained"}}) == {
        "model.norm_stats": (ABSENT, "pretrained")}  # fmt: skip


def test_config_changes_lists_every_differing_leaf():
    saved = {"train": {"lr": 1e-4, "batch_size": 2}, "model": {"backbone_kwargs": {}}, "old": 1}
    current = {"train": {"lr": 1e-3, "batch_size": 2}, "model": {"backbone_kwargs": {"drop_path_rate": 0.1}}}
    changes = config_changes(saved, current)
    assert changes == {"model.backbone_kwargs.drop_path_rate": (ABSENT, 0.1), "old": (1, ABSENT),
                       "train.lr": (1e-4, 1e-3)}  # fmt: skip
    assert format_changes(changes) == ("model.backbone_kwargs.drop_path_rate: (absent) -> 0.1; old: 1 -> (absent); "
                                       "train.lr: 0.0001 -> 0.001")  # fmt: skip


def test_a_saved_run_config_with_the_retired_pseudo_booleans_reads_as_pseudo_refine(tmp_path):
    """A run saved before pseudo.refine holds pseudo.par / pseudo.crf: it loads, meaning the list they set."""
    cfg = load_config("configs/voc.yaml", REQUIRED)
    saved = OmegaConf.to_container(cfg, resolve=True)
    del saved["pseudo"]["refine"], saved["pseudo"]["folder"]  # keys the old file did not have
    saved["pseudo"].update(par=True, crf=False)
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(saved)))
    again = load_run_config(tmp_path)
    assert list(again.pseudo.refine) == ["par"] and "par" not in again.pseudo and "crf" not in again.pseudo
    assert again.pseudo.folder is None
    both = load_run_config(tmp_path, ["pseudo.refine=[par, crf]"])  # the command line still sets the list
    assert list(both.pseudo.refine) == ["par", "crf"]
    saved["pseudo"].update(par=False, crf=True)
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(saved)))
    assert list(load_run_config(tmp_path).pseudo.refine) == ["crf"]
