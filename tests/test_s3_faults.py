"""Storage faults on a real S3 server (SeaweedFS, this module's own, so killing it never touches other modules):
the server killed during ingest and during training, wrong credentials / missing bucket / refused endpoint, and
slow or resetting connections (a loopback TCP proxy). The training tests share one Ray instance.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import S3Server, assert_secret_absent, free_port, s3_environment
from PIL import Image

from cls_ray import storage
from cls_ray.config import IngestConfig
from cls_ray.data.ingest import ingest
from cls_ray.data.manifest import read_manifest

logger = logging.getLogger(__name__)


class TcpProxy:
    """A loopback TCP proxy in front of the S3 server: ``delay_s`` before each forwarded chunk (both ways); the
    first ``max_resets`` connections that carry more than ``reset_after`` bytes of answers are reset (RST) there."""

    def __init__(
        self,
        upstream_port: int,
        delay_s: float = 0.0,
        max_resets: int = 0,
        reset_after: int = 16384,
        chunk: int = 16384,
    ):
        self.upstream_port, self.delay_s, self.chunk = upstream_port, delay_s, chunk
        self.max_resets, self.reset_after = max_resets, reset_after
        self.connections = self.resets = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        threading.Thread(target=self._pump, args=(client, upstream, self.chunk, self.delay_s), daemon=True).start()
        sent = 0
        try:
            while data := upstream.recv(self.chunk):
                if self.delay_s:
                    time.sleep(self.delay_s)
                if self.resets < self.max_resets and sent + len(data) > self.reset_after:
                    self.resets += 1
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
                    client.shutdown(socket.SHUT_RD)  # wakes the request pump, so the close below is the last one
                    break
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, chunk: int, delay_s: float) -> None:
        try:
            while data := src.recv(chunk):
                if delay_s:
                    time.sleep(delay_s)
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        self._listener.close()


@pytest.fixture(scope="module")
def faulty_s3(s3_server):
    """This module's own S3 server (same credentials as the session's), the AWS variables pointing at it while the
    module runs; the session's server is left alone."""
    root = Path(tempfile.mkdtemp(prefix="clsray-s3f-", dir="/tmp"))
    server = S3Server(root)
    server.start()
    session_endpoint = os.environ["AWS_ENDPOINT_URL"]
    os.environ.update(s3_environment(server.endpoint))
    try:
        yield server
    finally:
        os.environ["AWS_ENDPOINT_URL"] = session_endpoint
        server.kill()
        shutil.rmtree(root, ignore_errors=True)


def _bucket(server: S3Server, name: str) -> str:
    import boto3

    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


