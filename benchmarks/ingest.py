"""Ingest throughput: images/s (and per core) of ``cls-ray ingest`` against a bare single-process decode loop.

Input: real Fashion-MNIST images, upscaled to 224 px RGB JPEGs in class folders (a photo-like workload: every file
is a JPEG that must be read, hashed and fully decoded). Measured, each on the same files:

- baseline: one process, ``Image.open(f).convert("RGB")`` per file (no hashing, no writing);
- the validation stage alone, on the pebble process pool that ingest uses and on Ray Data (``map`` over the file
  list), to choose between them; "cold" includes starting the workers (the fork server, or ``ray.init``), "warm"
  and "job only" do not;
- the whole ``ingest`` to local disk, with near-duplicate detection (the default, ``near_duplicates=group``: a
  perceptual hash in the validation pass, then matching) and without (``off``), alternated ``--repeats`` times, best
  of each; and to S3 (a moto server started here, in its own process);
- the whole ``ingest`` with ``ingest.engine=ray`` (validation and shard writing as Ray tasks, on a local Ray
  instance of ``--workers`` CPUs): "cold" with ``ray.init`` and the tasks' first pools, "warm" a second run on the
  same instance;
- with ``--listing N``: listing N objects in 100 class folders on a real S3 server (SeaweedFS, as the tests run it),
  the plain paginated listing (``scan_source``) against the Ray engine's concurrent one (32 class folders at a time).

Run: ``.venv/bin/python benchmarks/ingest.py [--images 3000] [--workers 2] [--listing 100000]``.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cls_ray.config import IngestConfig
from cls_ray.data.fashion_mnist import CLASSES, load_split
from cls_ray.data.ingest import ingest
from cls_ray.data.validate import EncodeOptions, validate_file, validate_files


def make_images(root: Path, total: int, side: int = 224) -> list[str]:
    """``total`` Fashion-MNIST train images as ``root/<class>/NNNNN.jpg``, upscaled to ``side`` px RGB JPEGs."""
    images, labels = load_split("/usr/share/datasets/fashion-mnist", "train")
    per_class = total // len(CLASSES)
    files = []
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == c)[:per_class]:
            path = root / name / f"{i:05d}.jpg"
            Image.fromarray(images[i]).resize((side, side), Image.BICUBIC).convert("RGB").save(path, quality=90)
            files.append(str(path))
    return sorted(files)


def baseline(files: list[str]) -> float:
    start = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh:
            Image.open(io.BytesIO(fh.read())).convert("RGB")
    return time.perf_counter() - start


def pool_validation(files: list[str], workers: int) -> float:
    start = time.perf_counter()
    n = sum(1 for _ in validate_files(files, EncodeOptions(64_000_000, 512, 90), workers, 60.0))
    assert n == len(files)
    return time.perf_counter() - start


def ray_validation(files: list[str], workers: int) -> tuple[float, float]:
    """Returns (seconds including ``ray.init``, seconds of the Ray Data job alone)."""
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, object_store_memory=400 * 1024**2, log_to_driver=False)
    ready = time.perf_counter()
    opts = EncodeOptions(64_000_000, 512, 90)

    def check(row: dict) -> dict:
        result = validate_file(row["uri"], opts)
        return {"uri": row["uri"], "ok": "sha256" in result, "nbytes": len(result.get("image", b""))}

    # the results read back: Ray Data answers count() of a one-to-one map without running the map
    mapped = ray.data.from_items([{"uri": f} for f in files]).map(check)
    n = sum(int(batch["ok"].sum()) for batch in mapped.iter_batches(batch_format="numpy"))
    assert n == len(files)
    end = time.perf_counter()
    ray.shutdown()
    return end - start, end - ready


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            break
        except OSError:
            time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_REGION": "us-east-1",
        }
    )
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return proc, endpoint


def timed_ingest(src: str, dest: str, cfg: IngestConfig) -> float:
    start = time.perf_counter()
    ingest(src, dest, cfg, summary=False)
    return time.perf_counter() - start


def cluster_ingest(src: str, tmp: str, workers: int) -> tuple[float, float, float]:
    """``(cold, warm, warm without near-duplicates)`` seconds of ``ingest.engine=ray`` on a local Ray instance of
    ``workers`` CPUs (the first two with the default ``ingest.near_duplicates=group``)."""
    import ray

    cfg = IngestConfig(engine="ray", task_cpus=workers)
    start = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, object_store_memory=400 * 1024**2, log_to_driver=False)
    try:
        ingest(src, f"{tmp}/ds_ray_cold", cfg, summary=False)
        cold = time.perf_counter() - start
        warm = timed_ingest(src, f"{tmp}/ds_ray_warm", cfg)
        no_hash = IngestConfig(engine="ray", task_cpus=workers, near_duplicates="off")
        off = timed_ingest(src, f"{tmp}/ds_ray_off", no_hash)
    finally:
        ray.shutdown()
    return cold, warm, off


def listing(n: int, tmp: str) -> tuple[float, float]:
    """``(plain, parallel)`` seconds listing ``n`` objects in 100 class folders on a SeaweedFS server."""
    import boto3

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from concurrent.futures import ThreadPoolExecutor

    from conftest import S3Server, s3_environment

    from cls_ray.data.ingest_ray import scan_parallel
    from cls_ray.data.scan import scan_source

    server = S3Server(Path(tempfile.mkdtemp(prefix="clsray-s3-", dir="/tmp")))
    server.start()
    os.environ.update(s3_environment(server.endpoint))
    try:
        client = boto3.client("s3")
        client.create_bucket(Bucket="listing")
        keys = [f"src/class_{i % 100:03d}/{i:07d}.png" for i in range(n)]
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda k: client.put_object(Bucket="listing", Key=k, Body=b"x"), keys))
        start = time.perf_counter()
        plain = scan_source("s3://listing/src")
        plain_s = time.perf_counter() - start
        start = time.perf_counter()
        parallel = scan_parallel("s3://listing/src")
        parallel_s = time.perf_counter() - start
        assert parallel == plain and len(plain.files) == n
        return plain_s, parallel_s
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--side", type=int, default=224, help="side of the generated JPEGs (px)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="alternated runs with and without near-duplicates")
    parser.add_argument("--listing", type=int, default=0, help="also time listing this many objects on SeaweedFS")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cls-ray-bench-") as tmp:
        src = Path(tmp) / "src"
        files = make_images(src, args.images, args.side)
        n, w = len(files), args.workers
        cfg = IngestConfig(num_workers=w)
        rows = [("baseline: 1 process, open+decode only", baseline(files), 1)]
        rows.append((f"validation stage, pebble pool ({w} procs), cold", pool_validation(files, w), w))
        rows.append((f"validation stage, pebble pool ({w} procs), warm", pool_validation(files, w), w))
        if not args.skip_ray:
            with_init, job = ray_validation(files, w)
            rows.append((f"validation stage, Ray Data map ({w} CPUs), cold (ray.init)", with_init, w))
            rows.append((f"validation stage, Ray Data map ({w} CPUs), job only", job, w))
        # near-duplicate detection (hash in the validation pass + matching) on and off, alternated, best of N
        off = IngestConfig(num_workers=w, near_duplicates="off")
        times: dict[str, list[float]] = {"off": [], "on": []}
        for r in range(args.repeats):
            for name, c in (("off", off), ("on", cfg)):
                times[name].append(timed_ingest(str(src), f"{tmp}/ds_{name}_{r}", c))
        rows.append((f"ingest -> local disk ({w} procs), near_duplicates=off", min(times["off"]), w))
        rows.append((f"ingest -> local disk ({w} procs), near_duplicates=group", min(times["on"]), w))
        small = IngestConfig(num_workers=w, max_side=112)
        rows.append(
            (
                f"ingest -> local, all resized+re-encoded ({w} procs)",
                timed_ingest(str(src), f"{tmp}/ds_small", small),
                w,
            )
        )
        if not args.skip_ray:
            cold, warm, warm_off = cluster_ingest(str(src), tmp, w)
            rows.append((f"ingest -> local, engine=ray ({w} CPUs), cold (ray.init)", cold, w))
            rows.append((f"ingest -> local, engine=ray ({w} CPUs), warm", warm, w))
            rows.append((f"ingest -> local, engine=ray ({w} CPUs), warm, near_duplicates=off", warm_off, w))
        if not args.skip_s3:
            proc, _ = start_moto()
            try:
                rows.append((f"ingest -> S3 (moto, {w} procs)", timed_ingest(str(src), "s3://bench/ds", cfg), w))
            finally:
                proc.terminate()
                proc.wait(10)
        # The loop again, last: the first run can overlap the write-back of the images just generated; the faster
        # of the two is the baseline.
        rows[0] = (rows[0][0], min(rows[0][1], baseline(files)), 1)
    base = n / rows[0][1]
    print(f"\n{n} images (224x224 RGB JPEG, Fashion-MNIST), {os.cpu_count()} cores\n")
    # "vs baseline": the run's whole rate against the one-process loop; "per core": its rate per core against the
    # loop's, i.e. against the bare loop run on every core the run used (the issue's target is per core)
    print(f"| {'run':58s} | {'seconds':>7s} | {'img/s':>7s} | {'img/s/core':>10s} | {'vs baseline':>11s} | per core |")
    print(f"|{'-' * 60}|{'-' * 9}|{'-' * 9}|{'-' * 12}|{'-' * 13}|{'-' * 10}|")
    for name, secs, cores in rows:
        rate = n / secs
        print(
            f"| {name:58s} | {secs:7.2f} | {rate:7.0f} | {rate / cores:10.0f} | {rate / base:10.2f}x "
            f"| {rate / cores / base:7.2f}x |"
        )
    runs = {k: ", ".join(f"{t:.2f}" for t in v) for k, v in times.items()}
    ratio = min(times["on"]) / min(times["off"])
    print(f"\nnear_duplicates=group / off, best of {args.repeats}: {ratio:.3f}x the time")
    print(f"all runs: off {runs['off']} s; group {runs['on']} s")
    if args.listing:
        with tempfile.TemporaryDirectory(prefix="cls-ray-bench-") as tmp:
            plain_s, parallel_s = listing(args.listing, tmp)
        print(f"\nlisting {args.listing} objects in 100 class folders (SeaweedFS): plain paginated {plain_s:.2f} s, "
              f"parallel (32 prefixes at a time) {parallel_s:.2f} s: {plain_s / parallel_s:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
