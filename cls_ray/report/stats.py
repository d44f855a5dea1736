"""Numbers of the report beyond the evaluation metrics: bootstrap intervals, calibration, temperature scaling.

Confidence intervals are scipy's percentile bootstrap over images (:func:`scipy.stats.bootstrap`, paired resampling
of labels and predictions); the expected calibration error is torchmetrics' ``multiclass_calibration_error``
(equal-width confidence bins, L1); the temperature minimises the validation split's negative log-likelihood with
torch's L-BFGS over ``log T`` (Guo et al., 2017, "On Calibration of Modern Neural Networks").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _macro(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> tuple[float, float, float]:
    """Macro precision, recall and F1 with zero for classes without predictions or support (as torchmetrics with
    ``zero_division=0``), averaged over the classes present in the labels or predictions of this sample."""
    tp = np.bincount(labels[labels == preds], minlength=num_classes).astype(np.float64)
    true = np.bincount(labels, minlength=num_classes).astype(np.float64)
    pred = np.bincount(preds, minlength=num_classes).astype(np.float64)
    precision = np.divide(tp, pred, out=np.zeros_like(tp), where=pred > 0)
    recall = np.divide(tp, true, out=np.zeros_like(tp), where=true > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    return float(precision.mean()), float(recall.mean()), float(f1.mean())


def bootstrap_intervals(
    labels: np.ndarray,
    logits: np.ndarray,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """95% percentile-bootstrap intervals of top-1, top-5 and macro precision/recall/F1 over the images.

    Returns ``{metric: {"low", "high"}}``.
    """
    from scipy.stats import bootstrap

    num_classes = logits.shape[1]
    preds = logits.argmax(axis=1)
    k = min(5, num_classes)
    top5 = (np.argsort(-logits, axis=1, kind="stable")[:, :k] == labels[:, None]).any(axis=1)
    correct = (preds == labels).astype(np.float64)
    out: dict[str, dict[str, float]] = {}
    if len(labels) < 2:
        return out
    for name, values in (("top1", correct), ("top5", top5.astype(np.float64))):
        res = bootstrap(
            (values,),
            np.mean,
            n_resamples=resamples,
            confidence_level=confidence,
            method="percentile",
            random_state=np.random.default_rng(seed),
            vectorized=True,
        )
        out[name] = {"low": float(res.confidence_interval.low), "high": float(res.confidence_interval.high)}
    for i, name in enumerate(("precision_macro", "recall_macro", "f1_macro")):
        res = bootstrap(
            (labels, preds),
            lambda y, p, i=i: _macro(y, p, num_classes)[i],
            paired=True,
            vectorized=False,
            n_resamples=resamples,
            confidence_level=confidence,
            method="percentile",
            random_state=np.random.default_rng(seed),
        )
        out[name] = {"low": float(res.confidence_interval.low), "high": float(res.confidence_interval.high)}
    return out


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE (torchmetrics, L1 over ``bins`` equal-width confidence bins)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    if len(labels) == 0:
        return float("nan")
    return float(
        multiclass_calibration_error(
            torch.from_numpy(probs).float(),
            torch.from_numpy(labels).long(),
            num_classes=probs.shape[1],
            n_bins=bins,
            norm="l1",
        )
    )


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> list[dict[str, float]]:
    """The reliability diagram's bars: per equal-width confidence bin, its mean confidence, accuracy and count."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        out.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "count": n,
                "confidence": float(confidence[mask].mean()) if n else None,
                "accuracy": float(correct[mask].mean()) if n else None,
            }
        )
    return out


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits).float() / temperature, dim=1).numpy()


TEMPERATURE_BOUNDS = (0.05, 20.0)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 200) -> float:
    """The temperature T in :data:`TEMPERATURE_BOUNDS` minimising the cross-entropy of ``softmax(logits / T)``.

    The NLL is convex in 1/T, so clamping the unconstrained optimum gives the constrained one. A split the model
    classifies without error has its optimum at T -> 0 (ever sharper probabilities), i.e. at the lower bound: the
    fit says nothing then, and :func:`temperature_note` tells the page so.
    """
    x = torch.from_numpy(logits).double()
    y = torch.from_numpy(labels).long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    low, high = TEMPERATURE_BOUNDS
    return float(log_t.detach().exp().clamp(low, high))


def temperature_note(temperature: float, logits: np.ndarray, labels: np.ndarray) -> str | None:
    """Why a fitted temperature should not be trusted, or None."""
    errors = int((logits.argmax(axis=1) != labels).sum())
    if errors == 0:
        return (
            f"the calibration split's {len(labels)} images are all classified correctly, so any sharpening lowers "
            "its loss: the temperature is not informative; calibrate on a larger or harder split"
        )
    if temperature in TEMPERATURE_BOUNDS:
        return f"the temperature is at its bound {temperature} of {TEMPERATURE_BOUNDS}"
    return None


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    return float(
        torch.nn.functional.cross_entropy(
            torch.from_numpy(logits).float() / temperature, torch.from_numpy(labels).long()
        )
    )


def calibration_summary(
    test_logits: np.ndarray, test_labels: np.ndarray, temperature: float, bins: int
) -> dict[str, Any]:
    """ECE, NLL and reliability bars of the test split before and after dividing the logits by ``temperature``."""
    before, after = softmax(test_logits), softmax(test_logits, temperature)
    return {
        "bins": bins,
        "ece_before": expected_calibration_error(before, test_labels, bins),
        "ece_after": expected_calibration_error(after, test_labels, bins),
        "nll_before": nll(test_logits, test_labels),
        "nll_after": nll(test_logits, test_labels, temperature),
        "reliability_before": reliability(before, test_labels, bins),
        "reliability_after": reliability(after, test_labels, bins),
    }
