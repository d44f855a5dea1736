"""A user's cluster workflow, for real: a standalone Ray 2.60 head started with ``ray start`` and token
authentication, cls-ray jobs submitted to it through ``cluster/submit.sh`` (``ray job submit`` with
``cluster/runtime_env.yaml``), reading and writing S3 (the session's SeaweedFS server on 127.0.0.1, whose
credentials the head's environment carries like a cluster node's would).

Other engineers run Ray on this machine, so the head gets its own free ports and temp dir and only the processes
it started are stopped afterwards (never ``ray stop``, which stops every Ray instance of the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import assert_secret_absent, free_ports, write_digits_folders

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "cluster" / "submit.sh"
RAY = REPO / ".venv" / "bin" / "ray"
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
    "--node-manager-port",
    "--object-manager-port",
    "--runtime-env-agent-port",
)


@dataclass
class Head:
    address: str
    token_file: Path
    process: subprocess.Popen


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment (with the S3 settings) minus any Ray address or auth setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    env["PATH"] = f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------------------------
# Starting and stopping only our own Ray processes


def _stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, ppid, start_time)`` from /proc; the start time (ticks since boot) tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def _process_tree(root: int) -> list[tuple[int, int]]:
    """``(pid, start_time)`` of ``root`` and all its descendants (Ray's workers are children of the raylet)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        info = _stat(int(entry.name)) if entry.name.isdigit() else None
        if info:
            children.setdefault(info[1], []).append(int(entry.name))
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        info = _stat(pid)
        if info:
            tree.append((pid, info[2]))
            stack.extend(children.get(pid, []))
    return tree


def _signal_alive(tree: list[tuple[int, int]], sig: int) -> int:
    """Send ``sig`` to the processes of ``tree`` that still run (same pid and start time, not a zombie)."""
    alive = 0
    for pid, start in tree:
        info = _stat(pid)
        if info and info[2] == start and info[0] != "Z":
            alive += 1
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    return alive


def _stop_head(process: subprocess.Popen) -> None:
    tree = _process_tree(process.pid)  # taken before anything exits and gets re-parented
    process.send_signal(signal.SIGTERM)  # `ray start --block` shuts its node down on SIGTERM
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    deadline = time.monotonic() + 10
    while _signal_alive(tree, signal.SIGTERM) and time.monotonic() < deadline:
        time.sleep(0.5)
    _signal_alive(tree, signal.SIGKILL)


def _wait_for_dashboard(head: Head, log: Path, timeout_s: float = 300.0) -> None:
    headers = {"Authorization": f"Bearer {head.token_file.read_text()}"}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.process.poll() is not None:
            pytest.fail(f"ray start exited with {head.process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{head.address}/api/version", headers=headers, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    pytest.fail(f"the Ray dashboard did not answer within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def ray_head(s3_server) -> Iterator[Head]:
    """``ray start --head`` with RAY_AUTH_MODE=token and its own token file, free ports and a short temp dir."""
    root = Path(tempfile.mkdtemp(prefix="clsray-", dir="/tmp"))  # short: Ray's unix socket paths have a limit
    token_file = root / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    ports = [f"{flag}={port}" for flag, port in zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True)]
    log = root / "ray-start.log"
    command = [
        str(RAY),
        "start",
        "--head",
        "--block",
        *ports,
        "--num-cpus=1",
        "--include-dashboard=true",
        f"--temp-dir={root / 'ray'}",
        "--object-store-memory=300000000",
        "--disable-usage-stats",
    ]
    env = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(address=f"http://127.0.0.1:{ports[1].split('=')[1]}", token_file=token_file, process=process)
    try:
        _wait_for_dashboard(head, log)
        yield head
    finally:
        _stop_head(process)
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------
# Helpers


def submit(
    head: Head, *args: str, env: dict[str, str] | None = None, timeout_s: float = 240
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SUBMIT), "--address", head.address, *args],
        cwd=REPO,
        env=env or _clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def job_client(head: Head):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token_file.read_text()}"})


def upload_folder(local: Path, bucket_uri: str, prefix: str) -> str:
    import boto3

    bucket = bucket_uri.removeprefix("s3://")
    client = boto3.client("s3")
    for path in sorted(local.rglob("*.png")):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")
    return f"{bucket_uri}/{prefix}"


# ------------------------------------------------------------------------------------------------------------
# Tests


def test_ingest_job_runs_on_the_cluster_from_s3_to_s3(ray_head: Head, s3_bucket: str, tmp_path: Path) -> None:
    from cls_ray.data.manifest import read_manifest

    source = upload_folder(write_digits_folders(tmp_path / "digits", per_class=6), s3_bucket, "raw")
    dest = f"{s3_bucket}/datasets/digits"
    job_id = f"cls-ray-ingest-{uuid.uuid4().hex[:8]}"
    result = submit(
        ray_head,
        "--token-file",
        str(ray_head.token_file),
        "--submission-id",
        job_id,
        "--",
        "cls-ray",
        "ingest",
        source,
        dest,
        "--config",
        "cluster/pipeline-s3.yaml",
        "--set",
        "ingest.num_workers=1",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    manifest = read_manifest(dest)  # written by the job, read back from S3 here
    assert manifest["classes"] == [f"digit_{i}" for i in range(10)]
    assert sum(s["num_rows"] for s in manifest["splits"].values()) == 60
    client = job_client(ray_head)
    assert client.get_job_status(job_id).value == "SUCCEEDED"
    logs = client.get_job_logs(job_id)
    assert "dataset complete" in logs and "manifest.json" in logs
    # The head's environment holds the credentials, as a cluster node's would: nothing the job leaves behind
    # (its metadata, runtime env and entrypoint as the dashboard shows them, its logs, the dataset) carries them.
    info = client.get_job_info(job_id)
    job_record = json.dumps(
        {"entrypoint": info.entrypoint, "metadata": info.metadata, "runtime_env": info.runtime_env}, default=str
    )
    texts = {"job record": job_record, "job logs": logs, "submit output": result.stdout + result.stderr}
    assert assert_secret_absent(uris=(dest,), texts=texts) > 3


def test_failed_job_fails_the_submission_with_cls_rays_error(ray_head: Head, s3_bucket: str) -> None:
    job_id = f"cls-ray-missing-{uuid.uuid4().hex[:8]}"
    missing = f"{s3_bucket}/no-such-folder"
    env = _clean_env(RAY_AUTH_TOKEN=ray_head.token_file.read_text())  # the token as a variable this time
    result = submit(
        ray_head, "--submission-id", job_id, "--", "cls-ray", "ingest", missing, f"{s3_bucket}/out", env=env
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    client = job_client(ray_head)
    assert client.get_job_status(job_id).value == "FAILED"
    logs = client.get_job_logs(job_id)
    assert "cls-ray ingest: error" in logs and "no-such-folder" in logs


def test_submission_without_the_right_token_is_refused(ray_head: Head) -> None:
    before = {job.submission_id for job in job_client(ray_head).list_jobs()}
    wrong = submit(ray_head, "--", "cls-ray", "--help", env=_clean_env(RAY_AUTH_TOKEN=secrets.token_hex(32)))
    assert wrong.returncode != 0 and "Authentication failed" in wrong.stdout + wrong.stderr
    # Without any token the job API answers 401 (what `ray job submit` reports as "Authentication required").
    anonymous = requests.post(f"{ray_head.address}/api/jobs/", json={"entrypoint": "cls-ray --help"}, timeout=10)
    assert anonymous.status_code == 401
    assert {job.submission_id for job in job_client(ray_head).list_jobs()} == before
