"""utils/config.py: layered ``--config`` files (never a silent replacement) and strict ``key=value`` overrides."""

import argparse
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from utils.config import ConfigError, add_config_arguments, config_files, config_from_args, load_config, save_config

REQUIRED = ["data.root=/data/voc", "run.out_dir=/tmp/run"]
CONFIGS = Path("configs")


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return parser.parse_args(argv)


def test_later_file_wins_and_earlier_keys_survive(tmp_path):
    a = _write(tmp_path, "a.yaml", "train: {max_iters: 11, lr: 1.0e-3}\n")
    b = _write(tmp_path, "b.yaml", "train: {max_iters: 22}\ncam: {high_thre: 0.6}\n")
    cfg = load_config([a, b], REQUIRED)
    assert (cfg.train.max_iters, cfg.train.lr, cfg.cam.high_thre) == (22, 1e-3, 0.6)
    assert load_config([b, a], REQUIRED).train.max_iters == 11  # the order given is the order merged
    assert load_config([a, b], [*REQUIRED, "train.max_iters=33"]).train.max_iters == 33  # overrides come last


def test_each_file_brings_its_own_base_chain(tmp_path):
    _write(tmp_path, "parent.yaml", "train: {lr: 2.0e-3, warmup_iters: 7}\n")
    a = _write(tmp_path, "a.yaml", "train: {max_iters: 11, lr: 1.0e-3}\n")
    child = _write(tmp_path, "child.yaml", "_base_: parent.yaml\ntrain: {max_iters: 22}\n")
    cfg = load_config([a, child], REQUIRED)
    # a <- parent <- child: the parent of the later file overrides the earlier file
    assert (cfg.train.max_iters, cfg.train.lr, cfg.train.warmup_iters) == (22, 2e-3, 7)
    assert [p.name for p, _ in config_files([a, child])] == ["a.yaml", "parent.yaml", "child.yaml"]


def test_a_file_reached_twice_is_merged_once_at_its_first_position(tmp_path):
    a = _write(tmp_path, "a.yaml", "train: {max_iters: 11, lr: 1.0e-3}\n")
    mid = _write(tmp_path, "mid.yaml", "train: {max_iters: 33}\n")
    b = _write(tmp_path, "b.yaml", "_base_: a.yaml\ntrain: {warmup_iters: 5}\n")
    assert [p.name for p, _ in config_files([a, mid, b])] == ["a.yaml", "mid.yaml", "b.yaml"]
    cfg = load_config([a, mid, b], REQUIRED)
    assert (cfg.train.max_iters, cfg.train.lr, cfg.train.warmup_iters) == (33, 1e-3, 5)  # a did not undo mid
    assert config_files([a, a]) == config_files([a])  # the same file twice: merged once


def test_single_path_and_none_still_work():
    assert _plain(load_config("configs/coco.yaml", REQUIRED)) == _plain(load_config(["configs/coco.yaml"], REQUIRED))
    assert _plain(load_config(None, REQUIRED)) == _plain(load_config([], REQUIRED))
    assert config_files(None) == [] and config_files(CONFIGS / "base.yaml") == []


def test_repeated_config_flag_layers_instead_of_replacing(tmp_path):
    user = _write(tmp_path, "user.yaml", "train: {max_iters: 5}\n")
    args = _parse(["--config", "configs/coco.yaml", "--config", str(user), *REQUIRED])
    assert args.config == [Path("configs/coco.yaml"), user]
    cfg = config_from_args(args)
    assert (cfg.data.name, cfg.data.num_classes, cfg.cam.high_thre) == ("coco", 81, 0.65)  # coco.yaml survives
    assert cfg.train.max_iters == 5
    assert _parse(REQUIRED).config is None


def test_config_files_layer_over_a_run_dir(tmp_path):
    run = tmp_path / "run"
    save_config(load_config("configs/coco.yaml", ["data.root=/d", f"run.out_dir={run}", "rw.beta=3"]), run)
    muscle = CONFIGS / "irn" / "muscle.yaml"
    cfg = config_from_args(_parse(["--run-dir", str(run), "--config", str(muscle), "rw.exp_times=5"]))
    assert cfg.data.name == "coco" and str(cfg.run.out_dir) == str(run)  # the run's config survives
    assert (cfg.rw.beta, cfg.rw.bkg_thre, cfg.rw.exp_times) == (8, 0.35, 5)  # file over the run, overrides last
    assert config_from_args(_parse(["--run-dir", str(run)])).rw.beta == 3


