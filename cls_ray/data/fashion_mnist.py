"""``cls-ray datasets fashion-mnist``: the real Fashion-MNIST as class folders of PNG files.

Source: the four IDX ``.gz`` files of Fashion-MNIST (Zalando Research, MIT licence), by default from Debian's
``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist/``). The official test set stays the test
set: ``DEST/train/<class>/NNNNN.png`` (60,000) and ``DEST/test/<class>/NNNNN.png`` (10,000), where ``NNNNN`` is
the image's index in its IDX file. ``cls-ray ingest`` keeps that split and carves ``val`` off ``train``.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import struct
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from cls_ray import storage

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MARKER = ".cls-ray-fashion-mnist.json"
"""Written last into DEST; hidden, so ingest ignores it. Its presence means DEST is complete."""


class DatasetSourceError(ValueError):
    """The dataset's source files are missing or not what they should be."""


def read_idx(path: str) -> np.ndarray:
    """Read a gzip-compressed IDX file (unsigned bytes) into an array of its stored shape.

    Raises:
        DatasetSourceError: not an IDX file of unsigned bytes.
    """
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DatasetSourceError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DatasetSourceError(f"{path}: truncated IDX file ({body.size} bytes for shape {shape})")
    return body.reshape(shape)


def _missing_hint(source_dir: str, missing: list[str]) -> str:
    return (
        f"Fashion-MNIST files missing in {source_dir}: {', '.join(missing)}. Install them with "
        f"`apt-get install dataset-fashion-mnist` (Debian/Ubuntu, files in {DEFAULT_SOURCE}), or download the "
        f"four .gz files from {OFFICIAL_URL} into a directory and pass it with --source DIR"
    )


def load_split(source_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 28, 28)`` uint8 and labels ``(N,)`` of ``train`` or ``test``."""
    images_name, labels_name = FILES[split]
    images = read_idx(os.path.join(source_dir, images_name))
    labels = read_idx(os.path.join(source_dir, labels_name))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetSourceError(
            f"{source_dir}: {images_name} {images.shape} and {labels_name} {labels.shape} do not match"
        )
    if labels.max(initial=0) >= len(CLASSES):
        raise DatasetSourceError(f"{source_dir}/{labels_name}: label {labels.max()} out of range")
    return images, labels


def _write_pngs(jobs: list[tuple[str, np.ndarray]]) -> int:
    from PIL import Image

    for uri, pixels in jobs:
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buf, format="PNG")
        storage.write_bytes(uri, buf.getvalue())
    return len(jobs)


def _select(labels: np.ndarray, limit_per_class: int | None) -> np.ndarray:
    if limit_per_class is None:
        return np.arange(len(labels))
    keep = [np.flatnonzero(labels == c)[:limit_per_class] for c in range(len(CLASSES))]
    return np.sort(np.concatenate(keep))


def _jobs(dest: str, split: str, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> list:
    return [(storage.join(dest, split, CLASSES[labels[i]], f"{i:05d}.png"), images[i]) for i in indices]


def write_fashion_mnist(
    dest: str, source_dir: str | None = None, limit_per_class: int | None = None, num_workers: int | None = None
) -> dict[str, Any]:
    """Write Fashion-MNIST as ``DEST/{train,test}/<class>/NNNNN.png``; skipped when DEST is already complete.

    Args:
        dest: output directory (local path or s3:// URI).
        source_dir: directory of the four IDX .gz files; default Debian's ``/usr/share/datasets/fashion-mnist``.
        limit_per_class: write at most this many images per class and split (the first ones by index).
        num_workers: writer processes (default: one per CPU core).

    Returns:
        ``{"classes": [...], "counts": {"train": N, "test": N}, "source": ...}`` (also stored in DEST's marker).

    Raises:
        DatasetSourceError: source files missing (the message says how to get them) or malformed.
    """
    if limit_per_class is not None and limit_per_class < 1:
        raise DatasetSourceError(f"--limit-per-class must be at least 1, got {limit_per_class}")
    source_dir = source_dir or DEFAULT_SOURCE
    missing = [n for pair in FILES.values() for n in pair if not os.path.isfile(os.path.join(source_dir, n))]
    if missing:
        raise DatasetSourceError(_missing_hint(source_dir, missing))
    marker_uri = storage.join(dest, MARKER)
    wanted = {"classes": list(CLASSES), "limit_per_class": limit_per_class, "source": os.path.abspath(source_dir)}
    if storage.exists(marker_uri):
        done = storage.read_json(marker_uri)
        if {k: done.get(k) for k in wanted} == wanted:
            logger.info("%s already holds Fashion-MNIST (%s); nothing to do", dest, done["counts"])
            return done
    jobs: list = []
    counts = {}
    for split in FILES:
        images, labels = load_split(source_dir, split)
        indices = _select(labels, limit_per_class)
        counts[split] = int(len(indices))
        jobs.extend(_jobs(dest, split, images, labels, indices))
    _run_jobs(jobs, num_workers or os.cpu_count() or 1)
    result = {**wanted, "counts": counts}
    storage.write_bytes(marker_uri, json.dumps(result, indent=2, sort_keys=True).encode())
    logger.info(
        "wrote Fashion-MNIST to %s: %d train + %d test PNGs in %d class folders",
        dest,
        counts["train"],
        counts["test"],
        len(CLASSES),
    )
    return result


def _run_jobs(jobs: list, num_workers: int) -> None:
    from tqdm import tqdm

    chunk = 2000
    chunks = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
    with tqdm(total=len(jobs), desc="writing PNGs", unit="img", disable=None) as bar:
        if num_workers <= 1 or len(chunks) <= 1:
            for part in chunks:
                bar.update(_write_pngs(part))
            return
        with ProcessPoolExecutor(max_workers=num_workers) as pool:
            for n in pool.map(_write_pngs, chunks):
                bar.update(n)
