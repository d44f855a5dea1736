"""Multi-node fault tolerance: a Ray cluster of a head and two trainer nodes loses the node of one training worker
mid-run; Ray Train restarts the worker group on a replacement node from the last checkpoint and the run completes
with every epoch exactly once in its history."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from cls_ray.config import IngestConfig, load_config
from cls_ray.data.ingest import ingest
from cls_ray.train.history import read_history
from cls_ray.train.trainer import train

pytestmark = [pytest.mark.ray, pytest.mark.slow]

HEAD = {"num_cpus": 2, "object_store_memory": 200 * 1024**2, "include_dashboard": False}
TRAINER_NODE = {"num_cpus": 1, "resources": {"trainer": 1}, "object_store_memory": 150 * 1024**2}
"""Each training worker reserves 1 CPU and the custom ``trainer`` resource, so exactly one lands on each trainer
node; the head's 2 CPUs run the driver, the Train controller and Ray Data's tasks."""


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args=HEAD)
    first = cluster.add_node(**TRAINER_NODE)
    cluster.add_node(**TRAINER_NODE)
    ray.init(address=cluster.address)
    yield cluster, first
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def small_digits_dataset(tmp_path_factory) -> str:
    from conftest import write_digits_folders

    root = write_digits_folders(tmp_path_factory.mktemp("failover-folders"), per_class=60)
    dest = str(tmp_path_factory.mktemp("failover-data") / "digits")
    ingest(str(root), dest, IngestConfig(), summary=False)
    return dest


def test_losing_a_worker_node_resumes_from_the_last_checkpoint(cluster, small_digits_dataset, tmp_path):
    cluster, worker_node = cluster
    cfg = load_config(
        None,
        [
            "model.name=resnet10t",
            "model.image_size=32",
            "model.crop_pct=1.0",
            "data.batch_size=32",
            "data.auto_augment=null",
            "data.color_jitter=0",
            "data.hflip=0",
            "data.re_prob=0",
            "data.decode_cpus=0.5",
            "data.decode_concurrency=1",
            "optim.warmup_epochs=0",
            "optim.lr=0.003",
            "train.num_workers=2",
            "train.cpus_per_worker=1",
            "train.worker_resources={trainer: 1}",
            "train.epochs=3",
            "train.max_failures=2",
            f"train.storage_path={tmp_path / 'runs'}",
            "train.run_name=failover",
        ],
    )
    run_dir = tmp_path / "runs" / "failover"
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(train, small_digits_dataset, cfg)
        deadline = time.monotonic() + 400
        while not (snapshot.exists() and "epoch-0001" in snapshot.read_text()):
            assert not future.done(), f"the run ended before its first checkpoint: {future.exception()}"
            assert time.monotonic() < deadline, "timed out waiting for the first checkpoint"
            time.sleep(0.5)
        cluster.remove_node(worker_node)  # takes one training worker (and its object store) with it
        cluster.add_node(**TRAINER_NODE)  # room to place the restarted worker group
        result = future.result(timeout=600)

    history = read_history(str(run_dir))
    assert [r["epoch"] for r in history] == [1, 2, 3]  # the epoch counter continued, nothing lost or repeated
    restarts = {r["resumed_from"] for r in history} - {None}
    assert len(restarts) == 1, history
    (start,) = restarts
    assert 1 <= start < 3
    assert all(r["resumed_from"] is None for r in history[:start])
    assert all(r["resumed_from"] == start for r in history[start:])
    assert result.metrics["epoch"] >= start and Path(result.package_uri, "model.json").exists()
    assert result.metrics["val_top1"] > 0.3
