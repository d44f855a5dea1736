"""Checkpoint files: the full train state, written by rank 0 and read back by every rank on resume.

A checkpoint directory holds

- ``model.safetensors``: the raw model weights (what a package is built from when EMA is off);
- ``ema.safetensors``: the EMA weights, when EMA is on;
- ``train_state.pt``: optimizer, LR scheduler, GradScaler and the RNG states of every rank, read back with
  ``torch.load(weights_only=True)`` (tensors and plain containers only: no pickle from storage);
- ``checkpoint.json``: epoch, update count, early-stopping progress and this epoch's flat metrics;
- ``evaluation.json``: this epoch's per-class metrics and confusion matrix.

Nothing in a checkpoint grows with the epochs: the per-epoch history lives apart (:mod:`cls_ray.train.history`).

Knows nothing of Ray: the loop hands it plain directories.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_FILE = "model.safetensors"
EMA_WEIGHTS_FILE = "ema.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "checkpoint.json"
EVALUATION_FILE = "evaluation.json"


@dataclass
class Progress:
    """Where training stands; saved in ``checkpoint.json``."""

    epoch: int = 0
    """Epochs completed."""
    num_updates: int = 0
    """Optimizer updates done."""
    best_metric: float | None = None
    """Best value of ``train.metric`` so far."""
    evals_since_best: int = 0
    """Evaluations since the best one (early stopping)."""
    last_eval: dict[str, float] = field(default_factory=dict)
    """Flat metrics of the latest evaluation (carried by every report)."""
    resumed_from: int | None = None
    """The checkpoint epoch this process resumed from (None for a fresh start); recorded in the history."""


@dataclass
class TrainObjects:
    """The stateful objects of a run (the model unwrapped from DDP / compile)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    ema: nn.Module | None


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states as tensors and plain values (``weights_only``-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "python": [version, list(py_state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_train_state(
    directory: str,
    objs: TrainObjects,
    progress: Progress,
    rng_states: list[dict],
    evaluation: dict[str, Any] | None = None,
) -> None:
    """Write a complete checkpoint into a local ``directory`` (rank 0 only; ``rng_states`` holds every rank's;
    ``evaluation``: this epoch's per-class metrics and confusion matrix)."""
    os.makedirs(directory, exist_ok=True)
    save_file(_weights(objs.model), os.path.join(directory, WEIGHTS_FILE))
    if objs.ema is not None:
        save_file(_weights(objs.ema.module), os.path.join(directory, EMA_WEIGHTS_FILE))
    state = {
        "optimizer": objs.optimizer.state_dict(),
        "scheduler": objs.scheduler.state_dict() if objs.scheduler is not None else {},
        "scaler": objs.scaler.state_dict(),
        "rng": rng_states,
    }
    torch.save(state, os.path.join(directory, STATE_FILE))
    if evaluation is not None:
        with open(os.path.join(directory, EVALUATION_FILE), "w") as f:
            json.dump(evaluation, f, separators=(",", ":"))
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(asdict(progress), f)


def load_train_state(directory: str, objs: TrainObjects, rank: int, world_size: int) -> Progress:
    """Restore ``objs`` in place from a checkpoint directory and return the saved :class:`Progress`.

    Each rank restores its own RNG state when the world size is unchanged; after a resize the ranks keep the
    fresh per-rank seeds they started with.
    """
    objs.model.load_state_dict(load_file(os.path.join(directory, WEIGHTS_FILE)))
    ema_path = os.path.join(directory, EMA_WEIGHTS_FILE)
    if objs.ema is not None and os.path.exists(ema_path):
        objs.ema.module.load_state_dict(load_file(ema_path))
    elif objs.ema is not None:
        objs.ema.module.load_state_dict(objs.model.state_dict())
    state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    objs.optimizer.load_state_dict(state["optimizer"])
    if objs.scheduler is not None and state["scheduler"]:
        objs.scheduler.load_state_dict(state["scheduler"])
    objs.scaler.load_state_dict(state["scaler"])
    if len(state["rng"]) == world_size:
        restore_rng_state(state["rng"][rank])
    return read_progress(directory)


def read_progress(directory: str) -> Progress:
    with open(os.path.join(directory, META_FILE)) as f:
        saved = json.load(f)
    # Checkpoints of earlier versions also carried the whole history; it lives in RUN/history/ now.
    known = {f.name for f in fields(Progress)}
    return Progress(**{k: v for k, v in saved.items() if k in known})


def read_evaluation(directory: str) -> dict[str, Any] | None:
    """The per-class metrics and confusion matrix saved with a checkpoint (None if it has none)."""
    path = os.path.join(directory, EVALUATION_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_package_weights(directory: str) -> tuple[dict[str, torch.Tensor], bool]:
    """The weights a model package is built from: EMA weights when the checkpoint has them. Returns
    ``(state_dict, is_ema)``."""
    ema_path = os.path.join(directory, EMA_WEIGHTS_FILE)
    if os.path.exists(ema_path):
        return load_file(ema_path), True
    return load_file(os.path.join(directory, WEIGHTS_FILE)), False
