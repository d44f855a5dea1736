"""Ray application metrics (``ray.util.metrics``) that training and serving publish.

They show in the Ray dashboard's metrics view (with Prometheus and Grafana set up as Ray's docs describe) and on
every node's Prometheus endpoint (``ray.nodes()[i]["MetricsExportPort"]``, path ``/metrics``), where Ray prefixes
each name with ``ray_`` (a counter also gains ``_total``):

Training, per epoch and worker (tags ``run``, ``rank``), gauges:
  ``cls_ray_train_epoch``, ``cls_ray_train_images_per_second``, ``cls_ray_train_data_wait_fraction``,
  ``cls_ray_train_loss``, ``cls_ray_train_val_top1`` (after evaluation epochs).
Ingest on a cluster (``ingest.engine=ray``), set by the driver (tags ``dataset``: DEST, ``stage``):
  ``cls_ray_ingest_files``, gauge: files ``listed``, ``validated`` (kept or refused), ``refused`` and ``written``
  (rows in finished shards) so far.
Serving:
  ``cls_ray_serve_requests`` (counter; tags ``route``, ``status``): every HTTP response of the ingress;
  ``cls_ray_serve_batch_size`` (histogram): images per model forward pass;
  ``cls_ray_serve_model_latency_seconds`` (histogram): one batch's forward pass.

Metric objects are made once per process, on first use (Ray requires them to be created in the process that
records them); recording never raises into the caller: a metrics failure is logged once and ignored.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

TRAIN_GAUGES = {
    "epoch": ("cls_ray_train_epoch", "Last finished training epoch."),
    "img_per_s": ("cls_ray_train_images_per_second", "Training images per second of this worker, last epoch."),
    "data_wait_frac": ("cls_ray_train_data_wait_fraction", "Share of the last epoch spent waiting for data."),
    "train_loss": ("cls_ray_train_loss", "Mean training loss of the last epoch."),
    "val_top1": ("cls_ray_train_val_top1", "Validation top-1 of the last evaluation."),
}
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
LATENCY_BOUNDARIES = [0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]

_metrics: dict[str, Any] = {}
_failed = False


def _get(name: str, make: Any) -> Any:
    if name not in _metrics:
        _metrics[name] = make()
    return _metrics[name]


def _guard(what: str, call: Any) -> None:
    global _failed
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - metrics must never break training or serving
        if not _failed:
            _failed = True
            logger.warning("could not record Ray metrics (%s): %s; carrying on without them", what, exc)


def record_epoch(run: str, rank: int, metrics: dict[str, Any]) -> None:
    """Set the training gauges from one epoch's ``metrics`` (the dict each worker reports)."""

    def record() -> None:
        from ray.util.metrics import Gauge

        tags = {"run": run, "rank": str(rank)}
        for key, (name, description) in TRAIN_GAUGES.items():
            value = metrics.get(key)
            if value is not None:
                gauge = _get(name, lambda n=name, d=description: Gauge(n, description=d, tag_keys=("run", "rank")))
                gauge.set(float(value), tags=tags)

    _guard("training", record)


def record_ingest(dataset: str, counts: dict[str, int]) -> None:
    """Set the ingest progress gauges of ``dataset`` from ``counts`` (``{stage: files}``, any subset of stages)."""

    def record() -> None:
        from ray.util.metrics import Gauge

        gauge = _get(
            "ingest",
            lambda: Gauge(
                "cls_ray_ingest_files",
                description="Files of a cluster ingest listed, validated, refused and written so far, by stage.",
                tag_keys=("dataset", "stage"),
            ),
        )
        for stage, files in counts.items():
            gauge.set(float(files), tags={"dataset": dataset, "stage": stage})

    _guard("ingest", record)


def record_request(route: str, status: int) -> None:
    """Count one HTTP response of the ingress."""

    def record() -> None:
        from ray.util.metrics import Counter

        counter = _get(
            "requests",
            lambda: Counter(
                "cls_ray_serve_requests",
                description="HTTP responses of the cls-ray ingress, by route and status code.",
                tag_keys=("route", "status"),
            ),
        )
        counter.inc(1.0, tags={"route": route, "status": str(status)})

    _guard("serving", record)


def record_batch(size: int, seconds: float) -> None:
    """Record one model forward pass: its batch size and how long it took."""

    def record() -> None:
        from ray.util.metrics import Histogram

        sizes = _get(
            "batch",
            lambda: Histogram(
                "cls_ray_serve_batch_size",
                description="Images per forward pass of a cls-ray model replica.",
                boundaries=BATCH_BOUNDARIES,
            ),
        )
        latency = _get(
            "latency",
            lambda: Histogram(
                "cls_ray_serve_model_latency_seconds",
                description="Seconds per forward pass (one batch) of a cls-ray model replica.",
                boundaries=LATENCY_BOUNDARIES,
            ),
        )
        sizes.observe(float(size))
        latency.observe(float(seconds))

    _guard("serving", record)
