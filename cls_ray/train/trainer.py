"""Driver side of training: validate the run, assemble the ``TorchTrainer``, run it, package the best checkpoint.

:func:`build_trainer` is what Ray Tune trials call; :func:`train` is ``cls-ray train``: one run under
``{train.storage_path}/{train.run_name}`` that resumes from its latest checkpoint when re-run with the same name,
and ends with a model package of the best checkpoint in ``RUN/package``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import timm
from ray.train.torch import TorchTrainer

from cls_ray import storage, tracking
from cls_ray.config import Config, ConfigError, RunFailed, to_dict, with_absolute_paths, write_resolved
from cls_ray.data import manifest as manifest_lib
from cls_ray.data.pipeline import SharedSplit, build_eval_dataset, build_train_dataset
from cls_ray.metrics import SCALAR_METRICS
from cls_ray.models import check_architecture, data_config_for, model_kwargs
from cls_ray.package import package_name, save_model_package
from cls_ray.progress import ProgressBoard, ProgressPrinter
from cls_ray.ray_connect import ensure_ray
from cls_ray.train.history import HISTORY_DIR
from cls_ray.train.loop import format_progress, train_loop_per_worker
from cls_ray.train.spec import RunSpec
from cls_ray.train.splits import EvalSplitsExact
from cls_ray.train.state import read_package_weights, read_progress

logger = logging.getLogger(__name__)

PACKAGE_DIR = "package"
#: Keys every report carries; ``val_*`` keys appear from the first evaluation on.
REPORT_METRICS = (
    "epoch",
    "train_loss",
    "img_per_s",
    "data_wait_frac",
    "epoch_time_s",
    "lr",
    *(f"val_{k}" for k in SCALAR_METRICS),
)


@dataclass
class TrainResult:
    """What ``cls-ray train`` produced."""

    run_uri: str
    package_uri: str
    metrics: dict[str, float]
    """Metrics of the best checkpoint (by ``train.metric``)."""
    checkpoint_uri: str


def _check_metric(cfg: Config) -> None:
    if cfg.train.metric not in REPORT_METRICS:
        raise ConfigError(
            f"train.metric: {cfg.train.metric!r} is not a reported metric; choose one of "
            f"{', '.join(k for k in REPORT_METRICS if k.startswith('val_'))}"
        )


def _check_pretrained(cfg: Config) -> None:
    """A weights file must exist; hub weights (timm tags, ``hf-hub:ORG/NAME``) are timm's to download."""
    from cls_ray.models import weights_source

    pretrained = cfg.model.pretrained
    if weights_source(cfg.model) == "file" and not storage.exists(pretrained):
        raise ConfigError(f"model.pretrained: no weights file at {pretrained}")


def _worker_resources(cfg: Config) -> dict[str, float]:
    t = cfg.train
    return {"CPU": t.cpus_per_worker, **({"GPU": 1.0} if t.use_gpu else {}), **t.worker_resources}


#: jemalloc without purging (``-1``: freed pages stay mapped for the next step). PyTorch's CPU launcher
#: (``torch.backends.xeon.run_cpu --enable-jemalloc``) sets decay times of months for the same reason.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def jemalloc_env() -> dict[str, str]:
    """The environment variables that start a process on the ``libjemalloc.so`` Ray ships, purging off; empty where
    this Ray installation has none (e.g. macOS; where a Linux one has none, one warning says so)."""
    from cls_ray.ray_internals import ray_jemalloc_library  # the library's place in Ray's wheel is Ray's internal

    library = ray_jemalloc_library()
    return {"LD_PRELOAD": library, "MALLOC_CONF": JEMALLOC_CONF} if library else {}


def worker_runtime_env(cfg: Config) -> dict[str, Any]:
    """The training workers' runtime environment: on CPU, Ray's own jemalloc preloaded (``train.cpu_allocator``).

    The library's path is resolved here, where the trainer is built; Ray's nodes run one image, so it is the same on
    every node (if a node lacked it, the dynamic loader would say so and go on with the system allocator).
    """
    if cfg.train.use_gpu or cfg.train.cpu_allocator != "jemalloc":
        return {}
    env = jemalloc_env()
    return {"env_vars": env} if env else {}


