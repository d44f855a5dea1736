"""FFCV ``.beton`` files: the second dataset format, written by ingest and read by training workers.

With ``ingest.ffcv`` on, ingest also writes every split to ``SPLIT/data.beton`` with FFCV's ``DatasetWriter``
(``image``: ``RGBImageField``, ``label``: ``IntField``), in the same row order as the split's Parquet shards and
from the same validated images (grayscale converted to RGB exactly as the Parquet pipeline does). The manifest lists
them under ``ffcv``; the Parquet shards stay the dataset of record (validation, ``cls-ray evaluate``, serving).

With ``data.format=ffcv`` every training worker reads the train split's file itself with FFCV's ``Loader``:
JIT-compiled RandomResizedCrop + flip fused into decoding, in ``data.ffcv_workers`` threads of the worker's own
process, a ``DistributedSampler`` order across the DDP ranks, uint8 NCHW batches out (the same contract as the Ray
Data pipeline). A dataset on S3 is copied once per node into a local cache (FFCV memory-maps a local file).
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cls_ray import storage
from cls_ray.config import Config, ConfigError, IngestConfig

logger = logging.getLogger(__name__)

BETON_NAME = "data.beton"
WRITER_ROWS_PER_PROCESS = 1000
FFCV_INSTALL_HINT = (
    "pip install 'cls-ray[ffcv]' (it builds from source: apt-get install libopencv-dev "
    "libturbojpeg0-dev pkg-config first)"
)


def require_ffcv(what: str) -> None:
    """Raise :class:`ConfigError` naming ``what`` asked for FFCV when the ``ffcv`` package cannot be imported."""
    try:
        import ffcv  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"{what} needs FFCV, which is not installed here ({exc}); {FFCV_INSTALL_HINT}") from None


class SpoolImages:
    """An indexed dataset for ``DatasetWriter``: (RGB uint8 HWC array, label) read by offset from a file.

    Reads use ``os.pread`` on the file descriptor, so the writer's forked processes share it without a file
    position to race on.

    Args:
        fd: An open file descriptor holding the encoded images.
        entries: ``(offset, length, label)`` per row, in the order rows are written.
        max_pixels: Refuse images with more pixels (ingest validated them already).
    """

    def __init__(self, fd: int, entries: list[tuple[int, int, int]], max_pixels: int):
        self.fd = fd
        self.entries = entries
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        from cls_ray.data.decode import decode_stored_image

        offset, length, label = self.entries[index]
        image = decode_stored_image(os.pread(self.fd, length, offset), self.max_pixels)
        return np.asarray(image, dtype=np.uint8), int(label)


def ffcv_fields(cfg: IngestConfig) -> dict[str, Any]:
    """The .beton schema: ``image`` (``RGBImageField`` per ``ingest.ffcv_*``) and ``label`` (``IntField``)."""
    from ffcv.fields import IntField, RGBImageField

    smart = cfg.ffcv_write_mode == "smart"
    return {
        "image": RGBImageField(
            write_mode=cfg.ffcv_write_mode,
            max_resolution=cfg.ffcv_max_resolution,
            smart_threshold=cfg.ffcv_smart_threshold if smart else None,
            jpeg_quality=cfg.jpeg_quality,
        ),
        "label": IntField(),
    }


def write_beton(dataset_uri: str, split: str, rows: SpoolImages, cfg: IngestConfig) -> dict[str, Any]:
    """Write ``rows`` as ``SPLIT/data.beton`` under ``dataset_uri``; returns its manifest entry.

    The file is built in a local temporary directory (FFCV writes through ``mmap``) and then copied into place, so
    DEST never holds half a file.
    """
    from ffcv.writer import DatasetWriter

    rel = f"{split}/{BETON_NAME}"
    uri = storage.join(dataset_uri, *rel.split("/"))
    from ffcv.writer import MIN_PAGE_SIZE

    # Every writer process fills its own pages, so a small split written by many processes would be mostly padding
    # (FFCV's default: 8 MiB pages): one process per WRITER_ROWS_PER_PROCESS rows, and the smallest page that holds
    # two of the largest images ingest stores (a page must hold a whole image).
    workers = max(1, min(cfg.num_workers or os.cpu_count() or 1, -(-len(rows) // WRITER_ROWS_PER_PROCESS)))
    side = max(cfg.max_side, cfg.ffcv_max_resolution or 0)
    page_size = max(MIN_PAGE_SIZE, 1 << (2 * side * side * 3 - 1).bit_length())
    with tempfile.TemporaryDirectory(prefix="cls-ray-ffcv-") as tmp:
        local = os.path.join(tmp, BETON_NAME)
        DatasetWriter(local, ffcv_fields(cfg), page_size=page_size, num_workers=workers).from_indexed_dataset(
            rows, chunksize=max(1, min(100, len(rows) // workers))
        )
        size = os.path.getsize(local)
        storage.copy_file(local, uri)
    logger.info("wrote %s: %d rows, %.1f MB", uri, len(rows), size / 2**20)
    return {"path": rel, "num_rows": len(rows), "bytes": size}


def write_beton_from_bytes(
    dataset_uri: str,
    split: str,
    images: list[bytes],
    labels: list[int],
    ffcv_settings: dict[str, Any],
    jpeg_quality: int,
    max_pixels: int,
) -> dict[str, Any]:
    """:func:`write_beton` from encoded images in memory, with a manifest's ``ffcv`` settings (a dataset subset)."""
    cfg = IngestConfig(
        ffcv=True,
        ffcv_write_mode=ffcv_settings["write_mode"],
        ffcv_max_resolution=ffcv_settings.get("max_resolution"),
        ffcv_smart_threshold=ffcv_settings.get("smart_threshold") or IngestConfig.ffcv_smart_threshold,
        jpeg_quality=jpeg_quality,
        max_pixels=max_pixels,
    )
    with tempfile.TemporaryFile(prefix="cls-ray-ffcv-") as spool:
        entries = []
        for data, label in zip(images, labels, strict=True):
            entries.append((spool.tell(), len(data), int(label)))
            spool.write(data)
        spool.flush()
        return write_beton(dataset_uri, split, SpoolImages(spool.fileno(), entries, max_pixels), cfg)


