"""utils/config.py: schema-checked loading, overrides, inheritance, saving and reloading."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from utils.config import ConfigError, load_config, load_run_config, save_config

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
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
    moved = load_run_config(tmp_path, ["data.root=/elsewhere"])
    assert moved.data.root == "/elsewhere" and moved.train.max_iters == 123


def test_missing_run_folder_is_explained(tmp_path):
    with pytest.raises(ConfigError, match="not a run folder"):
        load_run_config(tmp_path)
