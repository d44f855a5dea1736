"""What the driver resolved once for every worker of a run (the ``spec`` in ``train_loop_config``).

A module of its own that imports nothing heavy: Ray Train's controller unpickles the ``train_loop_config`` with the
run's context, which imports the module each object's class lives in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class RunSpec:
    """What the driver resolved once for every worker: the dataset's facts and where the run lives."""

    classes: list[str]
    class_counts: list[int]
    """Train rows per label (class-weighted loss)."""
    data_config: dict[str, Any]
    """timm data config of the model (mean/std for on-device normalisation)."""
    run_uri: str
    """``{storage_path}/{run_name}``: holds the checkpoints and the metrics history (:mod:`cls_ray.train.history`)."""
    updates_per_epoch: int
    """Optimizer updates per epoch on each worker (per-update LR schedules)."""
    train_beton_uri: str | None = None
    """``data.format=ffcv``: the train split's .beton, which every worker reads itself."""
    dataset_digest: str = ""
    """The manifest's digest (keys the per-node copy of a .beton on S3)."""
    batches_per_epoch: int = 0
    """Batches each worker trains on per epoch (the live progress bar's length)."""
    progress: Any = None
    """The driver's :class:`cls_ray.progress.ProgressBoard` (an actor handle) rank 0 reports its steps to; None for
    Tune trials (their progress is Tune's trial table)."""
    mlflow: dict[str, Any] | None = None
    """``train.tracking`` names mlflow and the server answered: the MLflow run rank 0 logs to
    (:func:`cls_ray.tracking.start_mlflow_run`)."""
