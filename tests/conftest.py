"""Shared test fixtures: a real S3-compatible server on 127.0.0.1 and small real image datasets.

Fixture order matters for Ray: the S3 environment must be set before a module's Ray instance starts, so Ray's
workers inherit it. Modules that need both request ``s3_server`` in their Ray fixture.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PILLOW_IMAGES = SHARED / "testdata" / "pillow-images"
KUBERAY_CRDS = SHARED / "kuberay" / "crds"


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: all held at once while chosen, so the OS cannot hand out one of them twice."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; sets the standard AWS variables so every client (pyarrow, boto3, Ray
    workers started afterwards) reaches it. Yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture()
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket; yields ``s3://NAME``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
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


#: The tiny real training run whose package the report, export, predict and serve tests share (one per session).
TRAINED_PACKAGE_OVERRIDES = [
    "model.name=resnet10t", "model.image_size=32", "model.crop_pct=1.0", "data.batch_size=32",
    "data.auto_augment=null", "data.color_jitter=0", "data.re_prob=0", "data.scale=[0.6,1.0]",
    "data.eval_batch_size=128", "data.decode_cpus=0.5", "data.decode_concurrency=1", "optim.lr=0.003",
    "optim.warmup_epochs=0", "train.epochs=4", "train.num_workers=1", "train.cpus_per_worker=1",
    "train.run_name=shared", "train.package_name=digits",
]


@pytest.fixture(scope="session")
def trained_package(tmp_path_factory) -> dict[str, Path]:
    """A model package from a real ``cls-ray ingest`` + ``cls-ray train`` run (ResNet-10-T, 32 px, 4 epochs on
    1,000 digits: ~0.9 validation top-1), made once per test session in a child process with its own Ray instance.

    Yields ``{"package", "dataset", "run", "folders"}``: the package (named ``digits``), its dataset (700 train /
    150 val / 150 test), the run directory (checkpoints, ``history/``) and the class folders it was ingested from.
    Treat all of them as read-only.
    """
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("trained-package")
    folders = write_digits_folders(root / "digits", per_class=100)
    dataset, runs = root / "dataset", root / "runs"
    cli = [sys.executable, "-m", "cls_ray.cli"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = root / "train.log"
    with open(log, "wb") as out:
        for args in (["ingest", str(folders), str(dataset)],
                     ["train", "--data", str(dataset), *(a for o in TRAINED_PACKAGE_OVERRIDES for a in ("--set", o)),
                      "--set", f"train.storage_path={runs}"]):
            done = subprocess.run(cli + args, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=900, check=False)
            assert done.returncode == 0, f"cls-ray {args[0]} failed:\n{log.read_text()[-4000:]}"
    run = runs / "shared"
    return {"package": run / "package", "dataset": dataset, "run": run, "folders": folders}