def _check_placement(cfg: Config) -> None:
    """Refuse a worker group the cluster cannot place, or one that leaves no node room for Ray Data's tasks."""
    t = cfg.train
    per_worker = _worker_resources(cfg)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    slots = [min(int(res.get(k, 0) // v) for k, v in per_worker.items()) for res in nodes]
    if sum(slots) < t.num_workers:
        totals = ray.cluster_resources()
        have = ", ".join(f"{totals.get(k, 0):g} {k}" for k in per_worker)
        raise ConfigError(
            f"train.num_workers: {t.num_workers} workers of {per_worker} do not fit this Ray cluster "
            f"({have} over {len(nodes)} node(s); at most {sum(slots)} fit). Lower train.num_workers or "
            f"train.cpus_per_worker, or add nodes."
        )
    # Ray Data tasks (listing, reading, shuffling, re-blocking) reserve 1 CPU each and decode tasks
    # data.decode_cpus: some node must keep that much free next to the workers, or the input pipeline waits forever.
    need = max(1.0, cfg.data.decode_cpus)
    spare = max(
        res.get("CPU", 0) - max(0, t.num_workers - (sum(slots) - own)) * t.cpus_per_worker
        for res, own in zip(nodes, slots, strict=True)
    )
    if spare < need:
        raise ConfigError(
            f"train.cpus_per_worker: {t.num_workers} workers x {t.cpus_per_worker:g} CPU leave at most "
            f"{spare:g} CPU free on any node, and Ray Data's input tasks need {need:g} CPU there "
            f"(Ray Data decoding). Lower train.cpus_per_worker or train.num_workers, or add a node."
        )


def _batches_per_epoch(manifest: dict[str, Any], cfg: Config) -> int:
    rows, world = manifest["splits"]["train"]["num_rows"], cfg.train.num_workers
    # Ray Data splits the train split into equal shards (floor); FFCV's DistributedSampler pads every rank to ceil.
    rows = -(-rows // world) if cfg.data.format == "ffcv" and world > 1 else rows // world
    batches = rows // cfg.data.batch_size
    if batches == 0:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} is larger than each worker's share of the train "
            f"split ({rows} rows for each of {cfg.train.num_workers} workers); lower it"
        )
    return batches


def _check_splits(data_uri: str, manifest: dict[str, Any]) -> None:
    for split in ("train", "val"):
        info = manifest["splits"].get(split)
        if not info or not info.get("num_rows"):
            raise manifest_lib.ManifestError(
                f"{data_uri}: the {split!r} split is empty; training needs train and "
                f"val images (re-ingest with ingest.val_fraction > 0)"
            )


def validate_run(data_uri: str, cfg: Config) -> tuple[dict[str, Any], RunSpec]:
    """Every check that can fail before a worker starts; returns the manifest and the spec workers get.

    Raises:
        ManifestError: no manifest at ``data_uri``, an unknown manifest version, or an empty train/val split.
        ConfigError: unknown model, unknown metric, missing weights file, a worker group the cluster cannot place.
    """
    storage.check_bucket(data_uri)  # endpoint, credentials, bucket: before any work
    manifest = manifest_lib.read_manifest(data_uri)
    _check_splits(data_uri, manifest)
    train_beton = None
    if cfg.data.format == "ffcv":
        from cls_ray.data.ffcv_format import beton_uri, require_ffcv

        require_ffcv("data.format=ffcv")
        train_beton = beton_uri(data_uri, manifest, "train")
    check_architecture(cfg.model.name)
    _check_metric(cfg)
    _check_pretrained(cfg)
    ensure_ray()
    _check_placement(cfg)
    spec = RunSpec(
        classes=list(manifest["classes"]),
        class_counts=list(manifest["splits"]["train"]["class_counts"]),
        data_config=data_config_for(cfg.model),
        run_uri="",
        updates_per_epoch=math.ceil(_batches_per_epoch(manifest, cfg) / cfg.optim.grad_accum_steps),
        batches_per_epoch=_batches_per_epoch(manifest, cfg),
        train_beton_uri=train_beton,
        dataset_digest=manifest_lib.manifest_digest(manifest),
    )
    return manifest, spec


def build_trainer(
    data_uri: str,
    cfg: Config,
    *,
    storage_path: str,
    run_name: str,
    callbacks: list | None = None,
    shared: Mapping[str, SharedSplit] | None = None,
    on_validated: Callable[[RunSpec], None] | None = None,
) -> TorchTrainer:
    """A ``TorchTrainer`` for one run at ``{storage_path}/{run_name}``; validates everything first, then calls
    ``on_validated`` with the workers' spec (which it may complete).

    Every worker reports once per epoch (keys in :data:`REPORT_METRICS`, the latest validation metrics carried
    along); evaluation epochs carry a checkpoint, kept best-``train.keep_checkpoints`` by ``train.metric``.
    ``shared`` holds splits read once for several runs (a search's trials; :class:`SharedSplit`).
    """
    storage.check_bucket(storage_path)
    manifest, spec = validate_run(data_uri, cfg)
    spec.run_uri = storage.join(storage_path, run_name)
    if on_validated is not None:
        on_validated(spec)
    filesystem, path = storage.resolve(storage_path)
    max_pixels = cfg.ingest.max_pixels
    datasets = {
        "val": build_eval_dataset(
            data_uri, manifest, "val", spec.data_config, cfg.data, max_pixels=max_pixels, shared=shared
        )
    }
    if spec.train_beton_uri is None:  # data.format=ffcv: every worker reads the train .beton itself
        datasets["train"] = build_train_dataset(
            data_uri, manifest, spec.data_config, cfg.data, seed=cfg.train.seed, max_pixels=max_pixels, shared=shared
        )
    t = cfg.train
    run_config = ray.train.RunConfig(
        name=run_name,
        storage_path=path,
        storage_filesystem=filesystem,
        callbacks=callbacks or None,
        failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=t.keep_checkpoints, checkpoint_score_attribute=t.metric, checkpoint_score_order=t.metric_mode
        ),
        worker_runtime_env=worker_runtime_env(cfg),
    )
    resources = _worker_resources(cfg)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "spec": spec},
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources
        ),
        run_config=run_config,
        datasets=datasets,
        dataset_config=EvalSplitsExact(),
    )


