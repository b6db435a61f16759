"""Tests for utils/crf.py: DenseCRF refinement and the streaming process pool (SPEC §5.2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.processes import HAS_PROC, still_running_after
from utils.crf import CRFPool, dense_crf
from utils.metrics import ConfusionMatrix

REPO = Path(__file__).resolve().parent.parent


def _two_region_case(seed: int, height: int = 24, width: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A red left half (class 0) and a blue right half (class 1), mild pixel noise, and a noisy probability map.

    The probabilities favour the right class with 0.65 but are flipped at a random 25 % of the pixels, so the
    argmax of the input is wrong there; the bilateral term (flat colour regions) should repair it.
    """
    rng = np.random.default_rng(seed)
    gt = np.zeros((height, width), dtype=np.int64)
    gt[:, width // 2 :] = 1
    colours = np.where(gt[..., None] == 0, np.array([200.0, 40.0, 40.0]), np.array([40.0, 40.0, 200.0]))
    image = np.clip(colours + rng.normal(0.0, 3.0, colours.shape), 0, 255).astype(np.uint8)
    p_one = np.where(gt == 1, 0.65, 0.35)
    p_one = np.where(rng.random(gt.shape) < 0.25, 1.0 - p_one, p_one)
    prob = np.stack([1.0 - p_one, p_one]).astype(np.float32)
    return image, prob, gt


def _miou(pred: np.ndarray, gt: np.ndarray) -> float:
    cm = ConfusionMatrix(2)
    cm.update(pred, gt)
    return cm.compute()["miou"]


def test_dense_crf_improves_noisy_probabilities() -> None:
    image, prob, gt = _two_region_case(0)
    refined = dense_crf(image, prob)
    assert refined.shape == prob.shape and refined.dtype == np.float32
    np.testing.assert_allclose(refined.sum(axis=0), 1.0, atol=1e-5)  # marginals
    before, after = _miou(prob.argmax(axis=0), gt), _miou(refined.argmax(axis=0), gt)
    # About a quarter of the input pixels are wrong (mIoU ≈ 0.6); the CRF should fix nearly all of them.
    assert before < 0.75
    assert after >= before + 0.2
    assert after > 0.95


def test_dense_crf_handles_zero_probabilities() -> None:
    image, prob, _ = _two_region_case(1)
    hard = np.eye(2, dtype=np.float32)[prob.argmax(axis=0)].transpose(2, 0, 1)  # exact 0/1 probabilities
    refined = dense_crf(image, hard, iters=3)
    assert np.isfinite(refined).all()


def test_dense_crf_takes_read_only_and_strided_inputs() -> None:
    image, prob, _ = _two_region_case(2)
    expected = dense_crf(image, prob, iters=2)
    frozen_image, frozen_prob = image.copy(), prob.copy()
    frozen_image.setflags(write=False)
    frozen_prob.setflags(write=False)
    np.testing.assert_array_equal(dense_crf(frozen_image, frozen_prob, iters=2), expected)
    strided = np.ascontiguousarray(image[:, ::-1])[:, ::-1]  # the same pixels, a negative-stride view
    np.testing.assert_array_equal(dense_crf(strided, prob, iters=2), expected)


def test_dense_crf_rejects_bad_input() -> None:
    image, prob, _ = _two_region_case(2)
    with pytest.raises(TypeError, match="uint8"):
        dense_crf(image.astype(np.float32), prob)
    with pytest.raises(ValueError, match=r"prob must be a \[C, H, W\]"):
        dense_crf(image, prob[:, :-1])
    with pytest.raises(ValueError, match="NaN"):
        dense_crf(image, np.full_like(prob, np.nan))


def _jobs(cases: list, consumed: list[int] | None = None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    for i, (image, prob, _) in enumerate(cases):
        if consumed is not None:
            consumed.append(i)
        yield f"img{i}", image, prob


def test_pool_equals_serial_and_bounds_in_flight() -> None:
    cases = [_two_region_case(seed, 12 + 2 * seed, 16) for seed in range(5)]
    params = {"iters": 5, "bilateral_sxy": 30}
    with CRFPool(0, **params) as serial_pool:
        serial = list(serial_pool.imap(_jobs(cases)))
    assert [key for key, _ in serial] == [f"img{i}" for i in range(5)]
    np.testing.assert_array_equal(serial[0][1], dense_crf(cases[0][0], cases[0][1], **params))

    consumed: list[int] = []
    with CRFPool(2, max_in_flight=2, **params) as pool:
        stream = pool.imap(_jobs(cases, consumed))
        first_key, first = next(stream)
        # Jobs are pulled lazily: when the first result arrives at most max_in_flight + 1 were read.
        assert len(consumed) <= 3
        parallel = [(first_key, first), *stream]
        # A failing job in a worker comes back as an error naming its key.
        with pytest.raises(RuntimeError, match="'broken'.*uint8"):
            list(pool.imap([("broken", cases[0][0].astype(np.float32), cases[0][1])]))
    assert [key for key, _ in parallel] == [key for key, _ in serial]
    for (_, a), (_, b) in zip(parallel, serial, strict=True):
        np.testing.assert_array_equal(a, b)


def test_pool_errors_name_the_job() -> None:
    with pytest.raises(TypeError, match="unknown DenseCRF parameter"):
        CRFPool(0, iterations=3)
    image, prob, _ = _two_region_case(3)
    with CRFPool(0) as pool, pytest.raises(RuntimeError, match="'broken'.*uint8"):
        list(pool.imap([("broken", image.astype(np.float32), prob)]))
    with pytest.raises(RuntimeError, match="after the pool was closed"):
        next(pool.imap([("late", image, prob)]))


DYING_OWNER = textwrap.dedent(
    """
    import json, os, signal, sys, threading, time
    import numpy as np
    import utils.crf
    from tests.processes import cpu_ticks, descendants

    if __name__ == "__main__":  # the forkserver imports this file too, as __mp_main__
        mode, load, pid_file = sys.argv[1:]
        if mode == "watch-only":  # a forkserver started without the lifeline: the workers' own watch must act
            utils.crf.FORKSERVER_LIFELINE = "utils.no_such_module"
        image, prob = np.zeros((8, 8, 3), np.uint8), np.full((2, 8, 8), 0.5, np.float32)
        pool = utils.crf.CRFPool(2, iters=1)
        list(pool.imap([("a", image, prob), ("b", image, prob)]))  # both workers are up
        levels = descendants(os.getpid())  # [forkserver, resource tracker], [the forkserver's children: workers]
        if load == "busy":  # die while both workers are inside DenseCRF calls that would run for hours
            before = {pid: cpu_ticks(pid) for pid in levels[1]}
            pool.params = {"iters": 10**9}
            jobs = [("c", image, prob), ("d", image, prob)]
            threading.Thread(target=lambda: list(pool.imap(jobs)), daemon=True).start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and sum(cpu_ticks(p) - t > 20 for p, t in before.items()) < 2:
                time.sleep(0.05)
        with open(pid_file, "w") as f:
            json.dump([pid for level in levels for pid in level], f)
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.skipif(not HAS_PROC, reason="reads process states from /proc (Linux)")
@pytest.mark.parametrize(("mode", "load"), [("lifeline", "busy"), ("watch-only", "idle")])
def test_workers_and_forkserver_die_with_a_sigkilled_owner(tmp_path: Path, mode: str, load: str) -> None:
    """Issue #10 item 7: SIGKILL the process that made the pool; its forkserver, resource tracker and DenseCRF
    workers must all be gone soon after (``lifeline``: the kernel's death signals, even mid-job; ``watch-only``: the
    workers' own watch thread, for a forkserver started without the lifeline)."""
    script, pid_file, log = tmp_path / "dying_owner.py", tmp_path / "pids.json", tmp_path / "log.txt"
    script.write_text(DYING_OWNER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # output to a file, not a pipe: orphans that inherited a pipe would keep subprocess.run waiting for its end
    with open(log, "w") as out:
        result = subprocess.run([sys.executable, str(script), mode, load, str(pid_file)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, timeout=120)  # fmt: skip
    assert result.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    pids = json.loads(pid_file.read_text())
    assert len(pids) >= 4, pids  # forkserver, resource tracker and the 2 workers
    assert still_running_after(pids, bound_seconds=60) == []  # they go within a second