def beton_uri(dataset_uri: str, manifest: dict[str, Any], split: str) -> str:
    """The URI of a split's .beton file.

    Raises:
        ConfigError: the dataset was ingested without ``ingest.ffcv`` (or without rows in ``split``).
    """
    entry = manifest.get("ffcv", {}).get("splits", {}).get(split)
    if not entry:
        raise ConfigError(
            f"data.format: 'ffcv' needs the FFCV files of the dataset, and {dataset_uri} has no "
            f"{split!r} .beton (ingested without ingest.ffcv); re-ingest with `cls-ray ingest --set "
            f"ingest.ffcv=true --overwrite`, or use data.format=parquet"
        )
    return storage.join(dataset_uri, *entry["path"].split("/"))


def local_beton(uri: str, cache_key: str) -> str:
    """A local path to the .beton at ``uri``: the file itself when local, else a copy cached once per node.

    Workers of one node take a file lock, so only the first copies; the cache lives under ``$CLS_RAY_CACHE``
    (default: the system temporary directory) and is keyed by the dataset's manifest digest.
    """
    if not storage.is_remote(uri):
        return storage.resolve(uri)[1]
    cache = Path(os.environ.get("CLS_RAY_CACHE", tempfile.gettempdir())) / "cls-ray-ffcv"
    cache.mkdir(parents=True, exist_ok=True)
    split = uri.rstrip("/").split("/")[-2]
    path = cache / f"{cache_key[:16]}-{split}.beton"
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not path.exists():
                logger.info("copying %s to %s", uri, path)
                storage.copy_file(uri, str(path))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(path)


class FFCVTrainBatches:
    """One worker's train batches from a .beton: ``{"image": uint8 NCHW, "label": int64}`` on ``device``.

    FFCV's ``RandomResizedCropRGBImageDecoder`` (``data.scale``, ratio 3/4..4/3) and ``RandomHorizontalFlip``
    (``data.hflip``) augment while decoding; ``OrderOption.RANDOM`` with ``distributed=True`` gives every rank a
    disjoint ``DistributedSampler`` share, reshuffled each epoch from ``train.seed``, and ``drop_last`` keeps all
    ranks at the same number of steps.

    Args:
        path: Local path of the train split's .beton.
        data_config: The model's timm data config (input size).
        cfg: The run's config.
        world: Number of DDP ranks (``torch.distributed`` must be initialised when > 1).
        device: Where batches go.
    """

    def __init__(self, path: str, data_config: dict[str, Any], cfg: Config, world: int, device: Any):
        from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

        size = int(data_config["input_size"][-1])
        image = [RandomResizedCropRGBImageDecoder((size, size), scale=tuple(cfg.data.scale), ratio=(3 / 4, 4 / 3))]
        if cfg.data.hflip > 0:
            image.append(RandomHorizontalFlip(flip_prob=cfg.data.hflip))
        image += [ToTensor(), ToTorchImage()]
        threads = cfg.data.ffcv_workers or max(1, int(cfg.train.cpus_per_worker))
        self.device = device
        self.loader = Loader(
            path,
            batch_size=cfg.data.batch_size,
            num_workers=threads,
            order=OrderOption.RANDOM,
            distributed=world > 1,
            seed=cfg.train.seed,
            drop_last=True,
            os_cache=True,
            batches_ahead=max(1, cfg.data.prefetch_batches),
            pipelines={"image": image, "label": [IntDecoder(), ToTensor(), Squeeze()]},
        )

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        """The batches of ``epoch`` (1-based): the same order whenever that epoch is run again, as after a resume."""
        import torch

        self.loader.next_epoch = epoch - 1
        on_host = torch.device(self.device).type == "cpu"
        for image, label in self.loader:
            # FFCV reuses batches_ahead + 2 output buffers; the train loop looks one batch ahead, so batches that
            # stay on the host are copied out of FFCV's ring before it wraps around.
            image = image.clone() if on_host else image.to(self.device, non_blocking=True)
            label = label.to(self.device, dtype=torch.int64, non_blocking=True, copy=on_host).reshape(-1)
            yield {"image": image, "label": label}