def _checkpoint_uri(checkpoint: ray.train.Checkpoint, storage_path: str) -> str:
    return f"s3://{checkpoint.path}" if storage.is_remote(storage_path) else checkpoint.path


def export_package(result: ray.train.Result, data_uri: str, cfg: Config, package_uri: str) -> str:
    """Write the model package of the run's best checkpoint (by ``train.metric``) to ``package_uri``.

    The package holds the EMA weights when the run kept an EMA (those were validated), else the raw weights.
    """
    checkpoint = _best_checkpoint(result, cfg)
    manifest = manifest_lib.read_manifest(data_uri)
    classes = list(manifest["classes"])
    with checkpoint.as_directory() as directory:
        state, is_ema = read_package_weights(directory)
        progress = read_progress(directory)
    kwargs = model_kwargs(cfg.model)
    model = timm.create_model(cfg.model.name, pretrained=False, num_classes=len(classes), **kwargs)
    model.load_state_dict(state)
    meta = {
        "name": cfg.train.package_name or package_name(manifest_lib.dataset_name(data_uri, manifest)),
        "architecture": cfg.model.name,
        "classes": classes,
        "data_config": data_config_for(cfg.model),
        "model_kwargs": kwargs,
        "metrics": {"epoch": progress.epoch, **progress.last_eval},
        "dataset": {"uri": data_uri, "manifest_digest": manifest_lib.manifest_digest(manifest)},
        "train_config": to_dict(cfg),
        "weights": "ema" if is_ema else "raw",
        "checkpoint": _checkpoint_uri(checkpoint, cfg.train.storage_path),
    }
    return save_model_package(package_uri, model, meta)


def _best_checkpoint(result: ray.train.Result, cfg: Config) -> ray.train.Checkpoint:
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if cfg.train.metric in m]
    if scored:
        # The best score; among equal scores the latest epoch (the leaderboard's best_epoch follows the same rule).
        sign = 1.0 if cfg.train.metric_mode == "max" else -1.0
        return max(scored, key=lambda cm: (sign * cm[1][cfg.train.metric], cm[1].get("epoch", 0)))[0]
    if result.checkpoint is None:
        raise ValueError(f"run {result.path} holds no checkpoint to package (did it finish an evaluation epoch?)")
    return result.checkpoint


