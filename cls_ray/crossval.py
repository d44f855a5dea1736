"""K-fold cross-validation of a dataset's training split: out-of-sample probabilities for every training image.

``cls-ray audit`` uses them (``audit.folds`` >= 2) to audit the labels of the images a model trained on: a model
scored on its own training images is confident about their labels whatever they are, so each image is scored by a
model that never saw it.

1. **Folds.** The train split's rows go into K folds with scikit-learn's ``StratifiedGroupKFold`` (each class spread
   evenly; every group of the Parquet ``group`` column (``ingest.group_by``) and every near-duplicate cluster
   (``near_duplicate`` column) inside one fold, so no fold model has seen a near-copy of what it scores); seeded,
   so the same dataset and seed give the same folds. The rows are written once, one Parquet file per
   fold (``folds/fold-I.parquet``), streamed one source shard at a time.
2. **Fold datasets.** ``fold-I/manifest.json`` is an ordinary dataset whose train split is the other folds' files
   and whose val split is fold I's file; its shards name those files by absolute ``uri`` (the manifest format
   allows it), so nothing is copied K times. Training reads it unchanged.
3. **Training** as one Ray Tune job, a grid over the fold index (trials run as many at once as the cluster fits):
   each trial is a Ray Train run of the audited model's own recorded training config (``audit.fold_overrides``
   changes it, e.g. fewer epochs or workers), packaged from its best checkpoint. A fold whose package exists from an
   earlier call with the same folds is reused; an interrupted fold run resumes from its last checkpoint.
4. **Scoring**: each fold model scores its own fold (the report's batch-inference pass) and the K results are
   joined, in fold order.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cls_ray import storage
from cls_ray.config import Config, ConfigError, apply_overrides, section_from_dict
from cls_ray.data import manifest as manifest_lib

logger = logging.getLogger(__name__)

FOLDS_DIR = "folds"
RUNS_DIR = "runs"
TUNE_DIR = "tune"
PACKAGE_DIR = "package"


class CrossValidationError(ValueError):
    """Cross-validation cannot run on these inputs (the message says what and where)."""


@dataclass
class FoldScores:
    """Out-of-sample results of the train split, joined over the folds (rows in fold order)."""

    paths: list[str]
    labels: np.ndarray
    logits: np.ndarray
    fold: np.ndarray
    packages: list[str]
    fold_top1: list[float]


def fold_keys(groups: list[str | None], clusters: list[str | None]) -> np.ndarray:
    """One integer per row such that rows sharing a group (``group`` column) or a near-duplicate cluster
    (``near_duplicate`` column), directly or through each other, share it; every other row gets its own."""
    from cls_ray.data.near_duplicates import cluster_labels

    n = len(groups)
    first: dict[tuple[str, str], int] = {}
    i, j = [], []
    for row, (group, cluster) in enumerate(zip(groups, clusters, strict=True)):
        for key in (("g", group), ("c", cluster)):
            if key[1] is not None:
                anchor = first.setdefault(key, row)
                if anchor != row:
                    i.append(anchor)
                    j.append(row)
    return cluster_labels(n, np.asarray(i, np.int64), np.asarray(j, np.int64))


def assign_folds(labels: np.ndarray, keys: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1) of every row: stratified by label with scikit-learn's ``StratifiedGroupKFold``, rows
    sharing a key (:func:`fold_keys`) in one fold; deterministic for the same input and seed."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.asarray(labels)
    distinct = len(np.unique(keys))
    if distinct < folds:
        raise CrossValidationError(
            f"audit.folds={folds}: the train split has only {distinct} groups (after joining near-duplicates)"
        )
    out = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros((len(labels), 1)), labels, groups=keys)):
        out[held_out] = fold
    return out


def _split_columns(data_uri: str, manifest: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The train split's labels and fold keys, read without the image column."""
    labels: list[int] = []
    groups: list[str | None] = []
    clusters: list[str | None] = []
    for uri in manifest_lib.split_shard_uris(data_uri, manifest, "train"):
        fs, path = storage.resolve(uri)
        names = pq.ParquetFile(path, filesystem=fs).schema_arrow.names
        table = pq.read_table(
            path, columns=[c for c in ("label", "group", "near_duplicate") if c in names], filesystem=fs
        )
        labels += table.column("label").to_pylist()
        for name, out in (("group", groups), ("near_duplicate", clusters)):
            out += table.column(name).to_pylist() if name in names else [None] * table.num_rows
    return np.asarray(labels, dtype=np.int64), fold_keys(groups, clusters)


def _fold_stamp(data_uri: str, manifest: dict[str, Any], folds: int, seed: int) -> dict[str, Any]:
    return {
        "of": data_uri,
        "manifest_digest": manifest_lib.manifest_digest(manifest),
        "folds": folds,
        "seed": seed,
    }


