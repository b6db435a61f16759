"""tools/infer_seg.py on a 2-iteration smoke run, and the infer_run_VOC.sh pipeline end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import build_dataset
from engine.inference import predict_seg_logits
from models import load_trained_model
from tests.processes import HAS_PROC, still_running_after
from tools import infer_seg, train
from utils.config import load_run_config
from utils.crf import crf_params, dense_crf
from utils.io import load_npz, read_label_png

REPO = Path(__file__).resolve().parent.parent
SCALES = "eval.scales=[1.0,0.5]"  # two scales so the fusion path runs; small ones keep the test fast


@pytest.fixture(scope="module")
def trained(voc_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("infer_seg") / "trained"
    args = ["--config", "configs/smoke.yaml", f"data.root={voc_root}", f"run.out_dir={out}", "train.max_iters=2",
            "train.ckpt_every=2"]  # fmt: skip
    assert train.main(args) == 0
    return out


def _copy_run(trained: Path, dest: Path) -> Path:
    """A fresh run folder with the trained config and checkpoint but no inference outputs."""
    (dest / "checkpoints").mkdir(parents=True)
    shutil.copy(trained / "config.yaml", dest / "config.yaml")
    shutil.copy(trained / "checkpoints" / "last.pth", dest / "checkpoints" / "last.pth")
    return dest


def _config(run: Path, *overrides: str):
    return load_run_config(run, [f"run.out_dir={run}", "run.device=cpu", SCALES, *overrides])


def _infer(run: Path, *overrides: str) -> infer_seg.Stats:
    return infer_seg.run_inference(_config(run, *overrides))


def _labels(folder: Path) -> dict[str, np.ndarray]:
    return {path.stem: read_label_png(path) for path in sorted(folder.glob("*.png"))}


def test_one_png_per_image_equal_to_the_network_argmax_and_a_second_run_does_nothing(trained, tmp_path, capsys):
    run = _copy_run(trained, tmp_path / "run")
    stats = _infer(run, "eval.num_overlays=2")
    cfg = _config(run)
    dataset = build_dataset(cfg, "val", "eval")
    predictions = _labels(run / "seg" / "val")
    assert sorted(predictions) == sorted(dataset.ids) and stats.seg_images == stats.net_images == len(dataset)
    for index, name in enumerate(dataset.ids):
        height, width = dataset[index]["img"].shape[1:]
        assert predictions[name].shape == (height, width)
        assert predictions[name].max() <= 20  # class ids 0..20, never the ignore value
    item = dataset[0]
    model = load_trained_model(cfg, torch.device("cpu"))
    logits = predict_seg_logits(model, item["img"][None], (1.0, 0.5), True, "sum", "max", None)
    assert np.array_equal(predictions[item["name"]], logits[0].argmax(0).numpy().astype(np.uint8))
    # overlays: image | prediction | ground truth (4-pixel gaps) for rank 0's first 2 images
    overlays = sorted((run / "seg" / "val_overlays").glob("*.png"))
    assert [p.stem for p in overlays] == dataset.ids[:2]
    with Image.open(overlays[0]) as image:  # three panels, two gaps (the height may include a caption band)
        assert image.size[0] == 3 * dataset[0]["img"].shape[2] + 8 and image.size[1] >= dataset[0]["img"].shape[1]

    mtimes = {p: p.stat().st_mtime_ns for p in (run / "seg" / "val").glob("*.png")}
    capsys.readouterr()
    assert infer_seg.main(["--run-dir", str(run), "run.device=cpu", SCALES, "eval.num_overlays=2"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (run / "seg" / "val").glob("*.png")} == mtimes
    assert _infer(run).net_images == 0


def test_saved_logits_are_float16_and_agree_with_the_pngs(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "run")
    _infer(run)
    stats = _infer(run, "eval.save_logits=true")  # PNGs exist: only the missing logits make work
    predictions = _labels(run / "seg" / "val")
    assert stats.net_images == len(predictions)
    for name, label in predictions.items():
        logits = load_npz(run / "seg" / "val" / "logits" / f"{name}.npz")["logits"]
        assert logits.dtype == np.float16 and logits.shape == (21, *label.shape)
        # float16 rounding can only flip near-ties
        assert (logits.astype(np.float32).argmax(0) == label).mean() > 0.99


def test_crf_runs_only_the_crf_work_on_resume_and_the_pool_equals_the_serial_path(trained, tmp_path):
    serial = _copy_run(trained, tmp_path / "serial")
    pooled = _copy_run(trained, tmp_path / "pooled")
    _infer(serial)
    resumed = _infer(serial, "eval.crf=true", "eval.crf_workers=0")
    count = len(_labels(serial / "seg" / "val"))
    # seg existed: logits are recomputed for the CRF but no seg PNG is rewritten
    assert (resumed.seg_images, resumed.net_images, resumed.crf_images) == (0, count, count)
    fresh = _infer(pooled, "eval.crf=true", "eval.crf_workers=2", "eval.num_overlays=3")
    assert (fresh.seg_images, fresh.crf_images) == (count, count)
    a, b = _labels(serial / "seg_crf" / "val"), _labels(pooled / "seg_crf" / "val")
    assert sorted(a) == sorted(b) and len(a) == count
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    assert len(list((pooled / "seg_crf" / "val_overlays").glob("*.png"))) == 3
    # known answer for one image: argmax of DenseCRF(softmax(logits)) with the crf.* defaults of base.yaml
    cfg = _config(serial)
    item = build_dataset(cfg, "val", "eval")[0]
    logits = predict_seg_logits(load_trained_model(cfg, torch.device("cpu")), item["img"][None], (1.0, 0.5))[0]
    rgb = np.ascontiguousarray(item["img"].permute(1, 2, 0).numpy())
    refined = dense_crf(rgb, torch.softmax(logits, 0).numpy(), iters=10, gauss_sxy=1, gauss_compat=1,
                        bilateral_sxy=121, bilateral_srgb=5, bilateral_compat=4)  # fmt: skip
    assert np.array_equal(a[item["name"]], refined.argmax(0).astype(np.uint8))


def _files(run: Path) -> set[Path]:
    return {path.relative_to(run) for path in run.rglob("*") if path.is_file()}


def test_crf_runs_on_the_fly_and_writes_nothing_but_the_pngs(trained, tmp_path, monkeypatch):
    """The CRF pool is fed while the network runs (each result is written a bounded number of images after its
    network pass), and neither logits nor probabilities are ever written to disk."""
    run = _copy_run(trained, tmp_path / "run")
    before = _files(run)
    events: list[str] = []
    real_predict, real_save = infer_seg.predict_seg_logits, infer_seg.save_label_png

    def predict(*args, **kwargs):
        events.append("net")
        return real_predict(*args, **kwargs)

    def save(path, label, *args, **kwargs):
        events.append(Path(path).parent.parent.name)  # "seg" or "seg_crf"
        return real_save(path, label, *args, **kwargs)

    monkeypatch.setattr(infer_seg, "predict_seg_logits", predict)
    monkeypatch.setattr(infer_seg, "save_label_png", save)
    workers = 1  # CRFPool's default bound: 2 * workers jobs submitted and not yet returned
    stats = _infer(run, "eval.crf=true", f"eval.crf_workers={workers}", "eval.num_overlays=0")
    count = len(build_dataset(_config(run), "val", "eval"))
    assert stats.net_images == stats.crf_images == count and events.count("net") == count
    crf_writes = [i for i, event in enumerate(events) if event == "seg_crf"]
    nets_before = [events[:i].count("net") for i in crf_writes]
    assert nets_before[0] < count  # the first CRF result is written before the network has seen every image
    assert all(n <= k + 1 + 2 * workers for k, n in enumerate(nets_before)), nets_before  # bounded look-ahead
    new = {path for path in _files(run) - before if path.parts[0] != "cache"}  # cache/: the split's image labels
    assert {path.suffix for path in new} == {".png", ".json", ".log"}, sorted(new)
    assert {path for path in new if path.suffix != ".png"} == {
        Path("seg/val/settings.json"), Path("seg_crf/val/settings.json"), Path("infer_seg.log")}  # fmt: skip
    assert stats.seg_bytes == sum(p.stat().st_size for p in (run / "seg" / "val").glob("*.png"))
    assert stats.crf_bytes == sum(p.stat().st_size for p in (run / "seg_crf" / "val").glob("*.png"))
    assert stats.crf_classes == 21 * count  # eval.crf_min_prob = 0: every class (the published protocol)
    assert "KiB per seg_crf PNG" in (run / "infer_seg.log").read_text()


def test_crf_input_keeps_background_and_the_classes_reaching_the_threshold():
    logits = torch.full((5, 2, 3), -10.0)
    logits[0] = 0.0
    logits[3, 0, 0] = 10.0  # class 3 wins one pixel
    logits[4, 1, 2] = -1.0  # class 4 reaches softmax ~0.27 at one pixel, never the argmax
    prob, classes = infer_seg.crf_input(logits, 0.2)
    assert classes.tolist() == [0, 3, 4] and classes.dtype == np.uint8
    full = torch.softmax(logits, 0).numpy()
    np.testing.assert_array_equal(prob, full[[0, 3, 4]])  # the kept probabilities as they are (DenseCRF's unaries)
    assert infer_seg.crf_input(logits, 0.5)[1].tolist() == [0, 3]
    prob, classes = infer_seg.crf_input(logits, 0.0)  # 0: every class, no id map
    assert classes is None and prob.shape == (5, 2, 3)
    assert infer_seg.crf_input(logits, 1e-9)[1] is None  # every class reaches it: the same as 0


def test_crf_over_the_present_classes_maps_labels_back_and_is_recorded(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "run")
    cfg = _config(run)
    item = build_dataset(cfg, "val", "eval")[0]
    logits = predict_seg_logits(load_trained_model(cfg, torch.device("cpu")), item["img"][None], (1.0, 0.5))[0]
    peaks = np.sort(torch.softmax(logits, 0).flatten(1).amax(1).numpy())
    min_prob = float(peaks[len(peaks) // 2])  # about half the classes of this image drop out
    stats = _infer(run, "data.max_images=1", "eval.crf=true", "eval.crf_workers=0", f"eval.crf_min_prob={min_prob}")
    prob, classes = infer_seg.crf_input(logits, min_prob)
    assert classes is not None and 1 < len(classes) < 21 and stats.crf_classes == len(classes)
    rgb = np.ascontiguousarray(item["img"].permute(1, 2, 0).numpy())
    refined = dense_crf(rgb, prob, **crf_params(cfg))
    expected = classes[refined.argmax(0)]
    assert np.array_equal(read_label_png(run / "seg_crf" / "val" / f"{item['name']}.png"), expected)
    settings = json.loads((run / "seg_crf" / "val" / "settings.json").read_text())
    assert settings["crf_min_prob"] == min_prob
    assert "crf_min_prob" not in json.loads((run / "seg" / "val" / "settings.json").read_text())
    with pytest.raises(ValueError, match=r"seg_crf/val holds outputs made with other settings \(crf_min_prob"):
        _infer(run, "data.max_images=1", "eval.crf=true", "eval.crf_workers=0")  # the published protocol


def test_two_shards_cover_the_split_disjointly_and_equal_one_machine(trained, tmp_path):
    """run.num_shards=2 x 1 rank: machine i writes ids[i::2] (seg and seg_crf), into the same folders as one machine;
    the overlays come from shard 0 only."""
    single = _copy_run(trained, tmp_path / "single")
    _infer(single, "eval.crf=true", "eval.crf_workers=0", "eval.num_overlays=2")
    ids = build_dataset(_config(single), "val", "eval").ids
    shared = _copy_run(trained, tmp_path / "shared")
    common = ("eval.crf=true", "eval.crf_workers=0", "eval.num_overlays=2", "run.num_shards=2")
    first = _infer(shared, *common, "run.shard_index=0")
    for kind in ("seg", "seg_crf"):
        assert sorted(_labels(shared / kind / "val")) == sorted(ids[0::2]), kind
    second = _infer(shared, *common, "run.shard_index=1")
    assert (first.net_images, second.net_images) == (len(ids[0::2]), len(ids[1::2]))  # disjoint: nothing twice
    for kind in ("seg", "seg_crf"):
        a, b = _labels(single / kind / "val"), _labels(shared / kind / "val")
        assert sorted(a) == sorted(b) == sorted(ids)  # complete
        assert all(np.array_equal(a[name], b[name]) for name in a), kind
    assert sorted(p.stem for p in (shared / "seg" / "val_overlays").glob("*.png")) == sorted(ids[0::2][:2])
    assert f"split val shard 1/2 ({len(ids[1::2])} of {len(ids)} ids)" in (shared / "infer_seg.log").read_text()
    assert _infer(shared, "eval.crf=true", "eval.crf_workers=0").net_images == 0  # the union resumes as complete
    # another shard with other settings is refused in the shared folder, even where its shard has no output yet
    with pytest.raises(ValueError, match=r"claimed with other settings \(scales.*every shard"):
        _infer(shared, "eval.scales=[1.0]", "run.num_shards=2", "run.shard_index=1", "data.max_images=1")


def test_resuming_with_other_settings_is_refused(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "run")
    _infer(run, "data.max_images=1")
    with pytest.raises(ValueError, match=r"seg/val holds outputs made with other settings \(scales"):
        _infer(run, "data.max_images=1", "eval.scales=[1.0]")


def test_a_run_that_failed_before_its_first_output_does_not_block_the_corrected_rerun(trained, tmp_path, monkeypatch,
                                                                                       capsys):  # fmt: skip
    """Issue #10 item 6: settings.json is recorded before the model loads; a failure there must not poison the
    folders for the corrected rerun, while folders holding outputs are still refused."""
    run = _copy_run(trained, tmp_path / "run")

    def broken_loader(cfg, device):
        raise RuntimeError("model loader broke")

    with monkeypatch.context() as patch:
        patch.setattr(infer_seg, "load_trained_model", broken_loader)
        with pytest.raises(RuntimeError, match="model loader broke"):
            _infer(run, "data.max_images=1", "eval.crf=true", "eval.crf_workers=0")
    for kind in ("seg", "seg_crf"):  # claimed, but empty
        assert (run / kind / "val" / "settings.json").is_file() and not list((run / kind / "val").glob("*.png"))
    # the corrected rerun uses other settings (one scale): both empty folders are re-claimed
    stats = _infer(run, "data.max_images=1", "eval.crf=true", "eval.crf_workers=0", "eval.scales=[1.0]")
    assert (stats.seg_images, stats.crf_images) == (1, 1)
    for kind in ("seg", "seg_crf"):
        assert json.loads((run / kind / "val" / "settings.json").read_text())["scales"] == [1.0]
    assert (run / "infer_seg.log").read_text().count("re-claimed with the current settings (scales:") == 2
    capsys.readouterr()
    assert infer_seg.main(["--run-dir", str(run), "run.device=cpu", "data.max_images=1", SCALES]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "seg/val holds outputs made with other settings (scales" in err
    assert "Traceback" not in err


def test_square_resize_is_applied_recorded_and_checked(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "run")
    square = ("data.max_images=1", "eval.resize=48", "eval.resize_mode=square")  # the COCO protocol, SPEC §5.2
    _infer(run, *square)
    settings = json.loads((run / "seg" / "val" / "settings.json").read_text())
    assert (settings["resize"], settings["resize_mode"]) == (48, "square")
    cfg = _config(run, *square)
    item = build_dataset(cfg, "val", "eval")[0]
    assert item["img"].shape[1] != item["img"].shape[2]  # a non-square image, so square differs from long_side
    ev = cfg.eval
    logits = predict_seg_logits(load_trained_model(cfg, torch.device("cpu")), item["img"][None], tuple(ev.scales),
                                bool(ev.flip), str(ev.flip_fusion), str(ev.scale_fusion), 48,
                                resize_mode="square")[0]  # fmt: skip
    prediction = read_label_png(run / "seg" / "val" / f"{item['name']}.png")
    assert prediction.shape == tuple(item["img"].shape[1:])  # upsampled back to the original size
    assert np.array_equal(prediction, logits.argmax(0).numpy().astype(np.uint8))
    with pytest.raises(ValueError, match=r"resize_mode: 'square' -> 'long_side'"):
        _infer(run, "data.max_images=1", "eval.resize=48", "eval.resize_mode=long_side")
    # A typo is refused before settings.json could record it (which would block the corrected run).
    other = _copy_run(trained, tmp_path / "other")
    with pytest.raises(ValueError, match=r"eval\.resize_mode must be one of \('long_side', 'square'\)"):
        _infer(other, "data.max_images=1", "eval.resize=48", "eval.resize_mode=sqaure")
    assert not (other / "seg" / "val" / "settings.json").exists()


def _env() -> dict[str, str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # torchrun of this interpreter
    return {**os.environ, "PATH": path, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_ranks_write_the_same_files_as_one_process(trained, tmp_path):
    single = _copy_run(trained, tmp_path / "single")
    sharded = _copy_run(trained, tmp_path / "sharded")
    _infer(single, "eval.crf=true", "eval.crf_workers=0")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "tools.infer_seg", "--config", str(sharded / "config.yaml"), f"run.out_dir={sharded}",
               "run.device=cpu", SCALES, "eval.crf=true", "eval.crf_workers=1"]  # fmt: skip
    subprocess.run(command, cwd=REPO, env=_env(), check=True, capture_output=True, timeout=300)
    for kind in ("seg", "seg_crf"):
        a, b = _labels(single / kind / "val"), _labels(sharded / kind / "val")
        assert sorted(a) == sorted(b) and a
        assert all(np.array_equal(a[name], b[name]) for name in a), kind


DYING_INFERENCE = textwrap.dedent(
    """
    import json, os, signal, sys
    from tests.processes import descendants
    from tools import infer_seg
    from utils import crf

    real_imap = crf.CRFPool.imap

    def imap_then_die(self, jobs):
        for result in real_imap(self, jobs):  # the first CRF result is back: the whole pool is running
            with open(sys.argv[1], "w") as f:
                json.dump([pid for level in descendants(os.getpid()) for pid in level], f)
            os.kill(os.getpid(), signal.SIGKILL)
            yield result

    if __name__ == "__main__":  # the forkserver imports this file too, as __mp_main__
        crf.CRFPool.imap = imap_then_die
        sys.exit(infer_seg.main(sys.argv[2:]))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_PROC, reason="reads process states from /proc (Linux)")
