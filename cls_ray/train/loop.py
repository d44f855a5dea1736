"""The per-worker training loop Ray Train runs on every DDP rank.

Ray calls sit at the edges (context, dataset shards, checkpoint in, report out); the middle is plain PyTorch: build
the objects once (:func:`build_worker`), then epochs of :func:`train_step`, a validation pass whose torchmetrics
sync across ranks, and one ``ray.train.report`` per epoch from every rank. Rank 0 writes the checkpoint (on every
evaluation epoch) and the metrics history file; every rank resumes from ``ray.train.get_checkpoint()``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cls_ray import storage
from cls_ray.config import Config
from cls_ray.data.pipeline import iter_eval_batches, iter_train_batches
from cls_ray.data.transforms import normalize
from cls_ray.metrics import ClassificationMetrics
from cls_ray.models import create_model, set_train_mode
from cls_ray.train import components as C
from cls_ray.train.state import Progress, TrainObjects, capture_rng_state, load_train_state, save_train_state

logger = logging.getLogger(__name__)

HISTORY_FILE = "metrics.jsonl"


@dataclass
class RunSpec:
    """What the driver resolved once for every worker: the dataset's facts and where the run lives."""

    classes: list[str]
    class_counts: list[int]
    """Train rows per label (class-weighted loss)."""
    data_config: dict[str, Any]
    """timm data config of the model (mean/std for on-device normalisation)."""
    run_uri: str
    """``{storage_path}/{run_name}``: holds the checkpoints and :data:`HISTORY_FILE`."""
    updates_per_epoch: int
    """Optimizer updates per epoch on each worker (per-update LR schedules)."""


@dataclass
class Worker:
    """One rank's training objects, built once by :func:`build_worker`."""

    objs: TrainObjects
    forward: nn.Module
    """What the train step calls: DDP-wrapped and maybe compiled."""
    no_sync: Callable[[], contextlib.AbstractContextManager]
    criterion: nn.Module
    mixup: Callable
    erase: Callable[[torch.Tensor], torch.Tensor]
    precision: C.Precision
    clip: Callable[[nn.Module], None]
    metrics: ClassificationMetrics
    mean: list[float]
    std: list[float]
    memory_format: torch.memory_format
    accum: int
    device: torch.device
    ema: Any
    """``ModelEmaV3`` or a no-op stand-in (``objs.ema`` is None when EMA is off)."""


def build_worker(cfg: Config, spec: RunSpec, device: torch.device) -> Worker:
    """Create the model, DDP wrapper, optimizer, schedule, loss, mixup, EMA and precision objects of one rank."""
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = create_model(cfg.model, len(spec.classes)).to(device=device, memory_format=memory_format)
    ema = C.create_ema(model, cfg.train)
    optimizer, scheduler = C.create_optimizer_and_scheduler(model, cfg, spec.updates_per_epoch)
    precision = C.create_precision(cfg.train.amp, device)
    ddp = ray.train.torch.prepare_model(model, move_to_device=False)
    forward = torch.compile(ddp) if cfg.model.compile else ddp
    return Worker(
        objs=TrainObjects(model, optimizer, scheduler, precision.scaler, ema if cfg.train.ema else None),
        forward=forward,
        no_sync=ddp.no_sync if isinstance(ddp, DistributedDataParallel) else contextlib.nullcontext,
        criterion=C.create_criterion(cfg, spec.class_counts, device),
        mixup=C.create_mixup(cfg, len(spec.classes)),
        erase=C.create_random_erasing(cfg, device),
        precision=precision,
        clip=C.create_grad_clip(cfg.optim.grad_clip),
        metrics=ClassificationMetrics(len(spec.classes), device),
        mean=spec.data_config["mean"],
        std=spec.data_config["std"],
        memory_format=memory_format,
        accum=cfg.optim.grad_accum_steps,
        device=device,
        ema=ema,
    )


def _inputs(w: Worker, images: torch.Tensor) -> torch.Tensor:
    return normalize(images, w.mean, w.std).contiguous(memory_format=w.memory_format)


def train_step(w: Worker, batch: dict[str, torch.Tensor], update: bool, progress: Progress) -> torch.Tensor:
    """One micro-batch: forward + backward (no DDP all-reduce unless ``update``), then maybe one optimizer update."""
    images, targets = w.mixup(w.erase(_inputs(w, batch["image"])), batch["label"])
    sync = contextlib.nullcontext() if update else w.no_sync()
    with sync:
        with w.precision.autocast():
            loss = w.criterion(w.forward(images), targets)
        w.precision.scaler.scale(loss / w.accum).backward()
    if update:
        optimizer, scaler = w.objs.optimizer, w.precision.scaler
        scaler.unscale_(optimizer)
        w.clip(w.objs.model)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        progress.num_updates += 1
        w.ema.update(w.objs.model, step=progress.num_updates)
        w.objs.scheduler.step_update(num_updates=progress.num_updates)
    return loss.detach()


def _timed(batches: Iterable, clock: dict[str, float]) -> Iterator:
    """Yield from ``batches``, adding the time spent waiting for each batch to ``clock["wait"]``."""
    it = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        finally:
            clock["wait"] += time.perf_counter() - start
        yield batch


def _with_last(items: Iterable) -> Iterator[tuple[Any, bool]]:
    """``(item, is_last)`` pairs, so the last micro-batch of an epoch always completes an update."""
    it = iter(items)
    try:
        current = next(it)
    except StopIteration:
        return
    for following in it:
        yield current, False
        current = following
    yield current, True