def write_fold_datasets(data_uri: str, manifest: dict[str, Any], folds: int, seed: int, dest: str) -> list[str]:
    """Write the fold files and the ``folds`` fold datasets under ``dest`` (see the module docstring); returns the
    fold datasets' URIs. Complete fold datasets of the same source, folds and seed already there are reused."""
    stamp = _fold_stamp(data_uri, manifest, folds, seed)
    uris = [storage.join(dest, f"fold-{i}") for i in range(folds)]
    try:
        if all(manifest_lib.read_manifest(u).get("cross_validation", {}).get("stamp") == stamp for u in uris):
            logger.info("reusing the %d fold datasets under %s", folds, dest)
            return uris
    except manifest_lib.ManifestError:
        pass
    labels, keys = _split_columns(data_uri, manifest)
    fold_of = assign_folds(labels, keys, folds, seed)
    n_classes = len(manifest["classes"])
    fold_files = [storage.join(dest, FOLDS_DIR, f"fold-{i}.parquet") for i in range(folds)]
    writers: list[pq.ParquetWriter | None] = [None] * folds
    sinks = []
    start = 0
    try:
        for uri in manifest_lib.split_shard_uris(data_uri, manifest, "train"):
            fs, path = storage.resolve(uri)
            table = pq.read_table(path, filesystem=fs)
            shard_folds = fold_of[start : start + table.num_rows]
            start += table.num_rows
            for i in range(folds):
                rows = table.filter(pa.array(shard_folds == i))
                if writers[i] is None:
                    out_fs, out_path = storage.resolve(fold_files[i])
                    out_fs.create_dir(out_path.rsplit("/", 1)[0], recursive=True)
                    sink = out_fs.open_output_stream(out_path)
                    sinks.append(sink)
                    writers[i] = pq.ParquetWriter(sink, table.schema)
                writers[i].write_table(rows)
    finally:
        for writer in writers:
            if writer is not None:
                writer.close()
        for sink in sinks:
            sink.close()
    counts = [np.bincount(labels[fold_of == i], minlength=n_classes).astype(int).tolist() for i in range(folds)]
    sizes = [int((fold_of == i).sum()) for i in range(folds)]
    shard = [{"uri": fold_files[i], "num_rows": sizes[i], "class_counts": counts[i]} for i in range(folds)]
    kept = {k: manifest[k] for k in ("format_version", "classes", "encoding", "source") if k in manifest}
    for i, uri in enumerate(uris):
        others = [j for j in range(folds) if j != i]
        splits = {
            "train": {
                "num_rows": sum(sizes[j] for j in others),
                "class_counts": np.sum([counts[j] for j in others], axis=0).astype(int).tolist(),
                "shards": [shard[j] for j in others],
            },
            "val": {"num_rows": sizes[i], "class_counts": counts[i], "shards": [shard[i]]},
            "test": {"num_rows": 0, "class_counts": [0] * n_classes, "shards": []},
        }
        fold_manifest = {**kept, "splits": splits, "cross_validation": {"stamp": stamp, "fold": i}}
        manifest_lib.write_manifest(uri, fold_manifest)
    logger.info("wrote %d folds of %s (%s images) under %s", folds, data_uri, "/".join(map(str, sizes)), dest)
    return uris


def fold_config(meta: dict[str, Any], overrides: list[str], runs_uri: str, fold: int, folds_id: str = "") -> Config:
    """The audited model's recorded training config for fold ``fold``: Parquet input, no tracking, ``overrides``
    (dotted ``key=value``, checked like ``--set``) applied, the run at ``runs_uri/fold-I-DIGEST`` (DIGEST: of the
    config and ``folds_id``, which names the folds, so a changed config or a re-made split trains a new run instead of
    resuming one trained otherwise)."""
    recorded = meta.get("train_config") or {}
    if not recorded:
        raise CrossValidationError(
            f"model {meta.get('name')} records no training config (train_config): cross-validation retrains it"
        )
    recorded = json.loads(json.dumps(recorded))
    # Fold runs are the audit's own, not the user's training runs: untracked, as a search's trials are, unless
    # audit.fold_overrides asks for tracking.
    recorded.setdefault("train", {})["tracking"] = []
    try:
        data = apply_overrides(recorded, overrides)
    except ConfigError as exc:
        raise CrossValidationError(f"audit.fold_overrides: {exc}") from None
    data.setdefault("data", {})["format"] = "parquet"
    digest = hashlib.sha256(json.dumps([data, folds_id], sort_keys=True, default=str).encode()).hexdigest()[:8]
    data.setdefault("train", {}).update(
        {"storage_path": runs_uri, "run_name": f"fold-{fold}-{digest}", "package_name": f"{meta['name']}-fold-{fold}"}
    )
    try:
        return section_from_dict(Config, data, f"audit.fold_overrides (fold {fold})")
    except ConfigError as exc:
        raise CrossValidationError(str(exc)) from None


