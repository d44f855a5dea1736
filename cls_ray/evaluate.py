"""``cls-ray evaluate``: a model package on one split of a dataset -> metrics, confusion matrix, per-class table.

Images go through the same decoder and eval transform as validation during training
(:class:`cls_ray.data.pipeline.DecodeBatch` with the package's data config) and the same metric code
(:class:`cls_ray.metrics.ClassificationMetrics`), so evaluating a package on the ``val`` split reproduces the
validation metrics its training run reported. Runs in one process (no Ray cluster needed); decoding is spread
over a thread pool while the model runs.

Writes into ``output_dir`` (default ``MODEL/eval-SPLIT``): ``metrics.json``, ``confusion_matrix.json``,
``confusion_matrix.png`` and ``per_class.csv``.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from cls_ray import storage
from cls_ray.data import manifest as manifest_lib
from cls_ray.data.pipeline import DecodeBatch, as_nchw
from cls_ray.data.transforms import normalize
from cls_ray.metrics import SCALAR_METRICS, ClassificationMetrics
from cls_ray.package import PackageError, load_model_package

logger = logging.getLogger(__name__)


def _row_batches(data_uri: str, manifest: dict[str, Any], split: str, batch_size: int) -> Iterator[dict]:
    for uri in manifest_lib.split_shard_uris(data_uri, manifest, split):
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=["image", "label"]):
                yield {
                    "image": batch.column("image").to_numpy(zero_copy_only=False),
                    "label": batch.column("label").to_numpy(),
                }


def _decoded(decode: DecodeBatch, batches: Iterator[dict]) -> Iterator[dict]:
    """Decode batches on a thread pool (Pillow releases the GIL), in order, at most 2 per thread ahead."""
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.submit(decode, batch))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _check_classes(model_uri: str, classes: list[str], data_uri: str, manifest: dict[str, Any]) -> None:
    if list(manifest["classes"]) != list(classes):
        raise PackageError(
            f"{model_uri} predicts classes {classes[:5]}... but {data_uri} has "
            f"{manifest['classes'][:5]}...; evaluate a package on a dataset with the same classes "
            f"in the same order"
        )


@torch.no_grad()
def compute_metrics(
    model_uri: str, data_uri: str, split: str = "test", batch_size: int = 256
) -> tuple[dict[str, float], dict[str, Any]]:
    """Run a package over a split; returns ``(scalars, details)`` as :meth:`ClassificationMetrics.compute`."""
    manifest = manifest_lib.read_manifest(data_uri)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    package = load_model_package(model_uri, device=device)
    _check_classes(model_uri, package.classes, data_uri, manifest)
    decode = DecodeBatch(package.data_config)
    metrics = ClassificationMetrics(len(package.classes), device)
    mean, std = package.data_config["mean"], package.data_config["std"]
    channels_last = package.meta.get("train_config", {}).get("model", {}).get("channels_last", False)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    package.model.to(memory_format=memory_format)
    from cls_ray.progress import bar

    with bar(int(manifest["splits"].get(split, {}).get("num_rows", 0)), f"evaluate {split}") as progress:
        for batch in _decoded(decode, _row_batches(data_uri, manifest, split, batch_size)):
            images = as_nchw(torch.from_numpy(batch["image"]).to(device))
            logits = package.model(normalize(images, mean, std).contiguous(memory_format=memory_format))
            metrics.update(logits, torch.tensor(batch["label"], device=device))
            progress.update(len(batch["label"]))
    return metrics.compute()


def confusion_figure(
    matrix: list[list[int]], classes: list[str], title: str, *, show: str = "counts", colorbar: bool = False
) -> Any:
    """A matplotlib figure of a confusion matrix, cells coloured by the share of the true class; with at most 20
    classes each cell is labelled with its count (``show="counts"``) or that share (``show="rates"``), with at most
    40 the axes name the classes. ``cls-ray evaluate`` and the report draw theirs with it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(matrix, dtype=np.float64)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    labels, fmt = (cm, "{:.0f}") if show == "counts" else (rates, "{:.2f}")
    n = len(classes)
    side = min(4 + 0.45 * n, 24)
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if colorbar:
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 40:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                color = "white" if rates[i, j] > 0.5 else "black"
                ax.text(j, i, fmt.format(labels[i, j]), ha="center", va="center", fontsize=8, color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _confusion_png(matrix: list[list[int]], classes: list[str], title: str) -> bytes:
    import matplotlib.pyplot as plt

    fig = confusion_figure(matrix, classes, title, colorbar=True)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out.getvalue()


def _per_class_csv(per_class: list[dict[str, Any]], classes: list[str]) -> bytes:
    lines = ["label,class,precision,recall,f1,support"]
    lines += [
        f"{i},{json.dumps(c)},{r['precision']:.6f},{r['recall']:.6f},{r['f1']:.6f},{r['support']}"
        for i, (c, r) in enumerate(zip(classes, per_class, strict=True))
    ]
    return ("\n".join(lines) + "\n").encode()


def evaluate(
    model_uri: str, data_uri: str, split: str = "test", output_dir: str | None = None, batch_size: int = 256
) -> dict:
    """Evaluate a model package on a split and write the report files.

    Returns:
        The flat metrics (``top1``, ``top5``, ``loss``, macro/weighted precision/recall/F1, ``num_samples``) plus
        ``per_class``, ``confusion_matrix``, ``classes``, ``split`` and ``output_dir``.
    """
    output_dir = output_dir or storage.join(model_uri, f"eval-{split}")
    scalars, details = compute_metrics(model_uri, data_uri, split, batch_size)
    from cls_ray.package import read_package_meta

    meta = read_package_meta(model_uri)
    classes = list(meta["classes"])
    per_class = [{"class": c, **r} for c, r in zip(classes, details["per_class"], strict=True)]
    report = {
        "model": model_uri,
        "model_name": meta["name"],
        "model_version": meta["version"],
        "dataset": data_uri,
        "split": split,
        "metrics": scalars,
        "per_class": per_class,
        "confusion_matrix": details["confusion_matrix"],
        "classes": classes,
    }
    storage.write_json(storage.join(output_dir, "metrics.json"), report)
    storage.write_json(
        storage.join(output_dir, "confusion_matrix.json"),
        {"classes": classes, "rows": "true label", "columns": "predicted label", "matrix": details["confusion_matrix"]},
    )
    storage.write_bytes(
        storage.join(output_dir, "confusion_matrix.png"),
        _confusion_png(details["confusion_matrix"], classes, f"{split}: top-1 {scalars['top1']:.4f}"),
    )
    storage.write_bytes(storage.join(output_dir, "per_class.csv"), _per_class_csv(details["per_class"], classes))
    print_evaluation(report)
    logger.info("wrote the evaluation of %s on %s/%s to %s", model_uri, data_uri, split, output_dir)
    return {
        **scalars,
        "per_class": per_class,
        "confusion_matrix": details["confusion_matrix"],
        "classes": classes,
        "split": split,
        "output_dir": output_dir,
    }


def print_evaluation(report: dict[str, Any]) -> None:
    """Print the per-class table and the summary metrics (the CLI's human-readable output)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{report['model_name']} version {report['model_version']}, {report['split']} split: per-class metrics"
    )
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in report["per_class"]:
        table.add_row(
            row["class"], f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", str(row["support"])
        )
    console = Console()
    console.print(table)
    m = report["metrics"]
    console.print(", ".join(f"{k} {m[k]:.4f}" for k in SCALAR_METRICS) + f" ({int(m['num_samples'])} images)")
