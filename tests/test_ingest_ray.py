"""``ingest.engine=ray`` on a real 2-node Ray cluster (``ray.cluster_utils.Cluster``) over the real S3 server: the
dataset equals the single-machine path's byte for byte (Pillow's odd and hostile images included) with work on both
nodes; a decoder crash or hang refuses one file; a node lost mid-ingest and a driver killed mid-ingest are both
survived with the same dataset; a prefix of more than 10,000 objects is listed completely, in parallel. Also the
shard plan the cluster's writers follow against the sequential writer."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import botocore.config
import pyarrow.fs as pafs
import pytest
import ray
from conftest import PILLOW_IMAGES, prometheus_samples, ray_metrics_text, write_digits_folders
from test_ingest import _NOT_READ as NOT_READ  # refusals made by the listing, before any file is read
from test_ingest import crash_or_hang  # a real segfault and hang on two named files

from cls_ray import storage
from cls_ray.config import ConfigError, IngestConfig
from cls_ray.data.ingest import ingest
from cls_ray.data.ingest_ray import WORK_DIR, scan_parallel
from cls_ray.data.manifest import manifest_uri
from cls_ray.data.parquet import Row, ShardWriter, plan_shards, write_split
from cls_ray.data.scan import scan_source
from cls_ray.data.validate import EncodeOptions, validate_file

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def slow_validate(uri: str, opts: EncodeOptions) -> dict:
    """Worker function: 50 ms per file, so that a kill lands mid-ingest."""
    time.sleep(0.05)
    return validate_file(uri, opts)


# ------------------------------------------------------------------------------------------------------------
# The shard plan (no Ray)


def test_planned_shards_are_the_shards_the_sequential_writer_writes(tmp_path):
    """plan_shards cuts where write_split cuts, and a ShardWriter given one planned shard writes that shard's exact
    bytes (row groups included): what lets the cluster write shards in parallel."""
    rng = random.Random(3)
    sizes = [rng.choice([10, 300, 5_000, 40_000, 200_000]) for _ in range(2_500)]
    rows = [Row(bytes([i % 251]) * size, i % 7, f"c/{i:05d}.png", 8, 8) for i, size in enumerate(sizes)]
    target = 1_000_000
    entry = write_split(str(tmp_path / "seq"), "train", rows, 7, target)
    plan = plan_shards(sizes, target)
    assert [s["num_rows"] for s in entry["shards"]] == plan and len(plan) > 5
    start = 0
    for index, count in enumerate(plan):
        writer = ShardWriter(str(tmp_path / "par"), "train", 7, target, first_index=index)
        for row in rows[start : start + count]:
            writer.write(row)
        (shard,) = writer.close()["shards"]
        assert shard == entry["shards"][index]
        name = f"train/part-{index:05d}.parquet"
        assert (tmp_path / "par" / name).read_bytes() == (tmp_path / "seq" / name).read_bytes()
        start += count
    assert plan_shards([], target) == [] and plan_shards([5], target) == [1]


def test_engine_options_are_checked():
    with pytest.raises(ConfigError, match="ingest.chunk_files: must be at least 1"):
        IngestConfig(chunk_files=0)
    with pytest.raises(ConfigError, match="ingest.task_cpus: must be at least 1"):
        IngestConfig(task_cpus=0)


# ------------------------------------------------------------------------------------------------------------
# On a 2-node cluster

HEAD = {"num_cpus": 1, "object_store_memory": 150 * 1024**2, "include_dashboard": False}
NODE = {"num_cpus": 1, "object_store_memory": 150 * 1024**2}


@contextlib.contextmanager
def _node_env():
    """The environment a node starts with: this module importable (its planted worker functions), and Ray's memory
    monitor weighing this node only (other jobs on a shared machine must not get its workers killed)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        env.setenv("RAY_memory_usage_threshold", "0.99")
        yield


