"""The training loop, generic over the method (:class:`engine.task.Task`): run folder, data stream, DDP, mixed
precision, gradient accumulation, checkpoints, validation and resume.

Reliability (docs/reliability.md): one training per run folder (``RUN/.lock``, utils/lock.py), and a fresh run refuses
a folder that already holds checkpoints; the checkpoint of a step is on disk before that step is validated, and the
validation files are checked at start-up; a resume refuses a checkpoint trained with another recipe unless
``train.resume_allow_changes`` names the changes (recorded in metrics.jsonl, kind ``resume``); every random stream is
checkpointed and validation leaves them untouched, so a resumed run is bit-identical to one that never stopped.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import random
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.base import pair_problems
from engine.task import Task
from utils import dist
from utils.checkpoint import (
    LAST,
    CheckpointError,
    best_file,
    checkpoint_dir,
    find_latest,
    gather_rng_states,
    preserved_rng,
    prune_numbered,
    rank_rng_state,
    read_checkpoint,
    remove_partial_files,
    restore_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from utils.config import RESUME_MAY_CHANGE, ConfigError, config_changes, covers, format_changes, save_config
from utils.errors import UserError
from utils.lock import RunLock, RunLockedError, describe_holder
from utils.logging import MetricsWriter, StepClock, format_duration, is_terminal, setup_logging
from utils.optim import build_optimizer, lr_factor, set_lr
from utils.provenance import git_state
from utils.sampler import InfiniteSampler
from utils.text import preview

logger = logging.getLogger("engine.trainer")

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout whose code is running: its git state is logged


class TrainingDiverged(RuntimeError):
    """A loss became NaN/Inf; the run stops without overwriting any checkpoint."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_device(batch: dict, device: torch.device) -> dict:
    """The loader's batch on ``device``, plus the batch as the loader gave it (CPU) under ``"host"``.

    A task reads values it needs on the host from ``batch["host"]`` (e.g. how many classes an image has): a read of a
    host tensor, where the same read of the device copy would be a device synchronisation.
    """
    moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    return {**moved, "host": batch}


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """``train.compile=true``: compile ``model``'s forward with ``torch.compile``, in place; returns ``model``.

    In place (``nn.Module.compile``): the module keeps its own parameters, buffers and state-dict keys (no
    ``_orig_mod.`` prefix), so checkpoints of compiled and eager runs are the same files and load into either. It is
    compiled once, before any DDP wrapping: each curriculum phase wraps DDP anew around the same compiled module
    (a phase that freezes or unfreezes heads recompiles once: gradient requirements are guarded). Every call of the
    model compiles: the step's forwards and no-grad CAMs and validation (each new input size / grad mode compiles once
    more, up to dynamo's recompile limit, then shapes are treated as dynamic). DDP wraps the compiled module, so its
    gradient all-reduce starts when the compiled backward is done (no overlap of buckets with that backward).
    """
    model.compile()
    return model


def _wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP over the currently trainable parameters (no-op in one process)."""
    if dist.get_world_size() == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    # broadcast_buffers=False, not its successor forward_sync_buffers=False: the latter still copies rank 0's
    # buffers at construction, which would overwrite the memory bank's rank-local accumulators at every phase change.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated", category=FutureWarning)
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def restore_best(saved: Mapping[str, Any] | None, metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The per-metric best state ``{metric: {"score", "step"}}`` from a checkpoint's ``extra["best"]``.

    Also reads the single best of checkpoints written before ``best_cam`` / ``best_seg`` existed (``{"score", "step",
    "metric"}``, file ``best.pth``): its score carries over to its metric, so a resumed run writes ``best_<metric>.pth``
    only when it beats that score; the other metric starts afresh. None / {} (no validation yet) = nothing seen.
    """
    best: dict[str, dict[str, Any]] = {metric: {"score": -1.0, "step": -1} for metric in metrics}
    if not saved:
        return best
    entries = {saved.get("metric"): saved} if "metric" in saved else saved
    for metric, entry in entries.items():
        if metric in best and int(entry["step"]) >= 0:
            best[metric] = {"score": float(entry["score"]), "step": int(entry["step"])}
    return best


