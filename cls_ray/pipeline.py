"""The whole chain from one config: ingest -> tune -> train -> evaluate -> export -> predict -> serve, and the
Fashion-MNIST demo.

Every stage writes under ``cfg.workdir``::

    WORKDIR/config.yaml        the resolved config of this pipeline
    WORKDIR/dataset/           ingest output (manifest.json + shards)
    WORKDIR/dataset-search/    the per-class subset the search runs on (pipeline.tune_subset_per_class)
    WORKDIR/search/            the Tune experiment; its winner in search/best/
    WORKDIR/runs/final/        the final training run; its model package in runs/final/package/
    WORKDIR/evaluation/        test-split metrics, confusion matrix, per-class table
    WORKDIR/predictions/       cls-ray predict of pipeline.predict_source (Parquet, one row per file)

The export stage writes its file (model.onnx or model.ts) into the final model package and records it there.

Re-running the same pipeline resumes: a complete dataset is kept, a finished search is restored, a finished
training run is resumed from its last checkpoint (and ends at once).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from cls_ray import storage
from cls_ray.config import Config, ConfigError, load_config, with_absolute_paths, write_resolved

logger = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@dataclass
class PipelineResult:
    """What a pipeline run produced."""

    dataset_uri: str
    package_uri: str | None = None
    search: Any = None
    test_metrics: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    exports: list[dict[str, Any]] | None = None
    predictions: dict[str, Any] | None = None
    url: str | None = None


def _search(data_uri: str, cfg: Config) -> Any:
    from cls_ray.data.subset import write_subset
    from cls_ray.tune.tuner import tune

    search_uri = data_uri
    if cfg.pipeline.tune_subset_per_class:
        search_uri = storage.join(cfg.workdir, "dataset-search")
        write_subset(data_uri, search_uri, cfg.pipeline.tune_subset_per_class)
    tune_cfg = dataclasses.replace(
        cfg, tune=dataclasses.replace(cfg.tune, storage_path=cfg.workdir, experiment_name="search")
    )
    return tune(search_uri, tune_cfg)


def _final_config(cfg: Config, search: Any) -> Config:
    """The user's config with the search winner's sampled values; epochs and the run stay the user's."""
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, storage_path=storage.join(cfg.workdir, "runs"), run_name="final")
    )
    if search is None:
        return cfg
    from cls_ray.tune.space import config_values, trial_config

    winner = {k: v for k, v in config_values(search.best_config).items() if not k.startswith("train.")}
    logger.info("training the search winner on the full data: %s", winner)
    return trial_config(cfg, winner, f"search winner {search.best_trial}")


def run_pipeline(cfg: Config) -> PipelineResult:
    """Run the stages of ``cfg.pipeline.stages`` in chain order."""
    cfg = with_absolute_paths(cfg)  # Ray Tune trials and Serve replicas do not run in this directory
    stages = cfg.pipeline.stages
    if "ingest" in stages and not cfg.source:
        raise ConfigError("source: the pipeline's ingest stage needs `source` (class folders, local or s3://)")
    if "predict" in stages and not cfg.pipeline.predict_source:
        raise ConfigError(
            "pipeline.predict_source: the predict stage needs the images to score (a folder or s3:// prefix)"
        )
    if set(stages) & {"evaluate", "report", "export", "predict", "serve"} and not (
        "tune" in stages or "train" in stages
    ):
        raise ConfigError(
            "pipeline.stages: evaluate, report, export, predict and serve need a model: include tune or train"
        )
    write_resolved(cfg, cfg.workdir)
    result = PipelineResult(dataset_uri=storage.join(cfg.workdir, "dataset"))
    if "ingest" in stages:
        from cls_ray.data.ingest import ingest

        # Training from FFCV files needs them written: data.format=ffcv turns ingest.ffcv on.
        ingest_cfg = dataclasses.replace(cfg.ingest, ffcv=cfg.ingest.ffcv or cfg.data.format == "ffcv")
        ingest(cfg.source, result.dataset_uri, ingest_cfg)
    if "tune" in stages:
        result.search = _search(result.dataset_uri, cfg)
        result.package_uri = result.search.best_package_uri
    if "train" in stages:
        from cls_ray.train.trainer import train

        result.package_uri = train(result.dataset_uri, _final_config(cfg, result.search)).package_uri
    if "evaluate" in stages:
        from cls_ray.evaluate import evaluate

        result.test_metrics = evaluate(
            result.package_uri, result.dataset_uri, split="test", output_dir=storage.join(cfg.workdir, "evaluation")
        )
    if "report" in stages:
        from cls_ray.report.build import build_report, print_report

        result.report = build_report(result.package_uri, result.dataset_uri, split="test", cfg=cfg.report)
        print_report(result.report)
    if "export" in stages:
        from cls_ray.export import export_package, print_exports

        result.exports = export_package(result.package_uri, cfg.pipeline.export_format, cfg=cfg.export)
        print_exports(result.exports, result.package_uri)
    if "predict" in stages:
        from cls_ray.predict import predict, print_prediction_summary

        result.predictions = predict(
            result.package_uri, cfg.pipeline.predict_source, storage.join(cfg.workdir, "predictions"), cfg.predict
        )
        print_prediction_summary(result.predictions)
    if "serve" in stages:
        result.url = serve_and_check(result.package_uri, result.dataset_uri, cfg)
    return result