def _add_node(cluster):
    with _node_env():
        return cluster.add_node(**NODE)


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A head and a worker node, 1 CPU each (a validation task each). The S3 variables are set first (s3_server),
    so the nodes' workers inherit them; PYTHONPATH lets them (and their validation processes) import this module's
    planted worker functions."""
    from ray.cluster_utils import Cluster

    with _node_env():
        cluster = Cluster(initialize_head=True, head_node_args=HEAD)
    state = {"cluster": cluster, "worker": _add_node(cluster)}
    ray.init(address=cluster.address)
    yield state
    ray.shutdown()
    cluster.shutdown()


def _put_tree(bucket: str, prefix: str, root: Path) -> int:
    import boto3

    client = boto3.client("s3", config=botocore.config.Config(max_pool_connections=32))
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]

    def put(path: Path) -> None:
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(root).as_posix()}", Body=path.read_bytes())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, files))
    return len(files)


def _dataset_bytes(dest: str) -> dict[str, bytes]:
    """Every object of a dataset, by its path inside it."""
    _, root = storage.resolve(dest)
    return {i.path[len(root) :].lstrip("/"): storage.read_bytes(f"s3://{i.path}") for i in storage.list_files(dest)}


def _nodes_line(caplog) -> str:
    return next(
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("validated ") and "node(s)" in r.getMessage()
    )


@pytest.fixture(scope="module")
def odd_source(cluster, tmp_path_factory) -> str:
    """On S3: 30 digits per class, every Pillow test image (odd, broken, hostile) as a class, an empty file, a text
    file, a hidden one, and two files a planted decoder crashes or hangs on."""
    import boto3

    root = tmp_path_factory.mktemp("odd-source")
    write_digits_folders(root, per_class=30)
    for path in PILLOW_IMAGES.rglob("*"):
        if path.is_file() and not path.is_symlink():
            out = root / "odd" / path.relative_to(PILLOW_IMAGES)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(path.read_bytes())
    good = root / "digit_0" / sorted(os.listdir(root / "digit_0"))[0]
    for name in ("crash.png", "hang.png"):  # planted: crash_or_hang segfaults or hangs on these
        (root / "digit_3" / name).write_bytes(good.read_bytes())
    (root / "digit_1" / "empty.png").write_bytes(b"")
    (root / "digit_1" / "notes.txt").write_text("not an image")
    (root / "digit_2" / ".hidden.png").write_bytes(b"junk")
    bucket = "ingest-ray-odd"
    boto3.client("s3").create_bucket(Bucket=bucket)
    _put_tree(bucket, "src", root)
    return f"s3://{bucket}/src"


def test_cluster_ingest_equals_the_single_machine_dataset(cluster, odd_source, caplog):
    """Also: a decoder crash or hang in a task's pool refuses that one file, as in the single-machine pool."""
    bucket = odd_source.rsplit("/", 1)[0]
    common = {"shard_size_mb": 1, "file_timeout_s": 10}
    pool_cfg = IngestConfig(engine="pool", num_workers=2, **common)
    pool = ingest(odd_source, f"{bucket}/pool", pool_cfg, summary=False, validate=crash_or_hang)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="cls_ray"):
        on_ray = ingest(
            odd_source,
            f"{bucket}/ray",
            IngestConfig(engine="ray", chunk_files=64, task_cpus=1, **common),
            summary=False,
            validate=crash_or_hang,
        )
    assert time.monotonic() - started < 300
    assert on_ray == pool
    reasons = {s["path"]: s["reason"] for s in on_ray["skipped"]}
    assert reasons["digit_3/crash.png"] == "decoder_crash" and reasons["digit_3/hang.png"] == "timeout"
    assert reasons["odd/decompression_bomb.gif"] == "too_many_pixels" and reasons["digit_1/empty.png"] == "empty"
    assert reasons["odd/truncated_jpeg.jpg"] == "corrupt" and reasons["digit_1/notes.txt"] == "not_an_image"
    assert sum(len(s["shards"]) for s in on_ray["splits"].values()) > 5  # many shards, written by separate tasks
    pool_objects, ray_objects = _dataset_bytes(f"{bucket}/pool"), _dataset_bytes(f"{bucket}/ray")
    assert sorted(ray_objects) == sorted(pool_objects)  # no _work left behind
    assert not any(name.startswith(WORK_DIR) for name in ray_objects)
    assert ray_objects == pool_objects  # manifest and every shard, byte for byte
    assert "on 2 node(s)" in _nodes_line(caplog)  # both nodes validated chunks
    assert any("ingest engine: ray (ingest.engine=ray)" in r.getMessage() for r in caplog.records)

    # The job's progress reached the Ray dashboard's metrics (the head node's Prometheus endpoint)
    want = {
        "listed": on_ray["counts"]["files"],
        "validated": on_ray["counts"]["files"],
        "refused": sum(1 for s in on_ray["skipped"] if s["reason"] not in NOT_READ),
        "written": sum(s["num_rows"] for s in on_ray["splits"].values()),
    }
    deadline, seen = time.monotonic() + 60, {}
    while seen != want and time.monotonic() < deadline:
        samples = prometheus_samples(ray_metrics_text(), "ray_cls_ray_ingest_files")
        seen = {lab["stage"]: int(v) for lab, v in samples if lab.get("dataset") == f"{bucket}/ray"}
        time.sleep(1)
    assert seen == want


def _chunk_results(dest: str) -> int:
    chunks = storage.join(dest, WORK_DIR, "chunks")
    return len(storage.list_files(chunks)) if storage.exists(chunks) else 0


@pytest.fixture(scope="module")
def digits_source(cluster, tmp_path_factory) -> str:
    import boto3

    root = write_digits_folders(tmp_path_factory.mktemp("digits-source"), per_class=30)
    bucket = "ingest-ray-digits"
    boto3.client("s3").create_bucket(Bucket=bucket)
    _put_tree(bucket, "src", root)
    return f"s3://{bucket}/src"


SLOW = {"chunk_files": 10, "task_cpus": 1, "shard_size_mb": 1}  # 30 chunks of 0.5 s of work each


