"""Classification metrics shared by training (validation epochs) and ``cls-ray evaluate``.

One :class:`ClassificationMetrics` collects loss, top-1/top-5 accuracy, macro and weighted precision/recall/F1,
per-class precision/recall/F1/support and the confusion matrix with torchmetrics. Under ``torch.distributed`` every
metric state is all-reduced when :meth:`ClassificationMetrics.compute` runs (torchmetrics' DDP sync), so each rank
may see a different, unevenly sized shard of the split and all ranks still get the metrics of the whole split.

Knows nothing of Ray: evaluation runs it in a single process.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

#: Flat scalar metrics a validation pass reports (prefixed with ``val_`` by training).
SCALAR_METRICS = (
    "loss",
    "top1",
    "top5",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
)


class ClassificationMetrics:
    """Accumulates predictions of one pass over a split; :meth:`compute` syncs across ranks.

    Args:
        num_classes: Number of classes.
        device: Device of the metric states (the device the logits are on).
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        n = num_classes
        scores: dict[str, Any] = {
            "top1": MulticlassAccuracy(n, top_k=1, average="micro"),
            # top-5 is top-min(5, n): with fewer than 5 classes every prediction is in the "top 5".
            "top5": MulticlassAccuracy(n, top_k=min(5, n), average="micro"),
            "confusion": MulticlassConfusionMatrix(n),
        }
        for avg in ("macro", "weighted", "none"):
            scores[f"precision_{avg}"] = MulticlassPrecision(n, average=avg, zero_division=0)
            scores[f"recall_{avg}"] = MulticlassRecall(n, average=avg, zero_division=0)
            scores[f"f1_{avg}"] = MulticlassF1Score(n, average=avg, zero_division=0)
        # compute_groups=False: each metric keeps its own state, so a rank with an empty shard stays consistent.
        self.scores = MetricCollection(scores, compute_groups=False).to(device)
        self.loss = MeanMetric().to(device)
        self.num_classes = n

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch: raw logits ``(N, C)`` and integer labels ``(N,)``; the loss is plain cross-entropy."""
        logits = logits.float()
        self.loss.update(F.cross_entropy(logits, target, reduction="none"))
        self.scores.update(logits, target)

    def compute(self) -> tuple[dict[str, float], dict[str, Any]]:
        """Return ``(scalars, details)``.

        ``scalars`` holds the floats of :data:`SCALAR_METRICS`; ``details`` holds ``per_class`` (a list of
        ``{"precision", "recall", "f1", "support"}`` in label order) and ``confusion_matrix`` (rows = true label,
        columns = prediction), both JSON-ready. Every rank must call this (it is a collective under DDP).
        """
        with warnings.catch_warnings():
            # A rank whose shard of a small split is empty never called update(); the synced result is still right.
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            values = self.scores.compute()
            scalars = {"loss": float(self.loss.compute())}
        scalars.update({k: float(values[k]) for k in SCALAR_METRICS if k != "loss"})
        confusion = values["confusion"].long()
        support = confusion.sum(dim=1)
        per_class = [
            {
                "precision": float(values["precision_none"][i]),
                "recall": float(values["recall_none"][i]),
                "f1": float(values["f1_none"][i]),
                "support": int(support[i]),
            }
            for i in range(self.num_classes)
        ]
        scalars["num_samples"] = float(support.sum())
        return scalars, {"per_class": per_class, "confusion_matrix": confusion.tolist()}

    def reset(self) -> None:
        self.scores.reset()
        self.loss.reset()
