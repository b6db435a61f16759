"""train.compile: a compiled training step agrees with the eager one; compiled runs write and read eager checkpoints.

The suite compiles with ``aot_eager`` (dynamo + AOTAutograd, the graph capture and the autograd transform of
``train.compile``, without code generation): torch.compile's default backend (inductor) builds C++ on CPU, and its
first compile of the step's graphs takes about 10 minutes on a busy 2-core CPU with a cold cache (about 20 s warm),
too long for every run of the suite. Inductor itself is exercised where it matters, on the GPU
(``scripts/gpu_check.sh``, part ``bench_compile``); ``MSFC_TEST_INDUCTOR=1`` adds the inductor variant here.

Tolerance: both runs are float32 on CPU; the compiled one fuses pointwise ops and reorders reductions (matmul tiling,
softmax, layer norm, sums), which moves each result by a few ulp (float32 eps 1.2e-7). Through the 2-block ViT and
every loss term that was measured at 6e-7 absolute (4e-7 relative) on the logged losses and 1.9e-6 on the gradients
(the largest |difference| of a parameter's gradient over the largest |entry| of that gradient). The bounds below,
1e-5 relative (+1e-6 absolute) on the losses and 1e-4 on the gradients, leave ~20-50x room for other compilers and
CPUs while still catching a wrong graph (a dropped term, a frozen head, a different label map move them by >1e-3).
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
from pathlib import Path

import pytest
import torch

from engine.step import TrainStep
from engine.task import MSFCTask
from engine.trainer import Trainer, _to_device, compile_model
from models import build_model
from utils.checkpoint import read_checkpoint
from utils.config import ConfigError, load_config

from .test_engine import _batch, _cfg, _model_with_bank

LOSS_RTOL, LOSS_ATOL, GRAD_RTOL = 1e-5, 1e-6, 1e-4
COMPILERS = ("g++", "c++", "clang++")


def _needs_compiler(backend: str) -> None:
    if backend == "inductor" and not any(shutil.which(name) for name in COMPILERS):
        reason = f"torch.compile (inductor) on CPU needs a C++ compiler; none of {COMPILERS} is on PATH"
        print(reason)
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _step(model, cfg, step):
    total, logs = step(model, _to_device(_batch(2), torch.device("cpu")), 0, torch.Generator().manual_seed(0))
    total.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return total.detach(), logs, grads


def test_train_compile_is_a_boolean_off_by_default():
    assert _cfg().train.compile is False
    assert load_config("configs/smoke.yaml", ["data.root=/x", "run.out_dir=/y", "train.compile=true"]).train.compile
    with pytest.raises(ConfigError, match="train.compile"):
        load_config("configs/smoke.yaml", ["data.root=/x", "run.out_dir=/y", "train.compile=fast"])


def test_compiling_in_place_keeps_the_state_dict_keys():
    model = build_model(_cfg())
    keys = list(model.state_dict())
    assert compile_model(model) is model
    assert list(model.state_dict()) == keys and not any("_orig_mod" in key for key in keys)


BACKENDS = ["aot_eager", "inductor"] if os.environ.get("MSFC_TEST_INDUCTOR") == "1" else ["aot_eager"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_compiled_step_gives_the_eager_losses_and_gradients(backend: str):
    """One default step (every term active, the bank initialised): the compiled model agrees with the eager one."""
    _needs_compiler(backend)
    cfg = _cfg()
    eager = _model_with_bank(cfg)
    compiled = copy.deepcopy(eager)
    if backend == "inductor":
        compile_model(compiled)  # what train.compile=true does
    else:
        compiled.compile(backend=backend)  # dynamo + AOTAutograd without code generation
    step = TrainStep(cfg, torch.device("cpu"))
    total_e, logs_e, grads_e = _step(eager, cfg, step)
    total_c, logs_c, grads_c = _step(compiled, cfg, step)

    assert logs_c.keys() == logs_e.keys() and "loss_mem" in logs_e
    for key, value in logs_e.items():
        assert logs_c[key] == pytest.approx(value, rel=LOSS_RTOL, abs=LOSS_ATOL), key
    assert torch.allclose(total_c, total_e, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    assert grads_c.keys() == grads_e.keys()
    for name, grad in grads_e.items():
        scale = grad.abs().max().clamp(min=1e-12)
        assert (grads_c[name] - grad).abs().max() <= GRAD_RTOL * scale, name


@pytest.mark.slow
def test_compiled_runs_write_and_resume_eager_checkpoints(voc_root: Path, tmp_path: Path, monkeypatch):
    """An eager run's checkpoint resumes under train.compile=true (no allow-list needed) and the compiled run's
    checkpoint has the eager keys (no `_orig_mod.` prefix) and loads into an eager model. The trainer's compile_model
    compiles in place as with train.compile=true, with the aot_eager backend (see the module docstring)."""
    aot_eager = functools.partialmethod(torch.nn.Module.compile, backend="aot_eager")
    monkeypatch.setattr(torch.nn.Module, "compile", aot_eager)
    out = tmp_path / "run"
    common = [f"data.root={voc_root}", f"run.out_dir={out}", "train.eval_every=0"]
    for overrides in (["train.max_iters=2", "train.stop_iter=1"],
                      ["train.max_iters=2", "train.compile=true", "train.resume=auto"]):  # fmt: skip
        trainer = Trainer(load_config("configs/smoke.yaml", [*common, *overrides]), MSFCTask)
        try:
            trainer.fit()
            live = {key: value.clone() for key, value in trainer.model.state_dict().items()}
        finally:
            trainer.close()
    saved = read_checkpoint(out / "checkpoints" / "last.pth")
    assert saved["step"] == 2 and saved["config"]["train"]["compile"] is True
    eager = build_model(load_config("configs/smoke.yaml", common))
    eager.load_state_dict(saved["model"])  # strict: the same keys
    assert saved["model"].keys() == eager.state_dict().keys() == live.keys()
    assert all(torch.equal(saved["model"][key], live[key]) for key in live)