def _fold_trial(config: dict[str, Any], datasets: list[str], configs: list[Config]) -> None:
    """One Tune trial: the Ray Train run of one fold (its epochs reported to Tune)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from cls_ray.train.trainer import build_trainer

    fold = int(config["fold"])
    cfg = configs[fold]
    trainer = build_trainer(
        datasets[fold],
        cfg,
        storage_path=cfg.train.storage_path,
        run_name=cfg.train.run_name,
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()


def _run_folds(todo: list[int], datasets: list[str], configs: list[Config], root: str) -> None:
    import ray.tune as ray_tune

    from cls_ray import ray_internals
    from cls_ray.tune.tuner import DRIVER_RESOURCES, derive_max_concurrent_trials

    ray_internals.stop_tune_credential_propagation()  # before the trainable's actor class is made
    fs, path = storage.resolve(root)
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(_fold_trial, datasets=datasets, configs=configs), DRIVER_RESOURCES
    )
    name = f"{TUNE_DIR}-" + "-".join(map(str, todo))
    run_config = ray_tune.RunConfig(
        name=name, storage_path=path, storage_filesystem=fs, failure_config=ray_tune.FailureConfig(max_failures=0)
    )
    exp_path = storage.resolve(storage.join(root, name))[1]
    if ray_tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        tuner = ray_tune.Tuner.restore(
            exp_path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
        )
    else:
        tuner = ray_tune.Tuner(
            trainable,
            param_space={"fold": ray_tune.grid_search(todo)},
            tune_config=ray_tune.TuneConfig(
                max_concurrent_trials=derive_max_concurrent_trials(configs[todo[0]]),
                trial_name_creator=lambda t: f"fold_{t.config['fold']}",
                trial_dirname_creator=lambda t: f"fold_{t.config['fold']}",
            ),
            run_config=run_config,
        )
    grid = tuner.fit()
    failed = [(r.config.get("fold"), r.error) for r in grid if r.error is not None]
    if failed:
        fold, error = failed[0]
        first = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise CrossValidationError(f"training fold {fold} failed ({len(failed)} of {len(todo)} folds): {first}")


def cross_validate(
    model_uri: str,
    data_uri: str,
    dest: str,
    *,
    folds: int,
    seed: int = 0,
    overrides: list[str] | None = None,
    batch_size: int = 128,
    use_gpu: bool = False,
    max_replicas: int | None = None,
) -> FoldScores:
    """Out-of-sample logits of every image of ``data_uri``'s train split from ``folds`` models retrained with the
    config of ``model_uri`` (see the module docstring); everything is written under ``dest``."""
    from cls_ray.package import read_package_meta
    from cls_ray.report.passes import CLEAN, run_passes
    from cls_ray.train.results import load_run_result
    from cls_ray.train.trainer import export_package

    if folds < 2:
        raise CrossValidationError(f"audit.folds must be at least 2, not {folds}")
    data_uri, dest = storage.absolute(data_uri), storage.absolute(dest)
    meta = read_package_meta(model_uri)
    manifest = manifest_lib.read_manifest(data_uri)
    if not manifest["splits"].get("train", {}).get("num_rows"):
        raise CrossValidationError(f"{data_uri} has no images in its train split to cross-validate")
    runs = storage.join(dest, RUNS_DIR)
    folds_id = json.dumps(_fold_stamp(data_uri, manifest, folds, seed), sort_keys=True)
    configs = [fold_config(meta, list(overrides or []), runs, i, folds_id) for i in range(folds)]
    datasets = write_fold_datasets(data_uri, manifest, folds, seed, dest)
    packages = [storage.join(runs, c.train.run_name, PACKAGE_DIR) for c in configs]
    stamps = [manifest_lib.manifest_digest(manifest_lib.read_manifest(u)) for u in datasets]

    def fresh(i: int) -> bool:
        try:
            return read_package_meta(packages[i])["dataset"]["manifest_digest"] == stamps[i]
        except Exception:  # no package yet (or an unreadable one): train the fold
            return False

    todo = [i for i in range(folds) if not fresh(i)]
    if todo:
        logger.info("training folds %s of %d with %s", todo, folds, configs[0].model.name)
        _run_folds(todo, datasets, configs, dest)
        for i in todo:
            run_uri = storage.join(runs, configs[i].train.run_name)
            export_package(load_run_result(run_uri), datasets[i], configs[i], packages[i])
    paths: list[str] = []
    labels, logits, fold_ids, top1 = [], [], [], []
    for i, uri in enumerate(datasets):
        results = run_passes(
            packages[i],
            uri,
            manifest_lib.read_manifest(uri),
            "val",
            [(CLEAN, 0)],
            batch_size=batch_size,
            use_gpu=use_gpu,
            max_replicas=max_replicas,
            desc=f"audit fold {i}",
        )
        paths += results.paths
        labels.append(results.labels)
        logits.append(results.logits)
        fold_ids.append(np.full(len(results.paths), i, dtype=np.int64))
        top1.append(float((results.logits.argmax(axis=1) == results.labels).mean()))
    return FoldScores(
        paths=paths,
        labels=np.concatenate(labels),
        logits=np.concatenate(logits),
        fold=np.concatenate(fold_ids),
        packages=packages,
        fold_top1=top1,
    )