@pytest.mark.parametrize(
    ("dataset", "experiment"),
    [("voc", "toco_voc"), ("coco", "toco_coco"), ("voc", "demo"), ("voc", "smoke"),
     *[("voc", f"ablations/{p.stem}") for p in sorted((CONFIGS / "ablations").glob("*.yaml"))]],
)  # fmt: skip
def test_every_documented_config_pair_means_what_the_file_alone_means(dataset, experiment):
    """The entry points now put their dataset file first (train_run_VOC.sh --config configs/demo.yaml in
    scripts/demo.sh, --config configs/ablations/X.yaml in scripts/ablate.sh, the ToCo commands in the README):
    layered, each gives exactly the config its experiment file gives alone."""
    layered = load_config([CONFIGS / f"{dataset}.yaml", CONFIGS / f"{experiment}.yaml"], REQUIRED)
    assert _plain(layered) == _plain(load_config(CONFIGS / f"{experiment}.yaml", REQUIRED))


def test_toco_over_its_dataset_merges_the_dataset_file_once():
    files = [p.name for p, _ in config_files([CONFIGS / "coco.yaml", CONFIGS / "toco_coco.yaml"])]
    assert files == ["coco.yaml", "toco_coco.yaml"]


DICT_SLIPS = [
    ("model.backbone_kwargs={depth:4}", "depth:4", "{depth: 4}"),
    ("model.backbone_kwargs={depth: 4, num_heads:2}", "num_heads:2", "{num_heads: 2}"),
    ("model.backbone_kwargs={extra: {inner:1.5}}", "inner:1.5", "{inner: 1.5}"),
    ("model.backbone_kwargs={extra: [{inner:1}]}", "inner:1", "{inner: 1}"),
]


@pytest.mark.parametrize(("override", "key", "fix"), DICT_SLIPS, ids=[case[0] for case in DICT_SLIPS])
def test_a_mapping_entry_without_its_space_is_refused_naming_the_override(override, key, fix):
    with pytest.raises(ConfigError) as err:
        load_config("configs/smoke.yaml", [*REQUIRED, override])
    message = str(err.value)
    assert f"command-line override {override!r}" in message
    assert f"'{key}'" in message and f"write {fix} (a space after the colon)" in message


def test_the_same_slip_in_a_file_names_the_file(tmp_path):
    path = _write(tmp_path, "exp.yaml", "_base_: " + str(Path("configs/smoke.yaml").resolve()) + "\n"
                  "model:\n  backbone_kwargs: {depth:4}\n")  # fmt: skip
    with pytest.raises(ConfigError, match=r"exp\.yaml has the key 'depth:4'.*write \{depth: 4\}"):
        load_config(path, REQUIRED)


def test_a_spaced_mapping_override_applies():
    cfg = load_config("configs/smoke.yaml", [*REQUIRED, "model.backbone_kwargs={depth: 3}"])
    assert cfg.model.backbone_kwargs.depth == 3
    assert cfg.model.backbone_kwargs.embed_dim == 32  # merged into smoke.yaml's kwargs, not replacing them


@pytest.mark.parametrize(
    "override", ["cam.scales=[1.0,", "model.backbone_kwargs={depth: 4", "model.backbone_kwargs={depth: 4}}"]
)
def test_broken_flow_values_are_refused_naming_the_override(override):
    with pytest.raises(ConfigError, match=r"command-line override '.*': the value is not valid YAML") as err:
        load_config("configs/smoke.yaml", [*REQUIRED, override])
    assert repr(override) in str(err.value)


@pytest.mark.parametrize("override", ["data.root=C:/data/voc", "eval.results_log=http://host/log"])
def test_strings_with_colons_are_still_plain_strings(override):
    key, value = override.split("=", 1)
    assert OmegaConf.select(load_config("configs/smoke.yaml", [*REQUIRED, override]), key) == value
