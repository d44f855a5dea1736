"""Storage faults on a real S3 server (SeaweedFS, this module's own, so killing it never touches other modules):
the server killed during ingest and during training, wrong credentials / missing bucket / refused endpoint, and
slow or resetting connections (a loopback TCP proxy). The training tests share one Ray instance.
"""

from __future__ import annotations

import contextlib
import logging
import os
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
from conftest import S3Server, free_port, s3_environment
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
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint, "CLS_RAY_S3_MAX_ATTEMPTS": "3"}
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