def train_one_epoch(w: Worker, batches: Iterable, progress: Progress) -> dict[str, float]:
    """Train over this rank's shard once; returns loss, throughput and data-wait share summed over all ranks."""
    set_train_mode(w.objs.model)  # frozen modules stay in eval mode (frozen BatchNorm statistics)
    clock = {"wait": 0.0}
    loss_sum = torch.zeros((), device=w.device)
    samples = 0
    start = time.perf_counter()
    for i, (batch, last) in enumerate(_with_last(_timed(batches, clock))):
        loss = train_step(w, batch, update=last or (i + 1) % w.accum == 0, progress=progress)
        loss_sum += loss * len(batch["label"])
        samples += len(batch["label"])
    elapsed = time.perf_counter() - start
    totals = torch.tensor([loss_sum.item(), samples, clock["wait"], elapsed], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(totals)
    world = dist.get_world_size() if dist.is_initialized() else 1
    total_loss, total_samples, total_wait, total_time = totals.tolist()
    return {
        "train_loss": total_loss / max(total_samples, 1),
        "img_per_s": total_samples / max(total_time / world, 1e-9),
        "data_wait_frac": total_wait / max(total_time, 1e-9),
        "epoch_time_s": total_time / world,
        "lr": w.objs.optimizer.param_groups[0]["lr"],
    }


@torch.no_grad()
def validate(w: Worker, batches: Iterable) -> tuple[dict[str, float], dict[str, Any]]:
    """Evaluate (the EMA weights when EMA is on) on this rank's validation shard; metrics are synced over ranks."""
    model = w.objs.ema.module if w.objs.ema is not None else w.objs.model
    model.eval()
    w.metrics.reset()
    for batch in batches:
        with w.precision.autocast():
            logits = model(_inputs(w, batch["image"]))
        w.metrics.update(logits, batch["label"])
    scalars, details = w.metrics.compute()
    return {f"val_{k}": v for k, v in scalars.items()}, details


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


def _report(w: Worker, progress: Progress, metrics: dict[str, float], with_checkpoint: bool, rank: int) -> None:
    """Every rank reports; on checkpoint epochs rank 0 attaches the full train state (all ranks' RNG included)."""
    name = f"epoch-{progress.epoch:04d}"
    if not with_checkpoint:
        ray.train.report(metrics)
        return
    rng_states = [None] * dist.get_world_size() if dist.is_initialized() else [capture_rng_state()]
    if dist.is_initialized():
        dist.all_gather_object(rng_states, capture_rng_state())
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory(prefix="cls-ray-ckpt-") as tmp:
        save_train_state(tmp, w.objs, progress, rng_states)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)


def write_history(run_uri: str, history: list[dict[str, Any]]) -> None:
    """Rewrite the run's JSON-lines metrics history (one record per epoch, resumed runs included)."""
    lines = "".join(json.dumps(record, sort_keys=True) + "\n" for record in history)
    storage.write_bytes(storage.join(run_uri, HISTORY_FILE), lines.encode())


def format_progress(metrics: dict[str, float], epochs: int) -> str:
    """The one log line per epoch."""
    line = (f"epoch {int(metrics['epoch'])}/{epochs} | train_loss {metrics['train_loss']:.4f} | "
            f"{metrics['img_per_s']:.0f} img/s | data wait {metrics['data_wait_frac']:.0%} | lr {metrics['lr']:.2e}")
    if "val_top1" in metrics:
        line += (f" | val_loss {metrics['val_loss']:.4f} top1 {metrics['val_top1']:.4f} "
                 f"top5 {metrics['val_top5']:.4f} f1_macro {metrics['val_f1_macro']:.4f}")
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


def _resume(w: Worker, rank: int, world: int) -> Progress:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Progress()
    with checkpoint.as_directory() as directory:
        progress = load_train_state(directory, w.objs, rank, world)
    if rank == 0:
        logger.info("resumed from %s after epoch %d", os.path.basename(checkpoint.path), progress.epoch)
    return progress


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` holds ``cfg`` (:class:`Config`) and ``spec`` (:class:`RunSpec`)."""
    cfg: Config = config["cfg"]
    spec: RunSpec = config["spec"]
    _setup_logging()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    _seed(cfg.train.seed, rank)
    device = ray.train.torch.get_device()
    w = build_worker(cfg, spec, device)
    progress = _resume(w, rank, world)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    for epoch in range(progress.epoch + 1, cfg.train.epochs + 1):
        metrics = {"epoch": epoch, **train_one_epoch(w, iter_train_batches(train_shard, cfg.data, device), progress)}
        w.objs.scheduler.step(epoch)
        evaluate = epoch % cfg.train.eval_every == 0 or epoch == cfg.train.epochs
        details: dict[str, Any] = {}
        stop = False
        if evaluate:
            progress.last_eval, details = validate(w, iter_eval_batches(val_shard, cfg.data, device))
            patience = cfg.train.early_stopping_patience
            stop = not _improved(progress, cfg) and patience is not None and progress.evals_since_best >= patience
        metrics.update(progress.last_eval)
        progress.epoch = epoch
        progress.history.append({**metrics, **details, "evaluated": evaluate})
        _report(w, progress, metrics, with_checkpoint=evaluate, rank=rank)
        if rank == 0:
            write_history(spec.run_uri, progress.history)
            logger.info(format_progress(metrics, cfg.train.epochs))
        if stop:
            if rank == 0:
                logger.info("early stopping: %s has not improved for %d evaluations", cfg.train.metric, patience)
            break
