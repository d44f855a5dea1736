"""Batch prediction throughput: ``cls-ray predict`` on Ray Data against a single-process loop, same files, same model.

Input: real Fashion-MNIST images written as ``--side`` px colour JPEGs in class folders (``_data.write_jpeg_folders``),
and a model package of ``--model`` at ``--image-size`` px (random weights: the cost of a forward pass does not depend
on them). Measured, side by side in one run:

- baseline: one process on one core (``torch.set_num_threads(1)``, the process pinned to one CPU): read each file,
  ``Predictor.preprocess`` (the serving preprocessing), ``Predictor.predict_batch`` every ``--batch-size`` images;
- cls-ray: ``cls_ray.predict.predict`` on a local Ray instance of ``--cores`` CPUs, writing Parquet (listing,
  reading, preprocessing, scoring and writing included; Ray's start is not).

Reported: images/s of both, the speed-up, and the per-core efficiency (cls-ray's images/s per core over the
baseline's), end to end and in the steady state (cls-ray's images/s after its first result: the replicas' start,
~10 s on 2 cores of importing torch and loading the package, excluded). Targets (docs/benchmarks.md): speed-up
>= 1.8x on 2 cores, per-core efficiency >= 0.9x.

Run: ``.venv/bin/python benchmarks/predict.py [--images 4000] [--cores 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _data import machine_description, write_jpeg_folders  # noqa: E402


def make_package(root: Path, model_name: str, image_size: int) -> str:
    import timm

    from cls_ray.models import model_data_config
    from cls_ray.package import save_model_package

    model = timm.create_model(model_name, num_classes=10)
    meta = {
        "name": "bench",
        "architecture": model_name,
        "classes": [f"class_{i}" for i in range(10)],
        "data_config": model_data_config(model, image_size),
    }
    return save_model_package(str(root / "package"), model, meta)


def baseline(package: str, files: list[str], batch_size: int) -> float:
    """Images/s of the single-process, single-core loop."""
    import torch

    from cls_ray.predict import Predictor

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    predictor = Predictor.from_uri(package)
    start = time.perf_counter()
    batch = []
    for path in files:
        with open(path, "rb") as f:
            batch.append(predictor.preprocess(f.read()))
        if len(batch) == batch_size:
            predictor.predict_batch(batch)
            batch = []
    if batch:
        predictor.predict_batch(batch)
    return len(files) / (time.perf_counter() - start)


def candidate(package: str, src: Path, dest: Path, cores: int, batch_size: int) -> tuple[float, dict]:
    import ray

    from cls_ray.config import PredictConfig
    from cls_ray.predict import predict

    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        cfg = PredictConfig(batch_size=batch_size, files_per_output=1000)
        start = time.perf_counter()
        summary = predict(package, str(src), str(dest), cfg)
        elapsed = time.perf_counter() - start
    finally:
        ray.shutdown()
    return summary["files"] / elapsed, summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--side", type=int, default=128, help="side of the JPEG files")
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--image-size", type=int, default=64, help="model input size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="cls-ray-bench-predict-", dir=args.workdir) as tmp:
        root = Path(tmp)
        src = write_jpeg_folders(root / "images", args.images, side=args.side)
        files = sorted(str(p) for p in src.rglob("*.jpg"))
        package = make_package(root, args.model, args.image_size)
        # cls-ray first: the baseline pins this process to one core afterwards.
        ray_rate, summary = candidate(package, src, root / "out", args.cores, args.batch_size)
        base_rate = baseline(package, files, args.batch_size)
    steady = summary["timing"]["steady_images_per_s"]
    record = {
        "benchmark": "predict",
        "images": len(files),
        "side": args.side,
        "model": args.model,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "cores": args.cores,
        "scored": summary["scored"],
        "baseline_images_per_s": base_rate,
        "cls_ray_images_per_s": ray_rate,
        "speedup": ray_rate / base_rate,
        "per_core_vs_baseline": ray_rate / args.cores / base_rate,
        "cls_ray_first_result_s": summary["timing"]["first_result_s"],
        "cls_ray_steady_images_per_s": steady,
        "steady_speedup": steady and steady / base_rate,
        "steady_per_core_vs_baseline": steady and steady / args.cores / base_rate,
        "machine": machine_description(),
    }
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