def _test_samples(data_uri: str, count: int) -> list[dict[str, Any]]:
    """The first ``count`` rows of the test split (image bytes, label, path)."""
    from cls_ray.data.manifest import read_manifest, split_shard_uris

    manifest = read_manifest(data_uri)
    fs, path = storage.resolve(split_shard_uris(data_uri, manifest, "test")[0])
    rows = pq.read_table(path, filesystem=fs, columns=["image", "label", "path"]).slice(0, count).to_pylist()
    for row in rows:
        row["class"] = manifest["classes"][row["label"]]
    return rows


def _predict_over_http(url: str, image: bytes, top_k: int = 1) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{url}/v1/predict?top_k={top_k}",
        data=image,
        method="POST",
        headers={"Content-Type": "application/octet-stream"},
    )
    api_key_env = os.environ.get("CLS_RAY_DEMO_API_KEY")
    if api_key_env:
        request.add_header("X-API-Key", api_key_env)
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def serve_and_check(package_uri: str, data_uri: str, cfg: Config) -> str:
    """Serve the package, send real test images over HTTP and print predictions next to the true labels."""
    from rich.console import Console
    from rich.table import Table

    from cls_ray.serve.app import start_serving

    url = start_serving(package_uri, cfg.serve)
    table = Table(title=f"Predictions over HTTP from {url}/v1/predict")
    for column in ("image", "true class", "predicted", "probability", "ok"):
        table.add_column(column)
    correct = 0
    samples = _test_samples(data_uri, cfg.pipeline.serve_samples)
    for row in samples:
        top = _predict_over_http(url, row["image"])["predictions"][0]["top_k"][0]
        predicted = top["class"]
        ok = predicted == row["class"]
        correct += ok
        table.add_row(row["path"], row["class"], predicted, f"{top['probability']:.3f}", "yes" if ok else "no")
    Console().print(table)
    Console().print(f"{correct}/{len(samples)} served predictions match the true labels")
    return url


def run_demo(workdir: str = "demo_output", overrides: list[str] | None = None, keep_serving: bool = False) -> None:
    """The whole chain on the real Fashion-MNIST (Debian's ``dataset-fashion-mnist``), with ``configs/demo.yaml``."""
    from cls_ray.data.fashion_mnist import write_fashion_mnist
    from cls_ray.serve.app import report_serving, stop_serving

    keep_serving = keep_serving or os.environ.get("KEEP_SERVING", "") not in ("", "0")
    folders = storage.join(workdir, "fashion-mnist")
    write_fashion_mnist(folders)
    # tune.space `quick` names the shipped search_spaces/quick.yaml from any working directory.
    base = [f"source={folders}", f"workdir={workdir}", f"pipeline.predict_source={storage.join(folders, 'test')}"]
    cfg = load_config(str(DEMO_CONFIG), base + list(overrides or []))
    if "serve" not in cfg.pipeline.stages:
        cfg.pipeline.stages.append("serve")
    result = run_pipeline(cfg)
    if result.test_metrics:
        print(
            f"Fashion-MNIST test accuracy (top-1) of {result.package_uri}: {result.test_metrics['top1']:.4f}",
            flush=True,
        )
    if keep_serving:
        report_serving(result.url, result.package_uri, detach=False)
        _serve_until_interrupted()
    stop_serving()


def _serve_until_interrupted() -> None:
    import time

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("stopping")
