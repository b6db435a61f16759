"""MP2M memory bank (SPEC §4.5): known-answer accumulate/update, similarity, checkpoint state, 2-rank all-reduce."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.memory import MemoryBank, fuse_similarity
from utils.syncs import count_syncs


def tokens_from_columns(*images: list[tuple[float, float]]) -> torch.Tensor:
    """Images given as lists of 2-d tokens along one row -> `[B, 2, 1, N]`."""
    return torch.tensor(images, dtype=torch.float32).permute(0, 2, 1).unsqueeze(2)


def first_round(bank: MemoryBank) -> None:
    # Image 0: tokens (1,0) (3,0) (0,5), labels 1 1 2 -> class 1 prototype (2,0), class 2 prototype (0,5).
    # Image 1: tokens (0,2) (4,4) (9,9), labels 1 ignore background -> class 1 prototype (0,2).
    tokens = tokens_from_columns([(1, 0), (3, 0), (0, 5)], [(0, 2), (4, 4), (9, 9)])
    labels = torch.tensor([[[1, 1, 2]], [[1, 255, 0]]])
    bank.accumulate(tokens, labels)


def test_accumulate_known_answer():
    bank = MemoryBank(num_classes=3, dim=2, momentum=0.1, min_count=2)
    first_round(bank)
    # Sums of image prototypes and their counts (one per image, not per token).
    torch.testing.assert_close(bank.acc_sum, torch.tensor([[2.0, 2.0], [0.0, 5.0], [0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(bank.acc_count, torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64))
    assert bank.acc_sum.dtype == torch.float64 and bank.bank.dtype == torch.float32


def test_update_initialises_then_follows_momentum_and_skips_rare_classes():
    bank = MemoryBank(num_classes=3, dim=2, momentum=0.1, min_count=2)
    first_round(bank)
    assert bank.update() == [1]  # class 2 has one prototype < min_count 2
    # First update: the mean of the two class-1 prototypes, (2,0) and (0,2) -> (1,1).
    torch.testing.assert_close(bank.bank, torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
    assert bank.initialized.tolist() == [True, False, False]
    assert bank.acc_sum.abs().sum() == 0 and bank.acc_count.sum() == 0  # accumulators reset (class 2 included)

    # Second round: class 1 prototypes (3,1) twice -> mean (3,1); class 2 prototypes (0,5), (0,3) -> mean (0,4).
    tokens = tokens_from_columns([(3, 1), (0, 5)], [(3, 1), (0, 3)])
    bank.accumulate(tokens, torch.tensor([[[1, 2]], [[1, 2]]]))
    assert bank.update() == [1, 2]
    # Class 1: 0.1 * (1,1) + 0.9 * (3,1) = (2.8, 1.0); class 2 first time -> (0, 4); class 3 untouched.
    torch.testing.assert_close(bank.bank, torch.tensor([[2.8, 1.0], [0.0, 4.0], [0.0, 0.0]]))
    assert bank.initialized.tolist() == [True, True, False]
    assert bank.any_initialized()


def test_update_with_nothing_accumulated_changes_nothing():
    bank = MemoryBank(num_classes=2, dim=3)
    assert bank.update() == []
    assert not bank.any_initialized() and bank.bank.abs().sum() == 0


def test_every_image_contributes_one_prototype():
    bank = MemoryBank(num_classes=2, dim=4, min_count=4)
    tokens = torch.randn(5, 4, 3, 3)
    labels = torch.full((5, 3, 3), 2)
    bank.accumulate(tokens, labels)
    assert bank.acc_count.tolist() == [0.0, 5.0]
    # All tokens are class 2: each image prototype is its token mean.
    torch.testing.assert_close(bank.acc_sum[1], tokens.mean(dim=(2, 3)).sum(0).double(), atol=1e-5, rtol=0)


def test_similarity_known_answer_and_masking():
    bank = MemoryBank(num_classes=3, dim=2, momentum=0.1, min_count=2)
    bank.bank.copy_(torch.tensor([[2.8, 1.0], [0.0, 4.0], [1.0, 0.0]]))
    bank.initialized.copy_(torch.tensor([True, True, False]))
    tokens = tokens_from_columns([(1, 0), (0, 1), (-1, 0)]).requires_grad_(True)
    labels = torch.tensor([[1.0, 0.0, 1.0]])  # class 2 absent, class 3 present but not initialised
    s = bank.similarity(tokens, labels)
    assert s.shape == (1, 3, 1, 3) and not s.requires_grad
    # Class 1: cos with (2.8, 1) = 2.8/r, 1/r, -2.8/r with r = sqrt(2.8² + 1); ReLU; divided by max + 1e-5.
    r = math.hypot(2.8, 1.0)
    top = 2.8 / r
    expected = torch.tensor([top, 1 / r, 0.0]) / (top + 1e-5)
    torch.testing.assert_close(s[0, 0, 0], expected)
    assert s[0, 0].max() == pytest.approx(1.0, abs=1e-4)
    assert s[0, 1].abs().sum() == 0 and s[0, 2].abs().sum() == 0


def test_similarity_max_one_per_present_class_random():
    torch.manual_seed(0)
    bank = MemoryBank(num_classes=4, dim=8)
    bank.bank.copy_(torch.randn(4, 8))
    bank.initialized.fill_(True)
    tokens = torch.randn(3, 8, 5, 6)
    labels = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    s = bank.similarity(tokens, labels)
    peak = s.amax(dim=(2, 3))
    # A random 8-d prototype has a positive cosine with some of 30 random tokens, so every present class peaks at ~1.
    torch.testing.assert_close(peak[labels > 0], torch.ones(int(labels.sum())), atol=1e-3, rtol=0)
    assert (peak[labels == 0] == 0).all() and (s >= 0).all()


def test_state_dict_round_trip():
    bank = MemoryBank(num_classes=3, dim=2, min_count=2)
    first_round(bank)
    bank.update()
    first_round(bank)  # leave accumulators mid-period
    restored = MemoryBank(num_classes=3, dim=2, min_count=2)
    restored.load_state_dict(bank.state_dict())
    assert set(bank.state_dict()) == {"bank", "initialized", "acc_sum", "acc_count"}
    for name in ("bank", "initialized", "acc_sum", "acc_count"):
        assert torch.equal(getattr(restored, name), getattr(bank, name))
    assert restored.initialized.dtype == torch.bool


def test_bad_input_raises(monkeypatch: pytest.MonkeyPatch):
    bank = MemoryBank(num_classes=3, dim=2)
    monkeypatch.setenv("MSFC_DEBUG", "1")  # the label check is a host read: debug mode only
    with pytest.raises(ValueError, match=r"0\.\.3 or 255.*\[7\]"):
        bank.accumulate(torch.zeros(1, 2, 1, 2), torch.tensor([[[1, 7]]]))
    monkeypatch.delenv("MSFC_DEBUG")
    with pytest.raises(ValueError, match="proto_labels"):
        bank.accumulate(torch.zeros(1, 2, 1, 2), torch.zeros(1, 2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens"):
        bank.similarity(torch.zeros(1, 5, 1, 2), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="memory.momentum"):
        MemoryBank(3, 2, momentum=1.5)


def test_fuse_similarity_upsamples_and_adds():
    cam = torch.rand(2, 3, 8, 8)
    s = torch.full((2, 3, 2, 2), 0.5)
    assert fuse_similarity(cam, s, 0.0) is cam
    torch.testing.assert_close(fuse_similarity(cam, s, 0.4), cam + 0.2)


# ---------------------------------------------------------------------------------------------- two ranks (gloo)


def make_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two update periods of 4 images each, with random prototypes and every label kind."""
    g = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(2):
        tokens = torch.randn(4, 6, 3, 4, generator=g)
        labels = torch.randint(0, 4, (4, 3, 4), generator=g)
        labels[:, 0, 0] = 255
        batches.append((tokens, labels))
    return batches


