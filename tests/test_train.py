"""Training on a real Ray cluster (CPU): DDP on digits (the session's shared run), packaging and evaluation, and
configurations refused before any worker starts. (Resuming a run: after its driver is killed, test_tune's killed
search; on S3 after a storage outage, test_s3_faults. A frozen backbone from a weights file: test_console's terminal
run.)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import pytest
import ray
import torch
from conftest import (
    FAST_TRAIN,
    assert_secret_absent,
    write_digits_folders,
)

from cls_ray.cli import main as cli_main
from cls_ray.config import ConfigError, IngestConfig, load_config
from cls_ray.data.ingest import ingest
from cls_ray.data.manifest import ManifestError, read_manifest
from cls_ray.evaluate import evaluate
from cls_ray.train.history import read_history
from cls_ray.train.state import read_evaluation
from cls_ray.train.trainer import train

pytestmark = pytest.mark.ray

FAST = FAST_TRAIN


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=4, object_store_memory=400 * 1024**2, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def digits_dataset(tmp_path_factory) -> str:
    """1000 real digits (100 per class), ingested: 700 train / 150 val / 150 test rows."""
    folders = write_digits_folders(tmp_path_factory.mktemp("train-folders"), per_class=100)
    dest = str(tmp_path_factory.mktemp("train-data") / "digits")
    ingest(str(folders), dest, IngestConfig(), summary=False)
    return dest


def _config(tmp_path: Path, *overrides: str):
    return load_config(None, [*FAST, f"train.storage_path={tmp_path / 'runs'}", *overrides])


def _history(run_uri: str) -> list[dict]:
    return read_history(run_uri)


def test_ddp_run_learns_packages_and_evaluate_reproduces_validation(
    ray_cluster, trained_package, mlflow_server, tmp_path
):
    """The session's shared training run (:func:`conftest.trained_package`: ``cls-ray train`` over two DDP workers,
    validated every second epoch, tracked in MLflow and TensorBoard) learned, recorded every epoch once, kept its
    best checkpoint, packaged it, and ``evaluate`` reproduces its validation metrics."""
    from conftest import TRAINED_PACKAGE_OVERRIDES

    assert {"train.num_workers=2", "train.eval_every=2", "train.epochs=4"} <= set(TRAINED_PACKAGE_OVERRIDES)
    run, package, dataset = trained_package["run"], trained_package["package"], str(trained_package["dataset"])
    history = _history(str(run))
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert [r["evaluated"] for r in history] == [False, True, False, True]
    assert "val_top1" not in history[0] and history[2]["val_top1"] == history[1]["val_top1"]  # carried forward
    assert history[3]["val_top1"] > 0.6  # 10 classes: chance is 0.1
    val_rows = read_manifest(dataset)["splits"]["val"]["num_rows"]
    for record in history:
        assert record["img_per_s"] > 0 and 0 <= record["data_wait_frac"] <= 1 and record["train_loss"] > 0
    for record in (history[1], history[3]):
        assert len(record["per_class"]) == 10 and "confusion_matrix" not in record  # O(classes), not classes^2
        assert sum(c["support"] for c in record["per_class"]) == val_rows == record["val_num_samples"]

    best = max((history[1], history[3]), key=lambda r: r["val_top1"])["epoch"]
    checkpoints = sorted(p.name for p in run.glob("epoch-*"))
    assert 1 <= len(checkpoints) <= 2 and f"epoch-{best:04d}" in checkpoints  # best kept (plus the latest)
    files = {p.name for p in (run / f"epoch-{best:04d}").iterdir()}
    assert {"model.safetensors", "train_state.pt", "checkpoint.json", "evaluation.json"} <= files
    checkpoint_eval = read_evaluation(str(run / f"epoch-{best:04d}"))
    assert checkpoint_eval["per_class"] == history[best - 1]["per_class"]
    assert sum(map(sum, checkpoint_eval["confusion_matrix"])) == val_rows
    meta = json.loads((package / "model.json").read_text())
    assert meta["architecture"] == "resnet10t" and meta["metrics"]["epoch"] == best
    assert meta["metrics"]["val_top1"] == history[best - 1]["val_top1"]
    weights = (package / "model.safetensors").read_bytes()
    assert meta["version"] == hashlib.sha256(weights).hexdigest()[:12]  # versioned by the weights' digest

    out = tmp_path / "eval"
    evaluated = evaluate(str(package), dataset, split="val", output_dir=str(out), batch_size=128)
    assert evaluated["num_samples"] == val_rows
    for key in ("top1", "top5", "f1_macro", "precision_weighted"):
        assert evaluated[key] == pytest.approx(meta["metrics"][f"val_{key}"], abs=1e-6), key
    assert evaluated["confusion_matrix"] == checkpoint_eval["confusion_matrix"]

    # MLflow (a real tracking server, read through its REST API): one finished run with the config as params, tags
    # naming the dataset, every epoch's metrics, the package as artefacts.
    (run_record,) = mlflow_server.runs("train-ddp")
    info, data = run_record["info"], run_record["data"]
    assert info["run_name"] == "shared" and info["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in data["params"]}
    assert params["model.name"] == "resnet10t" and params["train.num_workers"] == "2" and len(params) > 100
    tags = {t["key"]: t["value"] for t in data["tags"]}
    assert tags["cls_ray.dataset"] == dataset and tags["cls_ray.run_uri"] == str(run)
    assert tags["cls_ray.dataset_digest"] == meta["dataset"]["manifest_digest"]
    losses = mlflow_server.metric_history(info["run_id"], "train_loss")
    assert [(m["step"], m["value"]) for m in losses] == [(r["epoch"], pytest.approx(r["train_loss"])) for r in history]
    top1 = mlflow_server.metric_history(info["run_id"], "val_top1")
    assert top1[-1]["step"] == 4 and top1[-1]["value"] == pytest.approx(history[3]["val_top1"])
    assert {"package/model.json", "package/model.safetensors"} <= set(
        mlflow_server.artifacts(info["run_id"], "package")
    )
    # A report of the package goes to the same run (the report calls this with its folder).
    from cls_ray.tracking import log_report

    assert {"metrics.json", "confusion_matrix.json", "confusion_matrix.png", "per_class.csv"} <= {
        p.name for p in out.iterdir()
    }
    log_report(meta, str(out))
    assert "eval/metrics.json" in mlflow_server.artifacts(info["run_id"], "eval")
    assert assert_secret_absent(dirs=(trained_package["root"], tmp_path, mlflow_server.root)) > 20
    # TensorBoard: TensorBoard's own event reader finds every epoch's scalars under RUN/tensorboard.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"train_loss", "img_per_s", "data_wait_frac", "val_top1"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("train_loss")] == [
        (r["epoch"], pytest.approx(r["train_loss"])) for r in history
    ]


def test_bad_configuration_is_refused_before_any_worker_starts(ray_cluster, digits_dataset, tmp_path):
    runs = tmp_path / "runs"

    def refused(error: type, match: str, data: str = digits_dataset, *overrides: str) -> None:
        started = time.monotonic()
        with pytest.raises(error, match=match):
            train(data, _config(tmp_path, "train.run_name=bad", *overrides))
        assert time.monotonic() - started < 30
        assert not runs.exists()  # nothing written, no run started

    refused(ConfigError, "model.name: timm has no architecture 'resnet_nope'", digits_dataset, "model.name=resnet_nope")
    refused(ConfigError, "train.num_workers: 9 workers", digits_dataset, "train.num_workers=9")
    refused(ConfigError, "Ray Data decoding", digits_dataset, "train.num_workers=4")  # 4 x 1 CPU of 4: none left
    empty = tmp_path / "not-a-dataset"
    empty.mkdir()
    refused(ManifestError, "no manifest.json", str(empty))
    future = tmp_path / "future-dataset"
    shutil.copytree(digits_dataset, future)
    manifest = json.loads((future / "manifest.json").read_text())
    (future / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    refused(ManifestError, "unknown manifest format_version 99", str(future))
    refused(ConfigError, "train.metric", digits_dataset, "train.metric=val_accuracy")
    refused(ConfigError, "data.batch_size: 4096", digits_dataset, "data.batch_size=4096")
    assert cli_main(["train", "--data", digits_dataset, "--set", "model.name=resnet_nope"]) == 2


@ray.remote(num_cpus=0)
def _allocator_probe() -> tuple[bool, float]:
    """Whether jemalloc is loaded in this worker process, and the page faults of allocating and filling a 64 MiB
    tensor once more after one was freed (torch's CPU allocator asks malloc for every tensor)."""
    import resource

    loaded = "libjemalloc" in Path("/proc/self/maps").read_text()
    torch.empty(64 * 2**20, dtype=torch.uint8).fill_(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.empty(64 * 2**20, dtype=torch.uint8).fill_(1)
    return loaded, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4


def test_cpu_workers_reuse_freed_memory_with_jemalloc(ray_cluster, digits_dataset, tmp_path):
    from cls_ray.train.trainer import build_trainer, worker_runtime_env

    cfg = _config(tmp_path, "train.num_workers=1")
    trainer = build_trainer(digits_dataset, cfg, storage_path=str(tmp_path / "runs"), run_name="alloc")
    env = trainer.run_config.worker_runtime_env
    assert env == worker_runtime_env(cfg) and env["env_vars"]["LD_PRELOAD"].endswith("libjemalloc.so")
    pages = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    jemalloc = ray.get(_allocator_probe.options(runtime_env=env).remote())
    system = ray.get(
        _allocator_probe.options(
            runtime_env=worker_runtime_env(_config(tmp_path, "train.cpu_allocator=system"))
        ).remote()
    )
    assert jemalloc[0] and jemalloc[1] < 0.01 * pages  # the freed pages are reused as they are
    assert not system[0] and system[1] > 0.9 * pages  # glibc maps 64 MiB afresh: a fault per page, every time
    assert worker_runtime_env(_config(tmp_path, "train.use_gpu=true")) == {}


_INTERRUPTED_IMPORT = """
def first_decode_call(interrupt_after_s):
    import signal
    from cls_ray.data.pipeline import import_decoders

    def interrupt(*_):
        raise KeyboardInterrupt  # what ray.cancel raises in a running task

    if interrupt_after_s:
        signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, interrupt_after_s)  # while torch is being imported
    decode, create_transform = import_decoders()
    signal.setitimer(signal.ITIMER_REAL, 0)
    import os, torch
    return os.getpid(), torch.autograd.grad.__name__
"""


def test_decode_worker_interrupted_while_importing_torch_is_not_reused(ray_cluster):
    """Ray Data cancels running decode tasks (KeyboardInterrupt) when a failed run's execution shuts down; a worker
    whose first ``import torch`` was interrupted must not decode the next attempt's blocks with half of torch."""
    namespace: dict = {"__name__": "interrupted_import_probe"}  # not importable: Ray ships the function by value
    exec(_INTERRUPTED_IMPORT, namespace)
    # A runtime env of its own: a fresh worker process that has not imported torch, reused by the second task.
    probe = ray.remote(num_cpus=0, max_retries=0)(namespace["first_decode_call"]).options(
        runtime_env={"env_vars": {"CLS_RAY_PROBE": f"{os.getpid()}-{time.time()}"}}
    )
    with pytest.raises(ray.exceptions.WorkerCrashedError):
        ray.get(probe.remote(0.3))
    _, grad = ray.get(probe.remote(0))
    assert grad == "grad"


def test_ray_data_waits_instead_of_spinning_behind_a_slower_consumer(ray_cluster, digits_dataset):
    """When the consumer is slower than the map stage, Ray Data backpressures the stage and its scheduling loop has
    nothing to do: with :class:`~cls_ray.data.backoff.IdleBackoff` it sleeps; without it, it runs thousands of empty
    steps a second (in the demo's training, 73% of a core taken from the training workers)."""
    import numpy as np
    from ray.data._internal.execution.execution_callback import ExecutionCallback

    from cls_ray.data import backoff
    from cls_ray.data.pipeline import build_eval_dataset, build_train_dataset
    from cls_ray.models import data_config_for

    cfg = load_config(None, FAST)
    manifest = read_manifest(digits_dataset)
    for ds in (
        build_train_dataset(digits_dataset, manifest, data_config_for(cfg.model), cfg.data),
        build_eval_dataset(digits_dataset, manifest, "val", data_config_for(cfg.model), cfg.data),
    ):
        assert backoff.IdleBackoff in ds.context.custom_execution_callback_classes

    steps: list[float] = []

    class RecordSteps(ExecutionCallback):
        def on_execution_step(self, executor) -> None:
            steps.append(time.monotonic())

    # The shape of cls-ray's train dataset (backoff.install, reservations off, one map task at a time; 28 px rows)
    # on a source big enough to stay backpressured for seconds.
    ds = ray.data.range(20_000, override_num_blocks=40)
    ds.context.op_resource_reservation_enabled = False
    backoff.install(ds.context)
    ds.context.custom_execution_callback_classes.append(RecordSteps)
    ds = ds.map_batches(
        lambda batch: {"image": np.zeros((len(batch["id"]), 28, 28, 3), np.uint8)},
        batch_size=None,
        num_cpus=0.5,
        compute=ray.data.TaskPoolStrategy(size=1),
    )
    rows, start = 0, time.monotonic()
    for batch in ds.iter_batches(batch_size=256, prefetch_batches=1):
        time.sleep(0.05)  # a training step
        rows += len(batch["image"])
    end = time.monotonic()
    assert rows == 20_000
    window = [t for t in steps if start + 1.0 <= t <= end]
    rate = len(window) / (end - start - 1.0)
    # Sleeping steps: at most ~100 a second by construction (1 ms doubling to 50 ms, reset on progress).
    assert rate < 300, f"{rate:.0f} scheduling steps a second behind a consumer taking 50 ms per batch"


def test_cached_train_split_is_read_once_and_reshuffled_every_epoch(ray_cluster, digits_dataset, tmp_path):
    from collections import Counter
    from dataclasses import replace

    from cls_ray.data.pipeline import build_train_dataset, decode_block_rows
    from cls_ray.models import data_config_for

    # ~4 blocks per cluster CPU (4 here), within [64, 1024] rows: small splits still feed every CPU.
    assert (decode_block_rows(700), decode_block_rows(8000), decode_block_rows(10**6)) == (64, 500, 1021)
    # ...and at most one target-sized block (128 MiB) of decoded rows (891 at 224 px, 170 at 512): one decode call
    # writes a whole block. Block counts are whole rounds on the 4 CPUs: 16,000 rows at 224 px are 20 blocks of 800
    # rows, not 18 of 891 (whose last round would leave two CPUs idle).
    assert [decode_block_rows(10**6, 3 * side * side) for side in (32, 224, 512)] == [1021, 890, 170]
    assert decode_block_rows(16_000, 3 * 224 * 224) == 800
    for rows in (5_000, 16_000, 123_457, 10**6):
        block_rows = decode_block_rows(rows, 3 * 224 * 224)
        assert block_rows <= 891 and math.ceil(rows / block_rows) % 4 == 0, rows

    copy = tmp_path / "digits"
    shutil.copytree(digits_dataset, copy)
    manifest = read_manifest(str(copy))
    cfg = load_config(None, FAST)
    expected = Counter(dict(enumerate(manifest["splits"]["train"]["class_counts"])))

    def epoch(ds) -> list[int]:
        labels, shapes = [], set()
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):  # each decoded block as it is
            # One decode call per block: one contiguous chunk, which the workers' batcher slices without copying.
            assert block["image"].num_chunks == 1
            images = block["image"].chunk(0).to_numpy()
            labels += block["label"].to_pylist()
            shapes.add(images.shape[1:])
            assert images.dtype.name == "uint8"
        assert shapes == {(32, 32, 3)}  # NHWC rows: the iterators hand out NCHW views
        return labels

    streamed = build_train_dataset(
        str(copy), manifest, data_config_for(cfg.model), replace(cfg.data, cache="never"), seed=3
    )
    assert Counter(epoch(streamed)) == expected
    cached = build_train_dataset(
        str(copy), manifest, data_config_for(cfg.model), replace(cfg.data, cache="always"), seed=3
    )
    shutil.rmtree(copy / "train")  # the cached split no longer needs its shards
    first, second = epoch(cached), epoch(cached)
    assert Counter(first) == Counter(second) == expected  # every row once per epoch
    assert first != second  # a fresh shuffle each epoch
    with pytest.raises(Exception, match="train"):
        epoch(streamed)  # the streamed split reads its (now missing) shards every epoch


def test_runs_given_shared_splits_read_no_shards_unless_they_block_them_differently(
    ray_cluster, digits_dataset, tmp_path
):
    # A search reads the train and val splits once and hands them to every trial (cls_ray.tune.tuner).
    from collections import Counter
    from dataclasses import replace

    from cls_ray.data.pipeline import build_eval_dataset, build_train_dataset, read_shared_splits
    from cls_ray.models import data_config_for

    copy = tmp_path / "digits"
    shutil.copytree(digits_dataset, copy)
    manifest = read_manifest(str(copy))
    cfg = load_config(None, FAST)
    data, data_config = replace(cfg.data, cache="always"), data_config_for(cfg.model)
    shared = read_shared_splits(str(copy), manifest, ("train", "val"), data_config, data)
    assert set(shared) == {"train", "val"}
    shutil.rmtree(copy / "train")  # from here on, a run that reads a split's shards fails
    shutil.rmtree(copy / "val")

    for split, ds in (
        ("train", build_train_dataset(str(copy), manifest, data_config, data, seed=1, shared=shared)),
        ("val", build_eval_dataset(str(copy), manifest, "val", data_config, data, shared=shared)),
    ):
        labels = [label for batch in ds.iter_batches(batch_size=None) for label in batch["label"]]
        assert Counter(labels) == Counter(dict(enumerate(manifest["splits"][split]["class_counts"]))), split
    # A model taking 1024 px rows needs smaller blocks (at most Ray Data's target block size decoded): that run
    # reads the split itself, and here finds its shards gone.
    large = {**data_config, "input_size": (3, 1024, 1024)}
    with pytest.raises(Exception, match="train"):
        build_train_dataset(str(copy), manifest, large, data, seed=1, shared=shared)
