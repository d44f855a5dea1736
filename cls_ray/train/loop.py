"""The per-worker training loop Ray Train runs on every DDP rank: the Ray edges around :mod:`cls_ray.train.step`.

In: the run's config and dataset facts, this rank's dataset shards, the checkpoint to resume from
(``ray.train.get_checkpoint()``). Out: one ``ray.train.report`` per epoch from every rank; on evaluation epochs rank 0
attaches the full train state as a checkpoint; rank 0 writes each epoch's history record once
(:mod:`cls_ray.train.history`).
"""

from __future__ import annotations

import logging
import os
import posixpath
import random
import tempfile
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from cls_ray import telemetry
from cls_ray.config import Config
from cls_ray.data.pipeline import iter_eval_batches, iter_train_batches
from cls_ray.progress import StepReporter
from cls_ray.tracking import EpochTracker
from cls_ray.train.history import drop_records_after, write_record
from cls_ray.train.spec import RunSpec
from cls_ray.train.state import Progress, capture_rng_state, load_train_state, save_train_state
from cls_ray.train.step import Worker, build_worker, distribute_bn_stats, train_one_epoch, validate

logger = logging.getLogger(__name__)


def _improved(progress: Progress, cfg: Config) -> bool:
    value = progress.last_eval.get(cfg.train.metric)
    if value is None:
        return False
    best = progress.best_metric
    better = best is None or (value > best if cfg.train.metric_mode == "max" else value < best)
    if better:
        progress.best_metric, progress.evals_since_best = value, 0
    else:
        progress.evals_since_best += 1
    return better


def _report(
    w: Worker, progress: Progress, metrics: dict[str, float], evaluation: dict[str, Any] | None, rank: int
) -> None:
    """Every rank reports; on evaluation epochs (``evaluation`` given) rank 0 attaches the full train state (all
    ranks' RNG included) and the evaluation's per-class metrics and confusion matrix as a checkpoint."""
    name = f"epoch-{progress.epoch:04d}"
    if evaluation is None:
        ray.train.report(metrics)
        return
    rng_states = [None] * dist.get_world_size() if dist.is_initialized() else [capture_rng_state()]
    if dist.is_initialized():
        dist.all_gather_object(rng_states, capture_rng_state())
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory(prefix="cls-ray-ckpt-") as tmp:
        save_train_state(tmp, w.objs, progress, rng_states, evaluation)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)


def format_progress(metrics: dict[str, float], epochs: int) -> str:
    """The one log line per epoch."""
    line = (
        f"epoch {int(metrics['epoch'])}/{epochs} | train_loss {metrics['train_loss']:.4f} | "
        f"{metrics['img_per_s']:.0f} img/s | data wait {metrics['data_wait_frac']:.0%} | lr {metrics['lr']:.2e}"
    )
    if "val_top1" in metrics:
        line += (
            f" | val_loss {metrics['val_loss']:.4f} top1 {metrics['val_top1']:.4f} "
            f"top5 {metrics['val_top5']:.4f} f1_macro {metrics['val_f1_macro']:.4f}"
        )
    return line


def _seed(seed: int, rank: int) -> None:
    # Different per rank (independent augmentation and mixup draws), reproducible per run.
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def _setup_logging() -> None:
    # Ray worker processes start with an unconfigured root logger; the rank-0 progress lines should reach the
    # driver console (Ray forwards worker stdout/stderr).
    pkg = logging.getLogger("cls_ray")
    if not pkg.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        pkg.addHandler(handler)
        pkg.setLevel(logging.INFO)
        pkg.propagate = False  # Ray's handler on the worker's root logger would print every line a second time


