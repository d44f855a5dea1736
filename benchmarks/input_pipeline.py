"""Input pipeline throughput: images/s per core for decode + RandomResizedCrop + flip -> uint8 batches.

Three runs side by side over the same images, on the same core count:

* ``bare``: one Python process, a plain PIL loop over the encoded bytes read from the Parquet shards (decode, the
  same timm RandomResizedCrop + flip, stack to a uint8 NCHW batch). The per-core ceiling of a PIL pipeline.
* ``imagefolder``: torchvision ``ImageFolder`` + ``DataLoader`` (``num_workers`` = cores) over the same images as
  JPEG files, with the same transform.
* ``cls_ray``: cls-ray's Ray Data pipeline (Parquet shards -> decode + augment in ``map_batches`` CPU tasks ->
  uint8 batches) on a Ray instance with ``num_cpus`` = cores, consumed on the driver.
* ``ffcv`` (optional, ``--runs ...,ffcv``): cls-ray's ``data.format=ffcv`` train loader
  (:class:`cls_ray.data.ffcv_format.FFCVTrainBatches`) over the split's .beton (written by ``ingest.ffcv``: the
  same images, re-encoded as JPEG at ``ingest.jpeg_quality``, or with ``--ffcv-write-mode raw`` stored as decoded
  pixels), ``cores`` FFCV threads in one process.

Each run does ``--warmup-epochs`` untimed epochs (worker start-up, caches), then ``--epochs`` timed ones: images/s
over wall time (including each epoch's ramp-up and the gaps between epochs) and images per CPU-second of the whole
process tree (robust when other jobs share the machine).
Prints a table and one JSON line with the ratios cls_ray/bare (per core) and cls_ray/imagefolder.

    .venv/bin/python benchmarks/input_pipeline.py                   # 2000 images, 2 cores, 2 epochs
    .venv/bin/python benchmarks/input_pipeline.py --cores 15 --num-images 8000 --device cuda
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _data  # noqa: E402

from cls_ray.config import DataConfig  # noqa: E402
from cls_ray.data.transforms import create_train_transform, to_uint8_array  # noqa: E402

logger = logging.getLogger("benchmarks.input_pipeline")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--side", type=int, default=224, help="side of the source JPEGs in pixels")
    p.add_argument("--image-size", type=int, default=224, help="RandomResizedCrop output side")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs")
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where the consumer puts each batch (cuda: a host->device copy per batch)",
    )
    p.add_argument(
        "--runs",
        default="bare,imagefolder,cls_ray",
        help="comma-separated subset of bare, imagefolder, cls_ray, ffcv to run",
    )
    p.add_argument(
        "--ffcv-write-mode",
        default="smart",
        choices=["smart", "jpg", "raw"],
        help="the ffcv run's .beton: ingest.ffcv_write_mode (smart: JPEG for images over "
        "ingest.ffcv_smart_threshold pixels, raw pixels below; raw: decoded pixels, no decode at load)",
    )
    p.add_argument("--shuffle", default="global", choices=["global", "local"], help="cls-ray's data.shuffle")
    p.add_argument("--workdir", type=Path, default=_data.DEFAULT_WORKDIR)
    p.add_argument(
        "--object-store-mb",
        type=int,
        default=None,
        help="Ray's object store in MB (default: Ray's own, 30%% of memory, as `cls-ray train` gets); "
        "decoded 224 px blocks need room: 1000 MB throttles the decode stage",
    )
    return p.parse_args(argv)


def data_config(image_size: int) -> dict[str, Any]:
    """A timm data config for ``image_size`` (ImageNet mean/std, bilinear): what the transforms are built from."""
    return {
        "input_size": [3, image_size, image_size],
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bilinear",
        "crop_pct": 0.875,
        "crop_mode": "center",
    }


def augment_config(**overrides: Any) -> DataConfig:
    """RandomResizedCrop + flip only (no RandAugment, no colour jitter): the work every run does."""
    return DataConfig(auto_augment=None, color_jitter=0.0, re_prob=0.0, **overrides)


def measure(
    epoch_batches: Callable[[int], Iterable[tuple[Any, Any]]], args: argparse.Namespace, cores: int
) -> dict[str, float]:
    """Run ``args.warmup_epochs`` untimed epochs, then time ``args.epochs`` epochs in wall and CPU seconds.

    Warm-up starts worker processes and fills caches for everyone alike. CPU seconds count this process and every
    descendant (DataLoader workers; Ray's raylet, GCS and workers), so they measure the work done per image even
    when other jobs share the machine.
    """
    import torch

    def run_epoch(epoch: int) -> int:
        images = 0
        for batch_images, labels in epoch_batches(epoch):
            if args.device == "cuda":
                batch_images = torch.as_tensor(batch_images).to("cuda", non_blocking=True)
            images += len(labels)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return images

    for epoch in range(args.warmup_epochs):
        run_epoch(epoch)
    cpu0, t0 = _data.tree_cpu_seconds(), time.perf_counter()
    images = sum(run_epoch(args.warmup_epochs + e) for e in range(args.epochs))
    seconds, cpu = time.perf_counter() - t0, _data.tree_cpu_seconds() - cpu0
    return {
        "images_per_s": images / seconds,
        "images_per_s_per_core": images / seconds / cores,
        "cores": cores,
        "images_per_cpu_s": images / cpu if cpu > 0 else float("nan"),
        "timed_images": images,
        "timed_s": seconds,
        "cpu_s": cpu,
    }


def run_bare(encoded: list[bytes], labels: np.ndarray, args: argparse.Namespace) -> dict[str, float]:
    """One process: PIL decode + the timm train transform, stacked into uint8 NCHW batches."""
    transform = create_train_transform(data_config(args.image_size), augment_config())

    def epoch_batches(epoch: int) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        order = np.random.default_rng(epoch).permutation(len(encoded))
        for start in range(0, len(order), args.batch_size):
            idx = order[start : start + args.batch_size]
            arrays = [to_uint8_array(transform(Image.open(io.BytesIO(encoded[i])).convert("RGB"))) for i in idx]
            yield np.stack(arrays), labels[idx]

    return measure(epoch_batches, args, cores=1)


def run_imagefolder(folders: Path, args: argparse.Namespace) -> dict[str, float]:
    """torchvision ImageFolder + DataLoader with one worker per core, the same transform."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    transform = create_train_transform(data_config(args.image_size), augment_config())
    loader = DataLoader(
        ImageFolder(str(folders), transform=transform),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.cores,
        persistent_workers=True,
        pin_memory=args.device == "cuda",
        prefetch_factor=4,
    )
    torch.manual_seed(0)
    return measure(lambda epoch: loader, args, cores=args.cores)


def run_cls_ray(dataset_uri: str, args: argparse.Namespace) -> dict[str, float]:
    """cls-ray's Ray Data train pipeline on a Ray instance with ``args.cores`` CPUs, consumed on the driver through
    the iterator the training workers use (:func:`cls_ray.data.pipeline.iter_train_batches`)."""
    import ray
    import torch

    from cls_ray.data.manifest import read_manifest
    from cls_ray.data.pipeline import build_train_dataset, iter_train_batches

    cfg = augment_config(batch_size=args.batch_size, shuffle=args.shuffle)
    # Ray starts its workers at nice 15; at 0 they compete on equal terms with the baselines' processes should
    # anything else run on the machine (no effect on an idle one).
    os.environ.setdefault("RAY_worker_niceness", "0")
    store = args.object_store_mb * 2**20 if args.object_store_mb else None
    ray.init(
        address="local", num_cpus=args.cores, object_store_memory=store, include_dashboard=False, log_to_driver=False
    )
    try:
        ds = build_train_dataset(dataset_uri, read_manifest(dataset_uri), data_config(args.image_size), cfg)
        device = torch.device(args.device)

        def epoch_batches(epoch: int) -> Iterable[tuple[Any, Any]]:
            for batch in iter_train_batches(ds.iterator(), cfg, device):
                yield batch["image"], batch["label"]

        result = measure(epoch_batches, args, cores=args.cores)
        logger.info("Ray Data stats of the last epoch:\n%s", ds.stats())
        return result
    finally:
        ray.shutdown()


def run_ffcv(dataset_uri: str, args: argparse.Namespace) -> dict[str, float]:
    """cls-ray's ``data.format=ffcv`` train loader, as a training worker builds it, with ``args.cores`` threads."""
    import torch

    from cls_ray.config import load_config
    from cls_ray.data.ffcv_format import FFCVTrainBatches, beton_uri
    from cls_ray.data.manifest import read_manifest

    cfg = load_config(
        None,
        [
            "data.format=ffcv",
            "data.auto_augment=null",
            "data.color_jitter=0",
            "data.re_prob=0",
            f"data.batch_size={args.batch_size}",
            f"data.ffcv_workers={args.cores}",
        ],
    )
    path = beton_uri(dataset_uri, read_manifest(dataset_uri), "train")
    batches = FFCVTrainBatches(path, data_config(args.image_size), cfg, world=1, device=torch.device(args.device))

    def epoch_batches(epoch: int) -> Iterable[tuple[Any, Any]]:
        for batch in batches.epoch(epoch + 1):
            yield batch["image"], batch["label"]

    return measure(epoch_batches, args, cores=args.cores)


def summarise(results: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Ratios of cls-ray against each baseline: per core (wall time) and per CPU-second against bare, absolute
    against ImageFolder on the same cores."""
    out: dict[str, Any] = {}
    cand = results.get("cls_ray")
    if cand and "bare" in results:
        bare = results["bare"]
        out["cls_ray_per_core_vs_bare"] = cand["images_per_s_per_core"] / bare["images_per_s_per_core"]
        out["cls_ray_per_cpu_s_vs_bare"] = cand["images_per_cpu_s"] / bare["images_per_cpu_s"]
    if cand and "imagefolder" in results:
        out["cls_ray_vs_imagefolder"] = cand["images_per_s"] / results["imagefolder"]["images_per_s"]
        out["cls_ray_per_cpu_s_vs_imagefolder"] = cand["images_per_cpu_s"] / results["imagefolder"]["images_per_cpu_s"]
    ffcv = results.get("ffcv")
    if ffcv and "bare" in results:
        out["ffcv_per_core_vs_bare"] = ffcv["images_per_s_per_core"] / results["bare"]["images_per_s_per_core"]
    if ffcv and "imagefolder" in results:
        out["ffcv_vs_imagefolder"] = ffcv["images_per_s"] / results["imagefolder"]["images_per_s"]
    return out


def print_report(results: dict[str, dict[str, float]], ratios: dict[str, Any]) -> None:
    """The human-readable table (this is a benchmark script: printing is its output)."""
    print(f"{'run':<12} {'cores':>5} {'images/s':>10} {'images/s/core':>14} {'images/cpu-s':>13}")
    for name, r in results.items():
        print(
            f"{name:<12} {r['cores']:>5} {r['images_per_s']:>10.1f} {r['images_per_s_per_core']:>14.1f} "
            f"{r['images_per_cpu_s']:>13.1f}"
        )
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = sorted(set(runs) - {"bare", "imagefolder", "cls_ray", "ffcv"})
    if unknown:
        raise SystemExit(f"--runs: unknown run(s) {unknown}; choose from bare, imagefolder, cls_ray, ffcv")
    folders, dataset_uri = _data.prepare_dataset(
        args.num_images, args.side, args.workdir, ffcv=args.ffcv_write_mode if "ffcv" in runs else None
    )
    results: dict[str, dict[str, float]] = {}
    for name in runs:
        logger.info("running %s", name)
        if name == "bare":
            encoded, labels = _data.read_split_bytes(dataset_uri)
            results[name] = run_bare(encoded, labels, args)
        elif name == "imagefolder":
            results[name] = run_imagefolder(folders, args)
        elif name == "ffcv":
            results[name] = run_ffcv(dataset_uri, args)
        else:
            results[name] = run_cls_ray(dataset_uri, args)
    ratios = summarise(results)
    print_report(results, ratios)
    record = {
        "benchmark": "input_pipeline",
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": results,
        **ratios,
        "machine": _data.machine_description(),
    }
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