def test_a_sigkilled_inference_leaves_no_crf_processes_behind(trained, tmp_path):
    """Issue #10 item 7: the forkserver and the DenseCRF workers (hundreds of MB each) die with the tool."""
    run = _copy_run(trained, tmp_path / "run")
    script, pid_file, log = tmp_path / "dying_inference.py", tmp_path / "pids.json", tmp_path / "log.txt"
    script.write_text(DYING_INFERENCE)
    args = [str(pid_file), "--run-dir", str(run), "run.device=cpu", SCALES, "eval.crf=true", "eval.crf_workers=2"]
    # output to a file, not a pipe: orphans that inherited a pipe would keep subprocess.run waiting for its end
    with open(log, "w") as out:
        killed = subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=_env(), stdout=out,
                                stderr=subprocess.STDOUT, timeout=300)  # fmt: skip
    assert killed.returncode == -9, log.read_text()[-3000:]
    pids = json.loads(pid_file.read_text())
    assert len(pids) >= 4, pids  # forkserver, resource tracker, 2 CRF workers (+ data loader workers)
    assert still_running_after(pids, bound_seconds=60) == []


@pytest.mark.slow
def test_infer_run_voc_pipeline_end_to_end(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "run")
    overrides = ["run.device=cpu", "run.num_threads=1", "eval.crf_workers=1", "eval.sweep_step=0.1"]
    result = subprocess.run(["bash", "infer_run_VOC.sh", str(run), *overrides], cwd=REPO, env={**_env(), "NGPUS": "1"},
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # SPEC §8: CAMs and pseudo labels on eval.cam_split (VOC train), segmentation on val
    count = {split: len(build_dataset(_config(run), split, "eval")) for split in ("train", "val")}
    for folder, suffix, split in (("cams", ".npz", "train"), ("pseudo_labels", ".png", "train"),
                                  ("seg", ".png", "val"), ("seg_crf", ".png", "val")):  # fmt: skip
        assert len(list((run / folder / split).glob(f"*{suffix}"))) == count[split], folder
    for name in ("cams_train_sweep", "pseudo_labels_train", "seg_val", "seg_crf_val"):
        miou = json.loads((run / "eval" / f"{name}.json").read_text())["miou"]
        assert isinstance(miou, float) and 0.0 <= miou <= 1.0, name
    assert (run / "eval" / "cams_train_sweep.png").is_file()
    assert "| segmentation head + DenseCRF | val |" in result.stdout  # the protocol table closes the pipeline


@pytest.mark.slow
def test_the_pipeline_runs_shards_then_scores_their_union(trained, tmp_path):
    """scripts/infer_pipeline.sh with run.num_shards=2: each shard only produces (CAMs, pseudo labels, segmentation)
    its ids[i::2]; the rerun without the shard keys finds everything done and evaluates the whole split."""
    run = _copy_run(trained, tmp_path / "run")
    overrides = ["run.device=cpu", "run.num_threads=1", "eval.crf_workers=0", "eval.sweep_step=0.1",
                 "data.max_images=3"]  # fmt: skip
    env = {**_env(), "NGPUS": "1"}

    def pipeline(*extra: str) -> subprocess.CompletedProcess:
        result = subprocess.run(["bash", "infer_run_VOC.sh", str(run), *overrides, *extra], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=900)  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    cfg = _config(run, "data.max_images=3")
    ids = {split: build_dataset(cfg, split, "eval").ids for split in ("train", "val")}
    outputs = (("cams", ".npz", "train"), ("pseudo_labels", ".png", "train"), ("seg", ".png", "val"),
               ("seg_crf", ".png", "val"))  # fmt: skip
    first = pipeline("run.num_shards=2", "run.shard_index=0")
    assert "this shard is done (run.num_shards=2)" in first.stdout
    for folder, suffix, split in outputs:
        assert sorted(p.stem for p in (run / folder / split).glob(f"*{suffix}")) == sorted(ids[split][0::2]), folder
    assert not (run / "eval").exists()  # a shard scores nothing: its split is incomplete
    pipeline("run.num_shards=2", "run.shard_index=1")
    for folder, suffix, split in outputs:
        assert sorted(p.stem for p in (run / folder / split).glob(f"*{suffix}")) == sorted(ids[split]), folder
    final = pipeline()
    for name in ("cams_train_sweep", "pseudo_labels_train", "seg_val", "seg_crf_val"):
        assert json.loads((run / "eval" / f"{name}.json").read_text())["num_images"] == 3, name
    assert "| segmentation head + DenseCRF | val |" in final.stdout


def test_inference_autocast_follows_eval_precision(trained, tmp_path, monkeypatch):
    # eval.precision defaults to ${train.precision} (the behaviour before the key existed) and is recorded per folder.
    assert _config(trained).eval.precision == _config(trained).train.precision
    cuda = torch.device("cuda")  # autocast_name looks at the device type only: no GPU needed
    assert infer_seg.output_settings(_config(trained, "eval.precision=fp16"), cuda)["precision"] == "fp16"
    chosen = _config(trained, "eval.precision=fp32", "train.precision=bf16")
    assert infer_seg.output_settings(chosen, cuda)["precision"] == "fp32"
    seen = []
    real = infer_seg.autocast

    def recording(device: torch.device, precision: str) -> torch.autocast:
        seen.append(precision)
        return real(device, precision)

    monkeypatch.setattr(infer_seg, "autocast", recording)
    _infer(_copy_run(trained, tmp_path / "run"), "data.max_images=1", "eval.precision=fp16", "train.precision=fp32")
    assert seen == ["fp16"]


def test_a_split_without_masks_is_predicted_with_two_panel_overlays_and_not_scored(trained, tmp_path, capsys):
    """VOC's test split (images and a list, no masks): every image gets its prediction at its own size, overlays
    are image | prediction, and tools.evaluate refuses the split in one line pointing to the packaging tool."""
    from datasets.synthetic import generate
    from tests.user_errors import user_error_line
    from tools import evaluate

    root = tmp_path / "VOC2012"
    generate(root, num_train=2, num_val=1, num_test=3, seed=1, min_size=64, max_size=96)
    run = _copy_run(trained, tmp_path / "run")
    stats = _infer(run, f"data.root={root}", "eval.split=test", "eval.crf=true", "eval.crf_workers=0",
                   "eval.num_overlays=2")  # fmt: skip
    dataset = build_dataset(_config(run, f"data.root={root}"), "test", "eval")
    assert not dataset.has_masks and "mask" not in dataset[0]
    assert (stats.seg_images, stats.crf_images) == (3, 3)
    predictions = _labels(run / "seg" / "test")
    assert sorted(predictions) == sorted(dataset.ids)
    for index, name in enumerate(dataset.ids):
        assert predictions[name].shape == tuple(dataset[index]["img"].shape[1:])
    for folder in ("seg", "seg_crf"):
        overlays = sorted((run / folder / "test_overlays").glob("*.png"))
        assert [p.stem for p in overlays] == dataset.ids[:2]
        height, width = dataset[0]["img"].shape[1:]
        with Image.open(overlays[0]) as image:
            # two panels and one 4-pixel gap: no ground-truth panel (the height may include a caption band)
            assert image.size[0] == 2 * width + 4 and image.size[1] >= height
    args = ["--run-dir", str(run), "--source", "seg", f"data.root={root}", "eval.split=test"]
    line = user_error_line(evaluate.main, args, capsys)
    assert "split 'test' has no ground-truth masks" in line and "tools.package_voc_test" in line
    assert not (run / "eval").exists()
