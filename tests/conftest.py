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