@pytest.fixture(scope="module")
def digits_pool(digits_source) -> tuple[dict, dict[str, bytes]]:
    """The single-machine dataset of ``digits_source``: its manifest and objects."""
    dest = f"{digits_source.rsplit('/', 1)[0]}/pool"
    manifest = ingest(digits_source, dest, IngestConfig(engine="pool", shard_size_mb=1), summary=False)
    return manifest, _dataset_bytes(dest)


def test_a_driver_killed_mid_ingest_is_resumed_from_its_chunks(cluster, digits_source, digits_pool, caplog):
    bucket = digits_source.rsplit("/", 1)[0]
    dest = f"{bucket}/resumed"
    script = (
        "import sys; from cls_ray.config import IngestConfig; from cls_ray.data.ingest import ingest; "
        "from test_ingest_ray import SLOW, slow_validate; "
        "ingest(sys.argv[1], sys.argv[2], IngestConfig(engine='ray', **SLOW), validate=slow_validate)"
    )
    env = {**os.environ, "RAY_ADDRESS": cluster["cluster"].address, "PYTHONPATH": str(TESTS)}
    driver = subprocess.Popen([sys.executable, "-c", script, digits_source, dest], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while _chunk_results(dest) < 4:
            assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no chunk finished in time"
            time.sleep(0.2)
    finally:
        driver.kill()
        driver.wait()
    done_before = _chunk_results(dest)
    assert 4 <= done_before < 30 and not storage.exists(manifest_uri(dest))  # interrupted, nothing published

    with caplog.at_level(logging.INFO, logger="cls_ray"):
        resumed = ingest(digits_source, dest, IngestConfig(engine="ray", **SLOW), summary=False)
    seen = [r.getMessage() for r in caplog.records]
    reused = next(line for line in seen if "chunks done by an earlier run reused" in line)
    assert int(reused.rsplit("; ", 1)[1].split()[0]) >= done_before  # (more may have finished before the kill)
    assert resumed == digits_pool[0]
    assert _dataset_bytes(dest) == digits_pool[1]


def test_a_node_lost_mid_ingest_is_survived_with_the_same_dataset(cluster, digits_source, digits_pool, caplog):
    bucket = digits_source.rsplit("/", 1)[0]
    dest = f"{bucket}/node-lost"
    with ThreadPoolExecutor(1) as pool, caplog.at_level(logging.INFO, logger="cls_ray"):
        running = pool.submit(
            ingest, digits_source, dest, IngestConfig(engine="ray", **SLOW), summary=False, validate=slow_validate
        )
        deadline = time.monotonic() + 300
        while _chunk_results(dest) < 4:
            assert not running.done(), running.exception()
            assert time.monotonic() < deadline, "no chunk finished in time"
            time.sleep(0.2)
        cluster["cluster"].remove_node(cluster["worker"])  # its running chunk is lost with it; Ray runs it again
        lost_at = _chunk_results(dest)
        manifest = running.result(timeout=600)
    cluster["worker"] = _add_node(cluster["cluster"])  # for the tests after this one
    assert lost_at < 30
    assert manifest == digits_pool[0]
    assert _dataset_bytes(dest) == digits_pool[1]
    assert "30 chunks" in _nodes_line(caplog)


def test_a_prefix_of_more_than_10000_objects_is_listed_completely_in_parallel(cluster, s3_bucket, caplog):
    import boto3

    client = boto3.client("s3", config=botocore.config.Config(max_pool_connections=32))
    bucket = s3_bucket.removeprefix("s3://")
    keys = [f"src/class_{c:02d}/{i:04d}.png" for c in range(40) for i in range(255)]
    keys += ["src/class_00/.hidden/x.png", "src/.DS_Store", "src/README"]

    def put(key: str) -> None:
        client.put_object(Bucket=bucket, Key=key, Body=b"x")

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(put, keys))
    with caplog.at_level(logging.INFO, logger="cls_ray"):
        parallel = scan_parallel(f"{s3_bucket}/src")
    sequential = scan_source(f"{s3_bucket}/src")
    assert len(parallel.files) == 40 * 255 > 10_000
    assert parallel == sequential  # the same files, classes, skipped entries and hidden count
    assert parallel.hidden_ignored == 2 and [s["path"] for s in parallel.skipped] == ["README"]
    assert any("below 40 prefixes, 32 at a time" in r.getMessage() for r in caplog.records)


def test_pyarrow_lists_the_top_level_as_folders(s3_bucket):
    """What the parallel listing relies on: a non-recursive listing of a prefix returns its sub-prefixes."""
    import boto3

    boto3.client("s3").put_object(Bucket=s3_bucket.removeprefix("s3://"), Key="t/a/b/c.png", Body=b"x")
    fs, path = storage.resolve(f"{s3_bucket}/t")
    (entry,) = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    assert entry.type == pafs.FileType.Directory and entry.base_name == "a"