def _objects(server: S3Server, bucket: str, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=server.endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def noise_folders(tmp_path_factory) -> Path:
    """Two classes of 30 incompressible 256 px RGB noise PNGs (~190 KB each, ~11 MB in all)."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(1)
    for c in ("noise_a", "noise_b"):
        (root / c).mkdir()
        for i in range(30):
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(root / c / f"{i:03d}.png")
    return root


INGEST_SMALL_SHARDS = ["--set", "ingest.shard_size_mb=1"]  # many shards: the kill lands between two of them


def _cli(args: list[str], env: dict[str, str], timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cls_ray.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


# ------------------------------------------------------------------------------------------------------------
# Ingest


def test_server_killed_during_ingest_fails_naming_the_uri_and_a_rerun_completes(faulty_s3, noise_folders):
    bucket = _bucket(faulty_s3, "ingest-killed")
    dest = f"{bucket}/ds"
    # Writes go through a slow proxy (about 1 MB/s), so the kill lands while shards are being written.
    proxy = TcpProxy(int(faulty_s3.endpoint.rsplit(":", 1)[1]), delay_s=0.015)
    # A short retry budget: the server stays down, and the test wants the failure, not the minute of retries.
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint, "CLS_RAY_S3_MAX_ATTEMPTS": "3", "CLS_RAY_S3_RETRY_S": "3"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cls_ray.cli", "ingest", str(noise_folders), dest, *INGEST_SMALL_SHARDS],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not _objects(faulty_s3, "ingest-killed", "ds/train/"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        faulty_s3.kill()
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proxy.close()
        if faulty_s3.process is None:
            faulty_s3.start()
    assert proc.returncode == 1, stderr[-3000:]
    assert f"cls-ray ingest: error: writing the train shards failed: {dest}" in stderr, stderr[-3000:]
    assert "is the S3 endpoint reachable" in stderr
    written = _objects(faulty_s3, "ingest-killed", "ds/")
    assert written and "ds/manifest.json" not in written  # some shards, never a manifest: not a dataset

    rerun = _cli(["ingest", str(noise_folders), dest, *INGEST_SMALL_SHARDS], dict(os.environ))  # the same command
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    uninterrupted = ingest(str(noise_folders), f"{bucket}/clean", IngestConfig(shard_size_mb=1), summary=False)
    assert len(uninterrupted["splits"]["train"]["shards"]) > 3
    assert read_manifest(dest) == uninterrupted
    assert sorted(k.removeprefix("ds/") for k in _objects(faulty_s3, "ingest-killed", "ds/")) == sorted(
        k.removeprefix("clean/") for k in _objects(faulty_s3, "ingest-killed", "clean/")
    )  # no leftovers


def test_wrong_secret_missing_bucket_and_refused_endpoint_fail_before_any_work(
    faulty_s3, noise_folders, tmp_path, monkeypatch
):
    from cls_ray.config import load_config
    from cls_ray.train.trainer import train

    bucket = _bucket(faulty_s3, "early-checks")
    cases = {
        "wrong secret": (
            {"AWS_SECRET_ACCESS_KEY": "not-the-secret"},
            f"{bucket}/ds",
            ["'early-checks'", "check the AWS credentials", "AWS_SECRET_ACCESS_KEY"],
        ),
        "missing bucket": (
            {},
            "s3://no-such-bucket-here/ds",
            ["the bucket does not exist", "'no-such-bucket-here'", "AWS_ENDPOINT_URL"],
        ),
        "refused endpoint": (
            {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"},
            f"{bucket}/ds",
            ["is the S3 endpoint reachable", "'early-checks'", "AWS_ENDPOINT_URL"],
        ),
    }
    for name, (env, dest, expected) in cases.items():
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            for what, call in (
                ("ingest", lambda d=dest: ingest(str(noise_folders), d, IngestConfig(), summary=False)),
                (
                    "train",
                    lambda d=dest: train(
                        str(tmp_path / "no-data-needed"), load_config(None, [f"train.storage_path={d}"])
                    ),
                ),
            ):
                started = time.monotonic()
                with pytest.raises((OSError, ValueError)) as info:
                    call()
                message = str(info.value)
                assert time.monotonic() - started < 10, f"{name}/{what}: took too long"
                assert dest in message and all(e in message for e in expected), f"{name}/{what}: {message}"
    assert _objects(faulty_s3, "early-checks", "") == []  # nothing was written


# ------------------------------------------------------------------------------------------------------------
# Slow and resetting connections


def test_reads_through_a_slow_resetting_connection_retry_and_finish(faulty_s3, noise_folders):
    bucket = _bucket(faulty_s3, "slow-reads")
    manifest = ingest(str(noise_folders), f"{bucket}/ds", IngestConfig(shard_size_mb=2), summary=False)
    shards = [s["path"] for split in manifest["splits"].values() for s in split["shards"]]

    def read_all() -> tuple[list, float]:
        started = time.monotonic()
        fs, root = storage.resolve(f"{bucket}/ds")
        tables = [pq.read_table(f"{root}/{p}", filesystem=fs).column("image").to_pylist() for p in shards]
        return tables, time.monotonic() - started

    direct, direct_s = read_all()
    port = int(faulty_s3.endpoint.rsplit(":", 1)[1])
    for proxy in (TcpProxy(port, delay_s=0.002, max_resets=3, reset_after=300_000), TcpProxy(port, delay_s=0.004)):
        try:
            with pytest.MonkeyPatch.context() as m:
                m.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
                proxied, proxied_s = read_all()
        finally:
            proxy.close()
        assert proxied == direct
        mb = sum(len(b) for t in direct for b in t) / 2**20
        logger.warning(
            "read %.1f MB: %.1f MB/s direct, %.1f MB/s through the proxy (delay %.3f s per 16 KB, %d of "
            "%d connections reset)",
            mb,
            mb / direct_s,
            mb / proxied_s,
            proxy.delay_s,
            proxy.resets,
            proxy.connections,
        )
        assert proxied_s > direct_s  # the drop is there to see, not hidden
        assert proxy.resets == proxy.max_resets  # each reset read was retried on a new connection


def test_storage_calls_ride_out_a_restart_and_the_filesystem_pickles_without_the_secret(faulty_s3):
    """Every call through the filesystem cls-ray hands out (its own, Ray Data's, Ray Train's) retries a store that
    is down for seconds; an error another attempt cannot fix raises at once; the pickled filesystem Ray ships to
    workers holds no credentials."""
    import pickle

    from conftest import S3_SECRET_KEY

    from cls_ray.retrying_fs import is_transient

    bucket = _bucket(faulty_s3, "restart")
    storage.write_bytes(f"{bucket}/before", b"x")
    faulty_s3.kill()
    restarter = threading.Timer(4.0, faulty_s3.start)
    restarter.start()
    started = time.monotonic()
    try:
        storage.write_bytes(f"{bucket}/during", b"written while the store restarted")
        assert storage.read_bytes(f"{bucket}/during") == b"written while the store restarted"
    finally:
        restarter.join()
    assert time.monotonic() - started >= 3.5  # it really waited for the store
    started = time.monotonic()
    with pytest.raises(storage.StorageError, match="restart/missing"):
        storage.read_bytes(f"{bucket}/missing")
    assert time.monotonic() - started < 2  # a missing object is not retried
    assert not is_transient(PermissionError("AWS Error ACCESS_DENIED"))
    assert is_transient(OSError("AWS Error NETWORK_CONNECTION during PutObject: curlCode: 7, Couldn't connect"))
    fs, _ = storage.resolve(f"{bucket}/x")
    shipped = pickle.dumps(fs)
    assert S3_SECRET_KEY.encode() not in shipped
    assert pickle.loads(shipped).get_file_info(f"{bucket.removeprefix('s3://')}/before").size == 1


# ------------------------------------------------------------------------------------------------------------
# Training


def _snapshot_epochs(server: S3Server, bucket: str, run: str) -> list[int]:
    """Epochs of the checkpoints Ray Train has registered (its snapshot, written after an upload completes); [] while
    the server is down or before the first."""

    import boto3
    import botocore.config

    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        config=botocore.config.Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2),
    )
    try:
        body = client.get_object(Bucket=bucket, Key=f"{run}/checkpoint_manager_snapshot.json")["Body"].read()
    except Exception:  # noqa: BLE001 - no snapshot yet, or the server is down: nothing registered we can see
        return []
    return sorted({int(p) for p in re.findall(r"epoch-(\d{4})", body.decode())})


def test_server_killed_during_training_retries_then_fails_clearly_and_a_rerun_resumes(faulty_s3, tmp_path):
    """The run's storage on the real server: a 5 s outage after the first checkpoint is ridden out (the uploads
    retry with backoff, ``CLS_RAY_S3_RETRY_S``) and every epoch is recorded once; a server that stays down past the
    retry bound stops the
    run with an error naming the run's URI; once the server is back, the same command resumes from the last
    checkpoint Ray Train registered, losing at most the epoch in flight."""
    from conftest import FAST_TRAIN, write_digits_folders

    from cls_ray.train.history import read_history

    folders = write_digits_folders(tmp_path / "digits", per_class=40)
    dataset = tmp_path / "dataset"  # local: the faults are the run's (checkpoints, history, package)
    ingest(str(folders), str(dataset), IngestConfig(), summary=False)
    bucket = _bucket(faulty_s3, "train-faults")
    run_uri = f"{bucket}/runs/faulty"
    args = ["train", "--data", str(dataset)]
    for item in (*FAST_TRAIN, f"train.storage_path={bucket}/runs", "train.run_name=faulty", "train.epochs=6",
                 "train.num_workers=1", "train.max_failures=0"):  # fmt: skip
        args += ["--set", item]
    env = {**os.environ, "CLS_RAY_S3_RETRY_S": "20"}  # rides out 5 s; the final outage fails after 20 s
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "first.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cls_ray.cli", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )

    def wait_epochs(at_least: int, timeout_s: float) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while (epochs := _snapshot_epochs(faulty_s3, "train-faults", "runs/faulty")) == [] or epochs[-1] < at_least:
            assert proc.poll() is None, f"the run ended ({proc.returncode}):\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no checkpoint of epoch {at_least}:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        return epochs

    try:
        first = wait_epochs(1, 300)[-1]
        faulty_s3.kill()  # a short outage: the run must ride it out
        time.sleep(5)
        faulty_s3.start()
        after_outage = wait_epochs(first + 2, 180)[-1]  # two more epochs registered after the outage
        faulty_s3.kill()  # and now for good, past the retry bound
        killed = time.monotonic()
        proc.wait(240)
        stopped_after = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
        if faulty_s3.process is None:
            faulty_s3.start()
    text = log.read_text()
    assert proc.returncode != 0, text[-3000:]
    # One clear line (Ray's own echo of the worker logs may still arrive around it: issue 25's quiet console).
    error = next((line for line in text.splitlines() if line.startswith("cls-ray train: error")), None)
    assert error is not None, text[-3000:]
    assert "training run s3://train-faults/runs/faulty failed" in error and "resumes it" in error, error
    registered = _snapshot_epochs(faulty_s3, "train-faults", "runs/faulty")
    assert registered and registered[-1] >= after_outage
    before = [r["epoch"] for r in read_history(run_uri)]
    assert before == list(range(1, len(before) + 1))  # the outage lost nothing and repeated nothing
    assert before[-1] < 6
    print(f"training faults: outage after epoch {first} ridden out; run stopped {stopped_after:.0f} s after the "
          f"final kill; epochs recorded {before}, checkpoints registered {registered}")  # fmt: skip

    checkpoint = _objects(faulty_s3, "train-faults", f"runs/faulty/epoch-{registered[-1]:04d}/")
    assert any(k.endswith("model.safetensors") for k in checkpoint), checkpoint  # registered means complete

    rerun = _cli(args, env, timeout_s=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    history = read_history(run_uri)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5, 6]  # none lost, none repeated
    (resumed,) = {r["resumed_from"] for r in history if r["resumed_from"] is not None}
    assert resumed == registered[-1]  # the last registered (complete) checkpoint
    assert resumed >= before[-1] - 1  # at most the epoch in flight was lost
    # The package, named after the dataset's class folders (no train.package_name).
    assert storage.read_json(f"{run_uri}/package/model.json")["name"] == "digits"
    # Neither the run (config, history, checkpoints, package) nor the driver's logs carry the secret key.
    texts = {"first driver": text, "re-run driver": rerun.stdout + rerun.stderr}
    assert assert_secret_absent(uris=(run_uri,), texts=texts) > 10
