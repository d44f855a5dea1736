"""Everything a worker trains with, decided once at setup as objects so the train step never branches on config.

Mixed precision becomes an autocast factory and a GradScaler (disabled unless fp16 on GPU); mixup becomes a
callable (identity when off); EMA, gradient clipping, random erasing and the LR schedule become objects whose
no-op versions do nothing. The factories are timm's (``create_optimizer_v2``, ``create_scheduler_v2``, ``Mixup``,
``ModelEmaV3``, ``RandomErasing``); the losses are torch's or timm's, plus a softmax focal loss.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn

from cls_ray.config import Config, TrainConfig


class SoftmaxFocalLoss(nn.Module):
    """Focal loss over a softmax (Lin et al., 2017, multi-class form): ``-sum_c w_c t_c (1 - p_c)^gamma log p_c``.

    Takes integer labels (smoothed like ``nn.CrossEntropyLoss``) or soft targets from mixup.

    Args:
        gamma: Focusing parameter; 0 gives (weighted) cross-entropy.
        weight: Optional per-class weights.
        label_smoothing: Smoothing applied to integer labels.
    """

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=-1)
        if target.ndim == 1:
            n = logits.shape[-1]
            target = F.one_hot(target, n).float() * (1 - self.label_smoothing) + self.label_smoothing / n
        loss = -target * (1 - log_p.exp()).pow(self.gamma) * log_p
        if self.weight is not None:
            loss = loss * self.weight
        return loss.sum(dim=-1).mean()


def class_weights(class_counts: list[int]) -> torch.Tensor:
    """``N / (C * count_c)`` per class (1 for a balanced split); classes absent from the split get 0."""
    counts = torch.tensor(class_counts, dtype=torch.float32)
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def mixup_active(cfg: Config) -> bool:
    return cfg.data.mixup > 0 or cfg.data.cutmix > 0


def create_criterion(cfg: Config, class_counts: list[int], device: torch.device) -> nn.Module:
    """The training loss: focal or cross-entropy, class-weighted or not, on hard or mixup-soft targets."""
    weight = class_weights(class_counts).to(device) if cfg.train.class_weighted_loss else None
    # With mixup the targets arrive already smoothed and mixed (timm Mixup does the smoothing).
    smoothing = 0.0 if mixup_active(cfg) else cfg.data.label_smoothing
    if cfg.train.loss == "focal":
        return SoftmaxFocalLoss(cfg.train.focal_gamma, weight, smoothing).to(device)
    if mixup_active(cfg) and weight is None:
        return SoftTargetCrossEntropy()
    # torch's cross-entropy takes class-probability targets too, so it also serves weighted mixup.
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing)


def create_mixup(cfg: Config, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], tuple]:
    """timm ``Mixup`` (mixup / cutmix with label smoothing), or the identity when both are off."""
    if not mixup_active(cfg):
        return lambda images, targets: (images, targets)
    return Mixup(
        mixup_alpha=cfg.data.mixup,
        cutmix_alpha=cfg.data.cutmix,
        prob=cfg.data.mixup_prob,
        switch_prob=cfg.data.mixup_switch_prob,
        label_smoothing=cfg.data.label_smoothing,
        num_classes=num_classes,
    )


def create_random_erasing(cfg: Config, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """timm ``RandomErasing`` on normalised batches on the device (per-pixel noise), or the identity."""
    if cfg.data.re_prob <= 0:
        return lambda images: images
    return RandomErasing(probability=cfg.data.re_prob, mode="pixel", device=str(device))


class _NoSchedule:
    """Stands in for a timm scheduler when ``optim.sched`` is ``none``."""

    def step(self, epoch: int, metric: float | None = None) -> None:
        pass

    def step_update(self, num_updates: int, metric: float | None = None) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def create_optimizer_and_scheduler(model: nn.Module, cfg: Config, updates_per_epoch: int) -> tuple[Any, Any]:
    """timm optimizer (no weight decay on norms and biases) and a warmup + cosine / step schedule."""
    o = cfg.optim
    optimizer = create_optimizer_v2(model, o.optimizer, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)
    if o.sched == "none":
        return optimizer, _NoSchedule()
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=o.sched,
        num_epochs=cfg.train.epochs,
        decay_epochs=o.decay_epochs,
        decay_rate=o.decay_rate,
        min_lr=o.min_lr,
        warmup_lr=o.warmup_lr,
        warmup_epochs=o.warmup_epochs,
        step_on_epochs=not o.sched_on_updates,
        updates_per_epoch=max(1, updates_per_epoch),
    )
    return optimizer, scheduler


class _NoEma:
    """Stands in for ``ModelEmaV3`` when EMA is off."""

    module = None

    def update(self, model: nn.Module, step: int | None = None) -> None:
        pass


def create_ema(model: nn.Module, train: TrainConfig) -> ModelEmaV3 | _NoEma:
    # Warmup lets short runs benefit: the decay ramps up to ``ema_decay`` over the first updates.
    return ModelEmaV3(model, decay=train.ema_decay, use_warmup=True) if train.ema else _NoEma()


@dataclass
class Precision:
    """Mixed precision, decided once: ``autocast()`` is a context manager, ``scaler`` a (maybe disabled) scaler."""

    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None


def create_precision(amp: str, device: torch.device) -> Precision:
    """bf16 / fp16 autocast on CUDA (a GradScaler only for fp16); full precision elsewhere."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp) if device.type == "cuda" else None
    autocast = functools.partial(torch.autocast, device.type, dtype=dtype) if dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    return Precision(autocast=autocast, scaler=scaler, dtype=dtype)


def create_grad_clip(max_norm: float | None) -> Callable[[nn.Module], None]:
    """Clip the global gradient norm (after the scaler unscaled the gradients), or do nothing."""
    if max_norm is None:
        return lambda model: None
    return lambda model: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