def _check_resume_compatible(run_uri: str, cfg: Config) -> None:
    previous_uri = storage.join(run_uri, "config.yaml")
    if not storage.exists(previous_uri):
        return
    import yaml

    previous = yaml.safe_load(storage.read_bytes(previous_uri)) or {}
    old = previous.get("model", {}).get("name")
    if old and old != cfg.model.name:
        raise ConfigError(
            f"train.run_name: run {run_uri} trains {old!r}, not {cfg.model.name!r}; a re-run resumes "
            f"it, so choose another train.run_name for a new model"
        )


def failure_reason(exc: BaseException, run_uri: str) -> str:
    """One line for a failed Ray Train run: the controller's or the first worker's error (its last line, where Ray
    gives a traceback), with the storage hint of :func:`cls_ray.storage.describe_error` when it is a storage error
    of a remote run."""
    cause: Any = getattr(exc, "controller_failure", None)
    if cause is None:
        failures = getattr(exc, "worker_failures", None) or {}
        cause = next(iter(failures.values()), None) if failures else None
    lines = [line.strip() for line in str(cause if cause is not None else exc).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("...")] or [type(exc).__name__]
    line = next((x for x in reversed(lines) if re.match(r"^[\w.]+(Error|Exception): ", x)), lines[-1])
    line = re.sub(r"^[\w.]+(Error|Exception): ", "", line)
    if storage.is_remote(run_uri) and re.search(r"curl|connect|timeout|access.denied|bucket", line, re.I):
        return storage.describe_error(run_uri, OSError(line)).split(": ", 1)[1]
    return line


def train(data_uri: str, cfg: Config) -> TrainResult:
    """Train (or resume) the run ``{train.storage_path}/{train.run_name}`` and package its best checkpoint."""
    data_uri, cfg = storage.absolute(data_uri), with_absolute_paths(cfg)  # the workers' directory is not ours
    run_uri = storage.join(cfg.train.storage_path, cfg.train.run_name)
    storage.check_bucket(cfg.train.storage_path)  # endpoint, credentials, bucket: before any work
    _check_resume_compatible(run_uri, cfg)
    started: dict[str, Any] = {}

    def start_tracking(spec: RunSpec) -> None:
        spec.progress = started["board"] = ProgressBoard.remote()  # rank 0's live progress, drawn here
        if "mlflow" in cfg.train.tracking:
            spec.mlflow = started["mlflow"] = tracking.start_mlflow_run(cfg, run_uri, data_uri, spec.dataset_digest)

    trainer = build_trainer(
        data_uri, cfg, storage_path=cfg.train.storage_path, run_name=cfg.train.run_name, on_validated=start_tracking
    )
    target = started.get("mlflow")
    write_resolved(cfg, run_uri)
    logger.info("training %s on %s with %d worker(s); run %s", cfg.model.name, data_uri, cfg.train.num_workers, run_uri)
    try:
        with ProgressPrinter(started["board"], cfg.train.epochs, lambda m: format_progress(m, cfg.train.epochs)):
            result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        tracking.end_mlflow_run(target, "FAILED")
        raise RunFailed(
            f"training run {run_uri} failed: {failure_reason(exc, run_uri)}; the same command resumes it from its "
            f"last complete checkpoint"
        ) from exc
    except BaseException:  # interrupted: the re-run continues the same MLflow run
        tracking.end_mlflow_run(target, "KILLED")
        raise
    package_uri = export_package(result, data_uri, cfg, storage.join(run_uri, PACKAGE_DIR))
    if cfg.tracking.log_package:
        tracking.log_artifacts(target, package_uri, PACKAGE_DIR)
    tracking.end_mlflow_run(target, "FINISHED")
    best = _best_checkpoint(result, cfg)
    with best.as_directory() as directory:
        progress = read_progress(directory)
    metrics = {"epoch": progress.epoch, **progress.last_eval}
    logger.info(
        "best epoch %d: %s; package %s; history %s",
        progress.epoch,
        ", ".join(f"{k} {v:.4f}" for k, v in progress.last_eval.items() if k in ("val_top1", "val_f1_macro")),
        package_uri,
        storage.join(run_uri, HISTORY_DIR),
    )
    return TrainResult(
        run_uri=run_uri,
        package_uri=package_uri,
        metrics=metrics,
        checkpoint_uri=_checkpoint_uri(best, cfg.train.storage_path),
    )
