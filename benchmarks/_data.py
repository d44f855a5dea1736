"""Benchmark data preparation shared by the training benchmarks: real Fashion-MNIST images as class folders of
JPEGs, ingested into a cls-ray dataset, cached under a work directory so repeated runs skip the preparation.

Everything is made locally from the Fashion-MNIST IDX files (Debian package ``dataset-fashion-mnist``); nothing is
downloaded. The 28x28 grayscale images are upscaled to ``side`` pixels and given a per-image colour tint, so the
JPEGs carry real chroma and decode like colour photographs of that size.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "cls-ray-bench"


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_fashion_mnist(num_images: int, root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """The first ``num_images`` Fashion-MNIST training images (uint8 Nx28x28) and labels, classes balanced.

    Raises:
        FileNotFoundError: the IDX files are missing (install the Debian package ``dataset-fashion-mnist``).
    """
    images_path = root / "train-images-idx3-ubyte.gz"
    if not images_path.exists():
        raise FileNotFoundError(f"{images_path} not found: install the Debian package dataset-fashion-mnist")
    images = _read_idx(images_path)
    labels = _read_idx(root / "train-labels-idx1-ubyte.gz").astype(np.int64)
    per_class = -(-num_images // len(CLASSES))
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASSES))])
    keep = np.sort(keep)[:num_images]
    return images[keep], labels[keep]


def _colour_image(gray: np.ndarray, side: int, rng: np.random.Generator) -> Image.Image:
    tint = rng.uniform(0.35, 1.0, size=3)
    big = np.asarray(Image.fromarray(gray).resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32)
    rgb = np.clip(big[..., None] * tint + rng.uniform(0, 40, size=3), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def _write_chunk(
    root: Path, images: np.ndarray, labels: np.ndarray, start: int, side: int, quality: int, seed: int
) -> None:
    rng = np.random.default_rng([seed, start])
    for i, (gray, label) in enumerate(zip(images, labels, strict=True)):
        _colour_image(gray, side, rng).save(root / CLASSES[label] / f"{start + i:06d}.jpg", quality=quality)


def write_jpeg_folders(
    root: Path, num_images: int, side: int = 224, quality: int = 90, seed: int = 0, workers: int | None = None
) -> Path:
    """Write ``num_images`` Fashion-MNIST images as ``side``x``side`` colour JPEGs in one folder per class,
    using ``workers`` processes (default: one per core)."""
    from concurrent.futures import ProcessPoolExecutor

    images, labels = read_fashion_mnist(num_images)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    chunk = 500
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        futures = [
            pool.submit(_write_chunk, root, images[i : i + chunk], labels[i : i + chunk], i, side, quality, seed)
            for i in range(0, len(images), chunk)
        ]
        for future in futures:
            future.result()
    return root


def prepare_dataset(
    num_images: int,
    side: int = 224,
    workdir: Path = DEFAULT_WORKDIR,
    val_fraction: float = 0.0,
    ffcv: str | None = None,
) -> tuple[Path, str]:
    """Class folders of JPEGs and the cls-ray dataset ingested from them with the default ingest settings (so
    sources larger than ``ingest.max_side`` are stored downscaled), ``val_fraction`` of each class in ``val``
    and the rest in ``train``; with ``ffcv`` (an ``ingest.ffcv_write_mode``: raw, jpg or smart), FFCV .beton files
    beside the Parquet shards (``ingest.ffcv``).

    Cached: a second call with the same arguments reuses both (a dataset with .beton files serves calls without).

    Returns:
        ``(folders, dataset_uri)``.
    """
    from cls_ray.config import IngestConfig
    from cls_ray.data.ingest import ingest

    key = {"num_images": num_images, "side": side, "val_fraction": val_fraction}
    base = Path(workdir) / f"fmnist-{num_images}-{side}px-val{val_fraction:g}"
    folders, dataset = base / "folders", base / "dataset"
    stamp = base / "prepared.json"
    if stamp.exists():
        found = json.loads(stamp.read_text())
        mode = "smart" if found.get("ffcv") is True else found.get("ffcv") or None  # True: before modes were kept
        if all(found.get(k) == v for k, v in key.items()) and ffcv in (None, mode):
            return folders, str(dataset)
    logger.info("writing %d %dpx JPEGs under %s and ingesting them", num_images, side, base)
    write_jpeg_folders(folders, num_images, side)
    cfg = IngestConfig(
        val_fraction=val_fraction,
        test_fraction=0.0,
        overwrite=True,
        ffcv=ffcv is not None,
        ffcv_write_mode=ffcv or "smart",
    )
    ingest(str(folders), str(dataset), cfg, summary=False)
    stamp.write_text(json.dumps({**key, "ffcv": ffcv}))
    return folders, str(dataset)


def read_split_bytes(dataset_uri: str, split: str = "train") -> tuple[list[bytes], np.ndarray]:
    """All encoded images and labels of one split of a cls-ray dataset, in shard order, read into memory."""
    import pyarrow.parquet as pq

    from cls_ray import storage
    from cls_ray.data.manifest import read_manifest, split_shard_uris

    images: list[bytes] = []
    labels: list[int] = []
    for uri in split_shard_uris(dataset_uri, read_manifest(dataset_uri), split):
        fs, path = storage.resolve(uri)
        table = pq.read_table(path, filesystem=fs, columns=["image", "label"])
        images.extend(table.column("image").to_pylist())
        labels.extend(table.column("label").to_pylist())
    return images, np.asarray(labels, dtype=np.int64)


def machine_description() -> dict[str, object]:
    """Cores, CPU model and library versions, for the JSON result line."""
    import platform

    import ray
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, object] = {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "torch": torch.__version__,
        "ray": ray.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _proc_stat(pid: int) -> tuple[int, int, float, float] | None:
    """(parent pid, start time, own CPU seconds, reaped children's CPU seconds) of a live process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return (
        int(fields[1]),
        int(fields[19]),
        (int(fields[11]) + int(fields[12])) / tick,
        (int(fields[13]) + int(fields[14])) / tick,
    )