def _rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        bank = MemoryBank(num_classes=3, dim=6, momentum=0.1, min_count=2)
        updated = []
        for tokens, labels in make_batches():
            bank.accumulate(tokens[rank::2], labels[rank::2])  # each rank sees half of the images
            updated.append(bank.update())
        torch.save({"state": bank.state_dict(), "updated": updated}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_update_equals_single_process(tmp_path: Path):
    mp.spawn(_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = MemoryBank(num_classes=3, dim=6, momentum=0.1, min_count=2)
    updated = []
    for tokens, labels in make_batches():
        single.accumulate(tokens, labels)
        updated.append(single.update())
    assert single.initialized.any()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for res in results:
        assert res["updated"] == updated
        torch.testing.assert_close(res["state"]["bank"], single.bank, atol=1e-6, rtol=0)
        assert torch.equal(res["state"]["initialized"], single.initialized)
    assert torch.equal(results[0]["state"]["bank"], results[1]["state"]["bank"])  # identical on both ranks


def test_accumulate_and_update_read_nothing_by_default(monkeypatch: pytest.MonkeyPatch):
    """No host read in accumulate (its label check is MSFC_DEBUG=1 only) nor in update(return_ids=False)."""
    monkeypatch.delenv("MSFC_DEBUG", raising=False)
    bank, checked = MemoryBank(num_classes=3, dim=2, min_count=1), MemoryBank(num_classes=3, dim=2, min_count=1)
    tokens, labels = tokens_from_columns([(1.0, 0.0), (0.0, 2.0)]), torch.tensor([[[1, 7]]])
    with count_syncs() as counter:
        bank.accumulate(tokens, labels)  # the out-of-range 7 matches no class: left out
        assert bank.update(return_ids=False) is None
    assert counter.total == 0, counter.report()
    monkeypatch.setenv("MSFC_DEBUG", "1")
    with pytest.raises(ValueError, match=r"\[7\]"):
        checked.accumulate(tokens, labels)
    checked.accumulate(tokens, torch.tensor([[[1, 0]]]))
    assert checked.update() == [1]
    assert torch.equal(checked.bank, bank.bank) and torch.equal(checked.initialized, bank.initialized)


def test_any_initialized_reads_the_flags_only_after_they_change():
    bank = MemoryBank(num_classes=3, dim=2, min_count=1)
    tokens = tokens_from_columns([(1.0, 0.0), (0.0, 2.0)])

    def reads() -> tuple[bool, int]:
        with count_syncs() as counter:
            answer = bank.any_initialized()
        return answer, counter.total

    assert reads() == (False, 1)
    assert reads() == (False, 0)  # unchanged: cached
    bank.update(return_ids=False)  # nothing ready: the flags were written (|=), so read once more
    assert reads() == (False, 1)
    bank.accumulate(tokens, torch.tensor([[[2, 0]]]))
    bank.update(return_ids=False)
    assert reads() == (True, 1)
    bank.accumulate(tokens, torch.tensor([[[3, 0]]]))
    bank.update(return_ids=False)  # only adds classes: a True answer stays valid without a read
    assert reads() == (True, 0)
    bank.load_state_dict(MemoryBank(num_classes=3, dim=2).state_dict())  # in place: invalidates
    assert reads() == (False, 1)
    bank.initialized.fill_(True)
    assert reads() == (True, 1)
    bank.to(torch.float64)  # module.to: the bool buffer may be replaced; never a stale answer
    assert bank.any_initialized()
    bank.initialized = torch.zeros(3, dtype=torch.bool)  # a new tensor
    assert reads() == (False, 1)
