"""One rank's training objects and the plain-PyTorch train step, epoch and validation pass (no Ray here).

:func:`build_worker` decides everything once (precision, DDP no-sync, mixup, EMA, clipping, erasing, schedule) so
:func:`train_step` does not branch on configuration. The Ray edges (dataset shards, checkpoints, reports) live in
:mod:`cls_ray.train.loop`; keeping this module free of Ray lets the step be tested, and run on a GPU, on its own.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cls_ray.config import Config
from cls_ray.data.transforms import normalize
from cls_ray.metrics import ClassificationMetrics
from cls_ray.models import create_model, set_train_mode
from cls_ray.train import components as C
from cls_ray.train.spec import RunSpec
from cls_ray.train.state import Progress, TrainObjects


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


def build_worker(
    cfg: Config, spec: RunSpec, device: torch.device, wrap: Callable[[nn.Module], nn.Module] = lambda model: model
) -> Worker:
    """Create the model, DDP wrapper, optimizer, schedule, loss, mixup, EMA and precision objects of one rank.

    Args:
        cfg: The run's config.
        spec: The dataset facts the driver resolved.
        device: This rank's device.
        wrap: Wraps the model for data parallelism (``ray.train.torch.prepare_model`` under Ray Train).
    """
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = create_model(cfg.model, len(spec.classes)).to(device=device, memory_format=memory_format)
    ema = C.create_ema(model, cfg.train)
    optimizer, scheduler = C.create_optimizer_and_scheduler(model, cfg, spec.updates_per_epoch)
    precision = C.create_precision(cfg.train.amp, device)
    ddp = wrap(model)
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


def train_one_epoch(
    w: Worker, batches: Iterable, progress: Progress, on_step: Callable[[int, int, float], None] | None = None
) -> dict[str, float]:
    """Train over this rank's shard once; returns loss, throughput and data-wait share summed over all ranks.
    ``on_step(steps, samples, data_wait_s)``, if given, runs after every step (rank 0's live progress)."""
    set_train_mode(w.objs.model)  # frozen modules stay in eval mode (frozen BatchNorm statistics)
    clock = {"wait": 0.0}
    loss_sum = torch.zeros((), device=w.device)
    samples = 0
    start = time.perf_counter()
    for i, (batch, last) in enumerate(_with_last(_timed(batches, clock))):
        loss = train_step(w, batch, update=last or (i + 1) % w.accum == 0, progress=progress)
        loss_sum += loss * len(batch["label"])
        samples += len(batch["label"])
        if on_step is not None:
            on_step(i + 1, samples, clock["wait"])
    elapsed = time.perf_counter() - start
    # On the device: NCCL reduces only CUDA tensors.
    totals = torch.tensor([loss_sum.item(), samples, clock["wait"], elapsed], dtype=torch.float64, device=w.device)
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


def distribute_bn_stats(w: Worker, mode: str) -> None:
    """Equalise BatchNorm running statistics over the ranks (model and EMA) with timm's ``distribute_bn``.

    DDP keeps each rank's running statistics from its own batches; unequalised, ranks would validate slightly
    different models and the metrics would not be those of the checkpoint rank 0 writes.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    from timm.utils import distribute_bn

    world = dist.get_world_size()
    distribute_bn(w.objs.model, world, reduce=mode == "reduce")
    if w.objs.ema is not None:
        distribute_bn(w.objs.ema.module, world, reduce=mode == "reduce")


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