def agree(problem: str | None) -> None:
    """Raise ``problem`` as a :class:`UserError` on every rank if any rank has one (collective; rank order wins)."""
    found = [p for p in dist.all_gather_object(problem) if p]
    if found:
        raise UserError(found[0])


def check_val_files(dataset: Any, split: str) -> int:
    """Check, before training, that validation can read every image and mask of ``split`` (collective).

    Opens each file's header only (PIL's ``Image.open`` does not decode pixels), sharded over ranks: a missing,
    empty or non-image file, a mask that is not a palette / grey PNG, or a mask whose size differs from its image's
    would otherwise stop the run at its first validation, hours in. Uses the dataset's ``image_paths`` and
    ``mask_paths`` (None where an image has no mask).

    Returns:
        The number of images checked.

    Raises:
        UserError: on every rank, listing the first problems (each naming its file) and their count.
    """
    images, masks = list(dataset.image_paths), list(dataset.mask_paths)
    if all(mask is None for mask in masks):
        raise UserError(
            f"data.val_split={split} has no masks, and validation (train.eval_every > 0) scores against them: "
            "use a split with masks or set train.eval_every=0"
        )
    # the dataset's own header check (datasets.base.pair_problems), sharded over the ranks
    mine = [
        problem
        for index in dist.shard(range(len(images)))
        for problem in pair_problems((images[index], masks[index]), decode=False)
    ]
    problems = [problem for found in dist.all_gather_object(mine) for problem in found]
    if problems:
        shown = preview(problems, sep="; ")
        raise UserError(
            f"data.val_split={split}: validation (train.eval_every > 0) cannot use these files: {shown}. "
            "Fix or remove them, or set train.eval_every=0"
        )
    return len(images)