Key = tuple[int, int]  # (pid, start time): a pid can be reused, the pair cannot


@dataclass
class _Tree:
    """What earlier readings of one root saw: each process of its tree, ``key -> (parent key, own + reaped
    children's CPU seconds, reaped children's CPU seconds)``, and the CPU seconds of descendants that have exited
    without reaching a live ancestor's reaped time."""

    seen: dict[Key, tuple[Key | None, float, float]] = field(default_factory=dict)
    lost: float = 0.0


_TREES: dict[int, _Tree] = {}


def tree_cpu_seconds(root: int | None = None) -> float:
    """CPU seconds used so far by process ``root`` (default: this one) and its descendants (Linux /proc): each live
    one's own time plus that of the children it has reaped, plus the last reading of every descendant an earlier call
    saw that has since exited without its parent accounting for it (a parent that ignores SIGCHLD, as Ray's raylet
    may, reaps without adding the child's time to its own). So the total never goes down between two readings in one
    process; a plain sum over the live tree did when a Ray worker exited between them.

    Robust to other load on the machine, unlike wall time: it counts only the work this process tree did.
    """
    root = os.getpid() if root is None else root
    tree = _TREES.setdefault(root, _Tree())
    stats = {pid: stat for pid in (int(e) for e in os.listdir("/proc") if e.isdigit()) if (stat := _proc_stat(pid))}
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_) in stats.items():
        children.setdefault(ppid, []).append(pid)
    live: dict[Key, tuple[Key | None, float, float]] = {}
    stack: list[tuple[int, Key | None]] = [(root, None)]
    while stack:
        pid, parent = stack.pop()
        if pid in stats:
            _, start, own, reaped = stats[pid]
            live[(pid, start)] = (parent, own + reaped, reaped)
            stack.extend((child, (pid, start)) for child in children.get(pid, []))
    # Descendants gone since the last reading: counted by a live parent whose reaped time grew by as much, else lost
    growth = {key: reaped - tree.seen[key][2] for key, (_, _, reaped) in live.items() if key in tree.seen}
    for key, (parent, cpu, _) in tree.seen.items():
        if key in live:
            continue
        if parent in growth and growth[parent] >= 0.99 * cpu:
            growth[parent] -= cpu
        else:
            tree.lost += cpu
    tree.seen = live
    return sum(cpu for _, cpu, _ in live.values()) + tree.lost