def _resume(w: Worker, spec: RunSpec, rank: int, world: int, tracker: EpochTracker | None) -> Progress:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        if rank == 0:
            drop_records_after(spec.run_uri, 0)  # a fresh start of a run whose attempt died before any checkpoint
            if tracker is not None:
                tracker.drop_after(0)
        return Progress()
    with checkpoint.as_directory() as directory:
        progress = load_train_state(directory, w.objs, rank, world)
    progress.resumed_from = progress.epoch
    if rank == 0:
        dropped = drop_records_after(spec.run_uri, progress.epoch)
        if tracker is not None:
            tracker.drop_after(progress.epoch)
        logger.info(
            "resumed from %s after epoch %d%s",
            os.path.basename(checkpoint.path),
            progress.epoch,
            f" (epochs {dropped[0]}-{dropped[-1]} run again)" if dropped else "",
        )
    return progress


def end_epoch(run_uri: str, progress: Progress, metrics: dict[str, float], evaluation: dict[str, Any] | None) -> None:
    """Rank 0's record of epoch ``progress.epoch`` in the run's history, written once."""
    per_class = {"per_class": evaluation["per_class"]} if evaluation is not None else {}
    write_record(
        run_uri, {**metrics, **per_class, "evaluated": evaluation is not None, "resumed_from": progress.resumed_from}
    )


def _train_batches(cfg: Config, spec: RunSpec, world: int, device: torch.device) -> Any:
    """``epoch -> batches`` of this rank: its Ray Data shard, or (``data.format=ffcv``) its FFCV loader."""
    if spec.train_beton_uri is None:
        shard = ray.train.get_dataset_shard("train")
        return lambda epoch: iter_train_batches(shard, cfg.data, device)
    from cls_ray.data.ffcv_format import FFCVTrainBatches, local_beton

    path = local_beton(spec.train_beton_uri, spec.dataset_digest)
    return FFCVTrainBatches(path, spec.data_config, cfg, world, device).epoch


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` holds ``cfg`` (:class:`Config`) and ``spec`` (:class:`RunSpec`)."""
    cfg: Config = config["cfg"]
    spec: RunSpec = config["spec"]
    _setup_logging()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    _seed(cfg.train.seed, rank)
    device = ray.train.torch.get_device()
    w = build_worker(cfg, spec, device, wrap=lambda model: ray.train.torch.prepare_model(model, move_to_device=False))
    # Rank 0 tracks the run (train.tracking): MLflow through Ray's setup_mlflow, TensorBoard event files.
    tracker = EpochTracker(cfg.train.tracking, spec.run_uri, spec.mlflow) if rank == 0 and cfg.train.tracking else None
    progress = _resume(w, spec, rank, world, tracker)
    train_batches = _train_batches(cfg, spec, world, device)
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(progress.epoch + 1, cfg.train.epochs + 1):
        on_step = None
        if rank == 0 and spec.progress is not None:
            on_step = StepReporter(spec.progress, epoch, cfg.train.epochs, spec.batches_per_epoch)
        metrics = {"epoch": epoch, **train_one_epoch(w, train_batches(epoch), progress, on_step)}
        w.objs.scheduler.step(epoch)
        evaluation: dict[str, Any] | None = None
        stop = False
        if epoch % cfg.train.eval_every == 0 or epoch == cfg.train.epochs:
            distribute_bn_stats(w, cfg.train.dist_bn)
            progress.last_eval, evaluation = validate(w, iter_eval_batches(val_shard, cfg.data, device))
            patience = cfg.train.early_stopping_patience
            stop = not _improved(progress, cfg) and patience is not None and progress.evals_since_best >= patience
        metrics.update(progress.last_eval)
        progress.epoch = epoch
        if rank == 0:
            # Before the checkpoint: a process lost in between resumes from the previous one, which drops this record.
            end_epoch(spec.run_uri, progress, metrics, evaluation)
            if tracker is not None:
                tracker.log_epoch(epoch, metrics)
        _report(w, progress, metrics, evaluation, rank=rank)
        telemetry.record_epoch(posixpath.basename(spec.run_uri.rstrip("/")), rank, metrics)
        if rank == 0 and spec.progress is not None:
            spec.progress.epoch.remote(metrics)  # the driver prints the epoch's line
        elif rank == 0:
            logger.info(format_progress(metrics, cfg.train.epochs))
        if stop:
            if rank == 0:
                logger.info("early stopping: %s has not improved for %d evaluations", cfg.train.metric, patience)
            break