class Trainer:
    """Owns the model, optimiser, data stream and run folder of one training run; the method is a :class:`Task`.

    The trainer knows nothing of CAMs, heads or memory banks: it asks the task for the model, its parameter groups,
    the loss of a micro-batch, the phase of a step (a change re-wraps DDP over what trains), what follows an
    optimiser step, and validation. Holds the run folder's lock from construction to :meth:`close` (a failed
    construction releases it).

    Args:
        cfg: the resolved run config (``data.*``, ``train.*``, ``run.*`` are the trainer's; the rest the task's).
        make_task: ``make_task(cfg, device) -> Task``, called once the device is known.
    """

    def __init__(self, cfg: DictConfig, make_task: Callable[[DictConfig, torch.device], Task]):
        self.cfg = cfg
        self.make_task = make_task
        self.lock: RunLock | None = None
        self.metrics: MetricsWriter | None = None
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the metrics writer and release the run folder (idempotent)."""
        if self.metrics is not None:
            self.metrics.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _take_lock(self) -> None:
        """Rank 0 locks the run folder before anything is written into it; every rank stops if it cannot."""
        problem = None
        if self.rank == 0:
            try:
                self.lock = RunLock(self.out_dir).acquire()
            except RunLockedError as err:
                problem = str(err)
        agree(problem)

    def _refuse_used_folder(self) -> None:
        """A fresh run (train.resume=null) must not train over another run's checkpoints (collective)."""
        problem = None
        if self.rank == 0 and self.cfg.train.resume is None:
            folder = checkpoint_dir(self.out_dir)
            found = sorted(p.name for p in folder.glob("*.pth")) if folder.is_dir() else []
            if found:
                problem = (
                    f"run folder {self.out_dir} already holds checkpoints of an earlier training "
                    f"({preview(found)}): continue "
                    "it with train.resume=auto, or train into another run.out_dir"
                )
        agree(problem)

    def _setup(self) -> None:
        cfg = self.cfg
        self.device = dist.init_distributed(cfg.run.device, int(cfg.run.num_threads))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.out_dir = Path(cfg.run.out_dir)
        self._take_lock()
        setup_logging(self.out_dir, self.rank)
        self.provenance = self._log_provenance()
        if self.lock is not None and self.lock.unavailable:
            logger.warning("%s: this run folder is not locked, so nothing stops a second training from writing into it",
                           self.lock.unavailable)  # fmt: skip
        if self.lock is not None and self.lock.previous:
            logger.warning("took over the lock of %s from a training that ended without releasing it (%s)",
                           self.out_dir, describe_holder(self.lock.previous))  # fmt: skip
        seed_everything(int(cfg.run.seed) + self.rank)
        tc = cfg.train
        if self.device.type == "cpu" and tc.precision != "fp32":
            logger.info("train.precision=%s applies to CUDA only; this CPU run uses fp32", tc.precision)
        self._refuse_used_folder()

        self.task = self.make_task(cfg, self.device)
        self.train_set = self.task.dataset(str(cfg.data.train_split), "train")
        self.val_set = self.task.dataset(str(cfg.data.val_split), "eval") if int(tc.eval_every) > 0 else None
        if self.val_set is not None and hasattr(self.val_set, "mask_paths"):
            begin = time.time()
            count = check_val_files(self.val_set, str(cfg.data.val_split))
            logger.info("checked the headers of %d validation images and masks in %.1f s", count, time.time() - begin)
        self.model = self.task.build_model().to(self.device)
        if bool(tc.compile):
            compile_model(self.model)
        groups = self.task.param_groups(self.model)
        self.optimizer = build_optimizer(
            groups, tc.betas, float(tc.weight_decay), str(tc.optimizer), float(tc.momentum)
        )
        use_scaler = tc.precision == "fp16" and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.generator = torch.Generator().manual_seed(int(cfg.run.seed) * 7919 + self.rank)  # views, local crops
        self.start_step, self.best = 0, restore_best(None, self.task.metrics)
        # Training samples this rank had consumed at start_step (the sampler's position; a checkpoint records it, so
        # a batch size changed on resume with train.resume_allow_changes neither repeats nor skips images).
        self.samples_at_start: int | None = None
        # This rank's RNG state from the checkpoint, restored in fit() right before the first step.
        self._start_rng: dict[str, Any] | None = None
        resumed = self._resume()
        if self.rank == 0:
            save_config(cfg, self.out_dir)
        self.metrics = MetricsWriter(self.out_dir, self.rank, resume_step=self.start_step)
        if resumed is not None:
            self.metrics.log(self.start_step, resumed, kind="resume")
        if self.samples_at_start is None:
            self.samples_at_start = self.start_step * int(tc.batch_size) * int(tc.accum_steps)
        sampler = InfiniteSampler(len(self.train_set), self.rank, self.world, int(cfg.run.seed),
                                  start=self.samples_at_start)  # fmt: skip
        workers = int(cfg.data.num_workers)
        # Its own generator: iter(loader) draws the workers' base seed from it, not from torch's global stream. Items
        # do not depend on that seed (crops come from the sampler's per-sample seeds).
        self.loader_generator = torch.Generator().manual_seed(int(cfg.run.seed) * 104_729 + self.rank)
        self.loader = DataLoader(
            self.train_set, batch_size=int(tc.batch_size), sampler=sampler, num_workers=workers, drop_last=True,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0, generator=self.loader_generator,
        )  # fmt: skip
        self._log_setup()

    def _resume(self) -> dict[str, Any] | None:
        """Restore the checkpoint named by train.resume; returns the ``resume`` record for metrics.jsonl, or None."""
        resume = self.cfg.train.resume
        if resume is None:
            return None
        if self.rank == 0:
            for partial in remove_partial_files(self.out_dir):
                logger.info("removed %s, a checkpoint whose writing was interrupted", partial.name)
        path = find_latest(self.out_dir) if resume == "auto" else Path(resume)
        if path is None:
            logger.info("train.resume=auto: no checkpoint in %s, starting from scratch", checkpoint_dir(self.out_dir))
            return None
        payload = read_checkpoint(path)
        record = self._check_resumed_config(payload, path)
        self.start_step, extra = restore_checkpoint(payload, str(path), self.model, self.optimizer, self.scaler,
                                                    restore_rng=False)  # fmt: skip
        self._start_rng = rank_rng_state(payload, str(path))
        del payload
        self.best = self._restored_best(extra)
        if "samples_done" in extra:
            self.samples_at_start = int(extra["samples_done"])
        if "metric" in (extra.get("best") or {}):
            logger.info("%s holds the single best of older runs (best.pth); from here best_cam.pth and best_seg.pth "
                        "each keep their own metric's best", path.name)  # fmt: skip
        logger.info("resumed from %s at step %d", path, self.start_step)
        return {"checkpoint": str(path), **record}

    def _check_resumed_config(self, payload: dict[str, Any], path: Path) -> dict[str, Any]:
        """Refuse a checkpoint trained with another recipe; returns what changed, for the ``resume`` record.

        Keys of RESUME_MAY_CHANGE may differ freely; others only when train.resume_allow_changes names them (or
        their section). The checkpoint stores the resolved config it was trained with.
        """
        saved = payload.get("config")
        if saved is None:
            logger.warning("%s records no config: this resume cannot check that it continues the same recipe", path)
            return {"changed": {}, "overridden": {}}
        changes = config_changes(saved, OmegaConf.to_container(self.cfg, resolve=True))
        allowed = list(self.cfg.train.resume_allow_changes)
        free = {k: v for k, v in changes.items() if any(covers(entry, k) for entry in RESUME_MAY_CHANGE)}
        overridden = {k: v for k, v in changes.items() if k not in free and any(covers(e, k) for e in allowed)}
        refused = {k: v for k, v in changes.items() if k not in free and k not in overridden}
        if refused:
            raise ConfigError(
                f"train.resume: {path} (step {payload['step']}) was trained with other settings: "
                f"{format_changes(refused)}. Resume with the settings it was trained with, or accept the change "
                f"with train.resume_allow_changes=[{','.join(refused)}]"
            )
        if free:
            logger.info("resuming with changed settings that leave the training recipe alone: %s",
                        format_changes(free))  # fmt: skip
        if "train.max_iters" in free:
            logger.warning("train.max_iters changed %s -> %s: the learning-rate schedule of the remaining steps "
                           "follows the new length", *free["train.max_iters"])  # fmt: skip
        if overridden:
            logger.warning("train.resume_allow_changes: resuming with a changed recipe: %s", format_changes(overridden))
        return {
            "changed": {k: list(v) for k, v in free.items()},
            "overridden": {k: list(v) for k, v in overridden.items()},
        }

    def _restored_best(self, extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The per-metric best at the resumed step: the checkpoint's, improved by what the best_* files record.

        A step's checkpoint is written before that step is validated, so a best found by that validation lives only
        in its best_<metric>.pth (and the next checkpoints). Entries from after the resumed step are ignored.
        """
        best = restore_best(extra.get("best"), self.task.metrics)
        folder = checkpoint_dir(self.out_dir)
        for metric in self.task.metrics:
            path = folder / best_file(metric)
            if not path.is_file():
                continue
            try:  # mmap: only the pickled metadata is read, not the weights
                saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("extra", {})
                entry = restore_best(saved.get("best"), self.task.metrics)[metric]
            except Exception as err:
                logger.warning("cannot read the best score recorded in %s (%s); ignoring it", path, err)
                continue
            if 0 <= entry["step"] <= self.start_step and entry["score"] > best[metric]["score"]:
                best[metric] = entry
        return best

    def _log_provenance(self) -> dict[str, Any]:
        """Rank 0: log where the code came from (commit, branch, working tree) and where it runs; the first log
        line of every invocation. Returns the ``setup`` record's provenance (other ranks: {})."""
        if self.rank != 0:
            return {}
        git = git_state(REPO_ROOT)
        record = {"git": git.as_dict(), "host": socket.gethostname(), "python": platform.python_version(),
                  "torch": torch.__version__, "code": str(REPO_ROOT)}  # fmt: skip
        logger.info("code: %s, %s | python %s, torch %s | host %s", REPO_ROOT, git.describe(), record["python"],
                    record["torch"], record["host"])  # fmt: skip
        return record

    def _log_setup(self) -> None:
        tc = self.cfg.train
        global_batch = int(tc.batch_size) * int(tc.accum_steps) * self.world
        params = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for group in self.optimizer.param_groups for p in group["params"])
        logger.info(
            "%s: %s parameters (%s optimised) | device %s x %d process(es) | precision %s | global batch %d "
            "(%d per process x %d accumulation x %d) | lr %.2e (heads x%g) | %d iterations | train images %d",
            self.task.describe(), f"{params:,}", f"{trainable:,}", self.device.type, self.world,
            tc.precision if self.device.type == "cuda" else "fp32", global_batch, int(tc.batch_size),
            int(tc.accum_steps), self.world, float(tc.lr), float(tc.head_lr_mult), int(tc.max_iters),
            len(self.train_set),
        )  # fmt: skip
        self.metrics.log(self.start_step, {**self.provenance, "world_size": self.world, "global_batch": global_batch},
                         kind="setup")  # fmt: skip

    def _checkpoint(self, step: int, names: list[str]) -> None:
        """Write ``names`` (e.g. iter_000100.pth, last.pth) for ``step`` completed steps; collective.

        Also checks that every rank holds bit-identical parameters and shared buffers (the memory bank's rank-local
        accumulators excepted): data parallelism that drifted apart would make the checkpoint meaningless.
        """
        identical = dist.ranks_identical(self.model, skip=self.task.local_state)
        self.metrics.log(step, {"ranks_identical": identical, "world_size": self.world}, kind="sync")
        if not identical:
            raise RuntimeError(f"model state differs across the {self.world} ranks at step {step}; not saving")
        rng = gather_rng_states(self.generator)
        if self.rank == 0:
            folder = checkpoint_dir(self.out_dir)
            for name in names:
                save_checkpoint(
                    folder / name, model=self.model, step=step, optimizer=self.optimizer, scaler=self.scaler,
                    config=OmegaConf.to_container(self.cfg, resolve=True), rng=rng,
                    extra={"best": self.best, "samples_done": self._samples_done(step)},
                )  # fmt: skip
            prune_numbered(self.out_dir, int(self.cfg.train.keep_ckpts))
        dist.barrier()

    def _samples_done(self, step: int) -> int:
        """Training samples this rank has consumed after ``step`` completed steps."""
        per_step = int(self.cfg.train.batch_size) * int(self.cfg.train.accum_steps)
        return int(self.samples_at_start) + (step - self.start_step) * per_step

    def _micro_step(self, ddp: torch.nn.Module, batch: dict, step: int, sync: bool) -> dict[str, float]:
        accum = int(self.cfg.train.accum_steps)
        failure = None
        try:
            total, logs = self.task.loss(ddp, _to_device(batch, self.device), step, self.generator)
        except FloatingPointError as err:  # raised by losses.combine, naming the term(s)
            failure = str(err)
        # Every rank must learn of a failure on any rank before backward, or the others would wait in DDP forever. In
        # one process the failure is known here; with several, the all-reduced flag is the step's one extra host read
        # (torch.full fills it on the device: no host-to-device copy).
        failed = failure is not None
        if self.world > 1:
            flag = torch.full((1,), float(failed), device=self.device)
            failed = dist.all_reduce_sum(flag).item() > 0
        if failed:
            try:
                last = find_latest(self.out_dir)
            except CheckpointError:
                last = None
            raise TrainingDiverged(
                f"non-finite loss at step {step}: {failure or 'on another rank'}. Nothing was saved; the last good "
                f"checkpoint is {last or 'none'}. Lower train.lr or set train.grad_clip, then resume with "
                "train.resume=auto."
            )
        context = contextlib.nullcontext() if sync or not hasattr(ddp, "no_sync") else ddp.no_sync()
        with context:
            loss = total / accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        return logs

    def _optimizer_step(self) -> torch.Tensor | None:
        """Clip (train.grad_clip), step and zero the gradients; returns the gradient norm, a 0-dim tensor read only
        when it is logged (no host read per step), or None without clipping."""
        clip = float(self.cfg.train.grad_clip)
        grad_norm = None
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if clip > 0:
            params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _validate(self, done: int) -> None:
        """Validate after ``done`` steps; write ``best_cam.pth`` / ``best_seg.pth`` when that metric's best improves.

        The checkpoint of step ``done`` is already on disk, so a failure here loses no training. Validation runs with
        the random streams preserved: a run resumed from that checkpoint continues with the very same streams.
        """
        try:
            with preserved_rng():
                results, overlays = self.task.validate(self.model, self.val_set)
        except Exception as err:
            logger.error("validation after step %d failed (%s: %s). The checkpoint of step %d is saved (%s): fix the "
                         "validation data (or set train.eval_every=0), then continue with train.resume=auto", done,
                         type(err).__name__, err, done, checkpoint_dir(self.out_dir) / LAST)  # fmt: skip
            raise
        self.metrics.log(done, results, kind="val")
        panels = getattr(self.task, "overlay_panels", ())  # a task may name its overlays' panels (MSFCTask does)
        for index, image in enumerate(overlays):
            self.metrics.log_image(done, f"val/{index}", image, panels)
        logger.info("step %d validation: %s", done, "  ".join(f"{k} {v:.4f}" for k, v in results.items()))
        # The step just trained is done - 1 (the phase of step done may score a head that has not trained yet).
        tracked = self.task.tracked_metrics(done - 1)
        improved = [metric for metric in tracked if results[metric] > self.best[metric]["score"]]
        for metric in improved:  # results are all-reduced: every rank takes the same branch (_checkpoint is collective)
            self.best[metric] = {"score": float(results[metric]), "step": done}
            logger.info("new best %s %.4f at step %d (%s)", metric, results[metric], done, best_file(metric))
        if improved:  # last.pth again too: it was written before this validation, so without the new best
            self._checkpoint(done, [*(best_file(metric) for metric in improved), LAST])

    def fit(self) -> dict[str, dict[str, Any]]:
        """Train to ``train.max_iters`` (or ``train.stop_iter``); returns the per-metric best (:func:`restore_best`)."""
        tc = self.cfg.train
        max_iters, accum = int(tc.max_iters), int(tc.accum_steps)
        # the schedule always spans max_iters; stop_iter only ends this invocation early (resume continues it)
        end = max_iters if tc.stop_iter is None else min(max_iters, int(tc.stop_iter))
        stream = iter(self.loader)
        if self._start_rng is not None:
            # Restored only now, after every draw of the set-up: the first step sees exactly the streams that the
            # interrupted run had right after its checkpoint.
            set_rng_state(self._start_rng, self.generator)
            self._start_rng = None
        ddp, phase = None, None
        log_every, start = max(1, int(tc.log_every)), time.time()
        clock = StepClock(self.start_step, max_iters)
        # a bar on a terminal only: elsewhere (nohup, SLURM) the log lines below tell the pace
        progress = tqdm(range(self.start_step, end), initial=self.start_step, total=max_iters,
                        disable=self.rank != 0 or not is_terminal(), desc="train", dynamic_ncols=True)  # fmt: skip
        window: list[dict[str, float]] = []
        for step in progress:
            current = self.task.phase(step)
            if current != phase:  # curriculum phase change: freeze idle parts, rebuild DDP over what trains
                self.task.enter_phase(self.model, current)
                ddp, phase = _wrap(self.model, self.device), current
                logger.info("step %d: trainable heads %s", step, current)
            lrs = set_lr(self.optimizer, lr_factor(step, max_iters, int(tc.warmup_iters), float(tc.warmup_ratio),
                                                   float(tc.poly_power)))  # fmt: skip
            self.model.train()
            for micro in range(accum):
                logs = self._micro_step(ddp, next(stream), step, sync=micro == accum - 1)
                window.append(logs)
            grad_norm = self._optimizer_step()
            self.task.after_optimizer_step(self.model, step)
            done = step + 1
            if done % log_every == 0 or done == max_iters:
                record = self._summarise(window, lrs, grad_norm, done, start, clock.lap(done))
                progress.set_postfix(loss=f"{record['loss_total']:.3f}")
                window = []
            validate_now = int(tc.eval_every) > 0 and (done % int(tc.eval_every) == 0 or done == max_iters)
            # Checkpoint first: a validation that fails (a broken val file, an out-of-memory) then loses nothing.
            if done % int(tc.ckpt_every) == 0 or done == end:
                self._checkpoint(done, [f"iter_{done:06d}.pth", LAST])
            elif validate_now:
                self._checkpoint(done, [LAST])
            if validate_now:
                self._validate(done)
        progress.close()
        self.metrics.close()
        return self.best

    def _summarise(self, window: list[dict[str, float]], lrs: dict, grad_norm: torch.Tensor | None, done: int,
                   start: float, pace: dict[str, float]) -> dict[str, float]:  # fmt: skip
        """Average the window's logs over steps and ranks, write the ``train`` record and the step's log line.

        Besides the losses, the record holds ``lr`` (the learning rate of the last step, backbone group) and
        ``lr_<group>``, ``grad_norm`` (with clipping), ``seconds`` (since this invocation's start), ``sec_per_it`` and
        ``eta_s`` (:class:`utils.logging.StepClock`) and on CUDA ``cuda_peak_gib`` (rank 0's peak allocated memory,
        allocator statistics: no device synchronisation). Everything here is read once per log line.
        """
        keys = sorted({key for logs in window for key in logs})
        means = {key: float(np.mean([logs[key] for logs in window if key in logs])) for key in keys}
        # ranks may lack a key (e.g. L_mem skipped on one): average what every rank has
        shared = dist.all_gather_object(sorted(means))
        common = set(shared[0]).intersection(*map(set, shared[1:]))
        record = dist.reduce_dict_mean({k: v for k, v in means.items() if k in common}, self.device)
        record["lr"] = _main_lr(lrs)
        record.update({f"lr_{name}": lr for name, lr in lrs.items() if not name.endswith("_no_decay")})
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)  # read here, once per log line
        record["seconds"] = time.time() - start
        record.update(pace)
        if self.device.type == "cuda":
            record["cuda_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.metrics.log(done, record)
        logger.info("step %d/%d  %s  %s", done, int(self.cfg.train.max_iters), _pace_text(record),
                    "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k.startswith("loss_")))  # fmt: skip
        return record


def _main_lr(lrs: Mapping[str, float]) -> float:
    """The learning rate a log line shows: the ``backbone`` group's, else the first group's."""
    return float(lrs["backbone"] if "backbone" in lrs else next(iter(lrs.values())))


def _pace_text(record: Mapping[str, float]) -> str:
    """``lr 6.00e-05  0.781 s/it  ETA 4:20:10  cuda peak 12.31 GiB`` (the last on CUDA only) of a train record."""
    text = f"lr {record['lr']:.2e}  {record['sec_per_it']:.3g} s/it  ETA {format_duration(record['eta_s'])}"
    if "cuda_peak_gib" in record:
        text += f"  cuda peak {record['cuda_peak_gib']:.2f} GiB"
    return text
