"""cls-ray's commands connect to Ray the way ``ray.init()`` does, except that a dead cluster address left in
``ray_current_cluster`` by a killed ``ray start`` head (or a crashed test cluster) no longer hangs them for minutes:
they say what they ignored and start a local instance; ``serve --detach`` refuses at once, naming the file."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port

from cls_ray.ray_connect import answers, ensure_ray, recorded_address


@pytest.fixture()
def ray_tmpdir(monkeypatch) -> Iterator[Path]:
    """A RAY_TMPDIR of its own (short: Ray's unix socket paths have a length limit) holding a stale address file."""
    root = Path(tempfile.mkdtemp(prefix="crc-", dir="/tmp"))
    (root / "ray").mkdir()
    monkeypatch.setenv("RAY_TMPDIR", str(root))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_answers_tells_a_listening_port_from_a_closed_one():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        live = f"127.0.0.1:{server.getsockname()[1]}"
        assert answers(live)
    assert not answers(f"127.0.0.1:{free_port()}")
    assert not answers("not-an-address")


def test_detach_refuses_a_stale_address_at_once_and_leaves_the_file(ray_tmpdir):
    import ray

    dead = f"127.0.0.1:{free_port()}"
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(dead)
    assert recorded_address() == (ray_tmpdir / "ray" / "ray_current_cluster", dead)
    with pytest.raises(ConnectionError, match="ray_current_cluster names 127.0.0.1:[0-9]+, where nothing answers"):
        ensure_ray(existing_cluster=True)
    assert not ray.is_initialized()
    assert (ray_tmpdir / "ray" / "ray_current_cluster").read_text() == dead  # Ray's file: not ours to delete


@pytest.mark.ray
@pytest.mark.slow
def test_a_stale_address_is_reported_and_a_local_instance_started(ray_tmpdir):
    dead = f"127.0.0.1:{free_port()}"
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(dead)
    script = (
        "import logging, ray\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from cls_ray.ray_connect import ensure_ray\n"
        "ensure_ray()\n"
        "print('GCS', ray.get_runtime_context().gcs_address)\n"
        "print('CPUS', ray.cluster_resources().get('CPU'))\n"
        "ray.shutdown()\n"
    )
    # ray.init() itself would retry the dead address for minutes: the timeout is what would fail here.
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "RAY_TMPDIR": str(ray_tmpdir)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"records a Ray cluster at {dead}, but nothing answers there" in proc.stderr
    gcs = next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("GCS "))
    assert gcs != dead
    assert float(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("CPUS "))) >= 1
