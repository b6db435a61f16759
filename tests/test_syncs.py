"""utils/syncs.py: the host-read counter itself, and the documented number of host reads of one MSFC training step.

A host read of a tensor value is a device synchronisation on CUDA. One training micro-step makes exactly one on the
default path: the ``tolist`` in ``losses/combine.py`` that brings every logged number to the host and checks the
losses for NaN/Inf. Counted on CPU as a CUDA run would pay them (``count_syncs`` counts value reads whatever the
device).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.step import TrainStep
from engine.task import MSFCTask
from engine.trainer import Trainer, _to_device
from losses import TERMS
from utils.config import load_config
from utils.syncs import count_syncs, host_item, host_list, to_device

from .test_engine import _batch, _cfg, _model_with_bank

ROOT = Path(__file__).resolve().parent.parent
PATCHED_OWNERS = (torch.Tensor, torch)


def _line_of(path: str, text: str) -> str:
    """``"path:line"`` of the one line of ``path`` (repository-relative) that contains ``text``."""
    lines = [i for i, line in enumerate((ROOT / path).read_text().splitlines(), 1) if text in line]
    assert len(lines) == 1, (path, text, lines)
    return f"{path}:{lines[0]}"


COMBINE_READ = _line_of("losses/combine.py", "torch.stack(logged).tolist()")
OPTIMIZER_STEP = _line_of("engine/trainer.py", "self.optimizer.step()")


def _attributes() -> dict:
    return {id(owner): dict(vars(owner)) for owner in PATCHED_OWNERS}


# ----------------------------------------------------------------------------------------------------------------------
# The counter
# ----------------------------------------------------------------------------------------------------------------------


def test_counts_every_kind_of_host_read_at_its_line():
    x = torch.arange(6.0)
    before = _attributes()
    with count_syncs() as counter:
        x.sum().item()  # item
        bool(x.any())  # __bool__
        x.tolist()  # tolist
        float(x[1])  # __float__
        int(x[2])  # __int__
        range(torch.tensor(3))  # __index__
        x.numpy()  # numpy
        torch.equal(x, x)  # equal
        x.nonzero()  # nonzero
        torch.where(x > 2)  # where
        x.unique()  # unique
        x[x > 2]  # bool_index
        torch.multinomial(x + 1, 2)  # multinomial
        line = f"tests/test_syncs.py:{sys._getframe().f_lineno + 1}"
        x.repeat_interleave(torch.tensor([1, 2, 0, 1, 1, 1]))
    assert counter.by_kind == {
        "item": 1, "__bool__": 1, "tolist": 1, "__float__": 1, "__int__": 1, "__index__": 1, "numpy": 1,
        "equal": 1, "nonzero": 1, "where": 1, "unique": 1, "bool_index": 1, "multinomial": 1, "repeat_interleave": 1,
    }  # fmt: skip
    assert counter.total == 14 and counter.by_site[line] == 1
    assert all(site.startswith("tests/test_syncs.py:") for site in counter.by_site)
    assert "repeat_interleave x1" in counter.report()
    assert _attributes() == before  # every patched method is back


def test_not_counted_a_call_inside_another_or_without_a_read():
    x = torch.arange(6.0)
    with count_syncs() as counter:
        np.asarray(x)  # __array__ -> numpy: one read
        torch.unique(x)  # the function: one read
        x.repeat_interleave(2)  # an int repeat: the output size is known
        torch.where(x > 2, x, 0.0)  # three arguments: no shape from values
        x[torch.tensor([0, 2])]  # integer indexing: no shape from values
        x.to("cpu"), x.cpu(), x.to(torch.float64)  # no device crossed
        torch.tensor([1.0, 2.0])  # host data onto the host
    assert counter.by_kind == {"numpy": 1, "unique": 1}


def test_restored_after_an_exception_and_nested_blocks_count_their_own_reads():
    before = _attributes()
    x = torch.ones(2)
    with pytest.raises(RuntimeError, match="boom"), count_syncs() as outer:
        x.sum().item()
        with count_syncs() as inner:
            x.tolist()
        assert _attributes() != before  # still patched for the outer block
        raise RuntimeError("boom")
    assert (outer.total, inner.total) == (2, 1)
    assert _attributes() == before
    with count_syncs() as again:
        x.sum().item()
    assert again.total == 1  # patching works again after the restore


def test_only_the_entering_thread_and_only_device_reads_when_asked():
    x = torch.ones(3)
    with count_syncs() as counter, count_syncs(cpu_reads=False) as device_only:
        worker = threading.Thread(target=lambda: x.sum().item())
        worker.start()
        worker.join()
        x.sum().item()
    assert counter.total == 1  # the other thread's read is not counted
    assert device_only.total == 0  # a CPU tensor: no device to wait for


def test_host_reads_of_host_tensors_are_kept_apart():
    draw = torch.rand((), generator=torch.Generator().manual_seed(0))
    with count_syncs() as counter:
        value, values = host_item(draw), host_list(torch.arange(3))
    assert (counter.total, counter.host) == (0, 2)
    assert value == draw.item() and values == [0, 1, 2]
    with pytest.raises(ValueError, match="expected a CPU tensor"):
        host_item(torch.empty((), device="meta"))
    host = torch.arange(3)
    assert to_device(host, torch.device("cpu")) is host


# ----------------------------------------------------------------------------------------------------------------------
# One MSFC training step
# ----------------------------------------------------------------------------------------------------------------------


def _step_reads(monkeypatch, debug: bool, host: bool = True) -> list:
    """The counters of two default steps (every term active, the bank initialised so L_mem runs)."""
    if debug:
        monkeypatch.setenv("MSFC_DEBUG", "1")
    else:
        monkeypatch.delenv("MSFC_DEBUG", raising=False)
    cfg = _cfg()
    model = _model_with_bank(cfg)
    step = TrainStep(cfg, torch.device("cpu"))
    assert step.active(0) == list(TERMS)
    generator = torch.Generator().manual_seed(0)
    counters = []
    for index in range(2):
        batch = _batch(2)
        batch = _to_device(batch, torch.device("cpu")) if host else batch  # the trainer's batch: with "host"
        with count_syncs() as counter:
            total, logs = step(model, batch, index, generator)
        assert "loss_mem" in logs and "mem_weight" in logs
        counters.append(counter)
        with count_syncs() as after:
            total.backward()
            step.after_optimizer_step(model, index)  # the EMA teacher and, every step here, the bank update
        assert after.total == 0, after.report()
    return counters


def test_a_default_step_reads_the_host_once_in_losses_combine(monkeypatch):
    first, second = _step_reads(monkeypatch, debug=False)
    assert second.total == 1 and second.by_site == {COMBINE_READ: 1}, second.report()
    # The first step also reads the bank's flags (changed since construction by the test's fill_); afterwards they
    # are cached until they change, and a bank update only ever adds classes.
    memory_read = _line_of("models/memory.py", "answer = bool(flags.any())")
    assert first.by_site == {COMBINE_READ: 1, memory_read: 1}, first.report()
    assert first.host > 0 and second.host > 0  # the CPU generator's draws: host values, never a sync


def test_without_the_host_batch_the_class_count_is_read_from_the_device(monkeypatch):
    _, second = _step_reads(monkeypatch, debug=False, host=False)
    assert second.by_site == {COMBINE_READ: 1, _line_of("core/labels.py", "return int(labels.gt(0)"): 1}


def test_debug_mode_adds_the_input_checks(monkeypatch):
    _, second = _step_reads(monkeypatch, debug=True)
    files = {site.split(":")[0] for site in second.by_site}
    assert second.total > 1 and COMBINE_READ in second.by_site
    assert {"losses/segmentation.py", "models/memory.py", "core/views.py", "core/labels.py"} <= files


def test_a_trainer_iteration_reads_once_per_micro_step(voc_root: Path, tmp_path: Path, monkeypatch):
    """Through the trainer: micro-steps (with gradient accumulation), optimiser step, EMA and bank update."""
    monkeypatch.delenv("MSFC_DEBUG", raising=False)
    cfg = load_config("configs/smoke.yaml", [f"data.root={voc_root}", f"run.out_dir={tmp_path / 'run'}",
                                             "train.accum_steps=2", "train.grad_clip=1.0"])  # fmt: skip
    trainer = Trainer(cfg, MSFCTask)
    try:
        stream, model = iter(trainer.loader), trainer.model
        trainer.task.enter_phase(model, trainer.task.phase(0))
        model.train()
        micro_reads, optimizer_reads, after_reads = [], [], []
        for step in range(3):
            for micro in range(2):
                batch = next(stream)  # the sampler's draws: host tensors, in the loader's workers when there are any
                with count_syncs() as micro_step:
                    trainer._micro_step(model, batch, step, sync=micro == 1)
                micro_reads.append(micro_step)
            with count_syncs() as optimizer:
                grad_norm = trainer._optimizer_step()
            with count_syncs() as after:
                trainer.task.after_optimizer_step(model, step)
            optimizer_reads.append(optimizer)
            after_reads.append(after)
        assert torch.is_tensor(grad_norm)  # clipping returns the norm unread; the log line reads it
        # The bank's flags are read at the first micro-step and after each update until a class is ready.
        memory_read = _line_of("models/memory.py", "answer = bool(flags.any())")
        reports = [c.report() for c in micro_reads]
        assert all(set(c.by_site) <= {COMBINE_READ, memory_read} for c in micro_reads), reports
        assert [c.by_site[COMBINE_READ] for c in micro_reads] == [1] * 6
        assert micro_reads[-1].total == micro_reads[-2].total == 1  # L_mem runs: the bank has classes
        assert all(c.total == 0 for c in after_reads)
        # AdamW reads its per-parameter step counters, CPU tensors in any run (not capturable): no device sync.
        states = [state["step"] for state in trainer.optimizer.state.values()]
        assert all(s.device.type == "cpu" for s in states)
        assert all(c.by_site == {OPTIMIZER_STEP: len(states)} and set(c.by_kind) == {"item"} for c in optimizer_reads)
    finally:
        trainer.close()


def test_a_non_finite_loss_stops_the_run_without_a_flag_read_in_one_process(voc_root: Path, tmp_path: Path):
    """One process knows a failure without the all-reduced flag (and its read) that several ranks need."""
    from engine.trainer import TrainingDiverged

    cfg = load_config("configs/smoke.yaml", [f"data.root={voc_root}", f"run.out_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, MSFCTask)
    try:
        batch = next(iter(trainer.loader))

        def diverging(model, batch, step, generator):
            raise FloatingPointError("combine: non-finite loss term(s) at step 0: cls=nan")

        trainer.task.loss = diverging
        with count_syncs() as counter, pytest.raises(TrainingDiverged, match="cls=nan"):
            trainer._micro_step(trainer.model, batch, 0, sync=True)
        assert counter.total == 0, counter.report()
    finally:
        trainer.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_default_step_synchronises_once(monkeypatch):
    """The CUDA ground truth: PyTorch's own sync detector (set_sync_debug_mode) and the counter agree on one sync per
    steady-state step, the read in losses/combine.py (blocking copies and reads of device tensors only)."""
    import warnings

    monkeypatch.delenv("MSFC_DEBUG", raising=False)
    device = torch.device("cuda")
    cfg = _cfg("run.device=cuda")
    model = _model_with_bank(cfg).to(device)
    step = TrainStep(cfg, device)
    generator = torch.Generator().manual_seed(0)
    for index in range(3):
        batch = _to_device({k: v.pin_memory() for k, v in _batch(2).items()}, device)
        with count_syncs(cpu_reads=False) as counter, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                total, _ = step(model, batch, index, generator)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        total.backward()
        step.after_optimizer_step(model, index)
        model.zero_grad(set_to_none=True)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert counter.by_site == {COMBINE_READ: 1}, counter.report()
    assert len(syncs) == 1, syncs
