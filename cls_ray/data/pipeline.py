"""The Ray Data input pipeline: dataset shards -> decode + augment in CPU tasks -> uint8 batches on each worker.

The driver builds one lazy :class:`ray.data.Dataset` per split (:func:`build_train_dataset`,
:func:`build_eval_dataset`); Ray Train splits them across its workers, and every worker pulls batches with
:func:`iter_train_batches` / :func:`iter_eval_batches`. Decoding and augmentation run in Ray Data tasks that scale
apart from the training workers; workers receive uint8 tensors and normalise them on their own device
(:func:`cls_ray.data.transforms.normalize`), so CPU tasks ship 4x fewer bytes than float tensors. Decoded rows are
stored channels-last (NHWC: decoders and OpenCV produce HWC pixels, so no transposing copy per image); the
iterators hand out NCHW views of them, which are ``torch.channels_last`` tensors at no cost.

Each epoch re-executes the dataset, so the train split is reshuffled (and, with balanced sampling, resampled) every
epoch. Only the ``image`` and ``label`` columns are read, and splits that fit are read once and kept in Ray's object
store (``data.cache``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cls_ray import storage
from cls_ray.config import DataConfig
from cls_ray.data import manifest as manifest_lib

if TYPE_CHECKING:
    import ray.data
    import torch

    from cls_ray.data.transforms import ImageTransform

logger = logging.getLogger(__name__)

READ_COLUMNS = ["image", "label"]
BLOCK_ROWS = 1024
"""Most rows per block before decoding. A shard is read as few large blocks; cutting them up lets many decode tasks
run in parallel and lets Ray Train spread the blocks of a split evenly over its workers."""
MIN_BLOCK_ROWS = 64
BLOCKS_PER_CPU = 4
"""Small splits are cut into about this many blocks per cluster CPU (at least :data:`MIN_BLOCK_ROWS` rows each), so
an epoch's decode tasks keep every CPU busy and finish together instead of leaving a long tail of a few big ones."""
CACHE_FRACTION = 0.2
"""``data.cache=auto`` caches a split whose shards take at most this fraction of the cluster's object store."""
DRIVER_READ_BYTES = 64 * 2**20
"""A split to be cached whose shards take at most this many bytes is read by the calling process with pyarrow and put
into the object store as it is (:func:`ray.data.from_arrow`) instead of by Ray Data read tasks. On a small split the
read itself takes milliseconds, while Ray Data's path starts a read task, Parquet footer-reader actors and a
re-blocking task, each in a fresh worker process: 7-10 s of every training run's start-up on a 2-core machine.
Larger splits keep Ray Data's reads, which run in parallel on every node."""


def import_decoders() -> tuple[Callable, Callable]:
    """``(decode_stored_image, create_image_transform)``, imported on first use in a decode worker (torch, timm).

    Ray cancels a running task by raising ``KeyboardInterrupt`` in it, and Ray Data does so when a run that failed
    (a lost node) shuts its execution down. A first ``import torch`` interrupted half-way leaves its finished
    submodules in ``sys.modules``, and every later ``import torch`` in that process then fails ("partially initialized
    module 'torch' has no attribute 'autograd'"). Ray would hand the worker to the next attempt's decode tasks, so it
    exits instead and Ray starts a fresh one.
    """
    try:
        from cls_ray.data.decode import decode_stored_image
        from cls_ray.data.transforms import create_image_transform
    except KeyboardInterrupt:
        if not _in_ray_worker():
            raise
        logger.warning(
            "decode worker %d interrupted while importing torch/timm; exiting so that Ray does not reuse "
            "a half-imported process",
            os.getpid(),
        )
        logging.shutdown()
        os._exit(1)
    return decode_stored_image, create_image_transform


def _in_ray_worker() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


class DecodeBatch:
    """Ray Data batch UDF: encoded ``image`` bytes -> uint8 NHWC ``image`` array through one timm transform.

    Channels-last because the pixels are HWC all the way from the decoder (see :func:`as_nchw` for the consumer's
    view); the transform writes each row through a CHW view of it.

    The same class decodes evaluation batches outside Ray (``cls-ray evaluate``), so evaluation inputs are
    byte-identical to those of validation during training.

    Args:
        data_config: The model's timm data config (input size, interpolation, crop).
        data_cfg: Train-time augmentation settings; None builds the eval transform (resize + center crop).
        max_pixels: Refuse images with more pixels (ingest validated them already; this is defence in depth).
    """

    def __init__(self, data_config: dict[str, Any], data_cfg: DataConfig | None = None, max_pixels: int = 64_000_000):
        self.data_config = data_config
        self.data_cfg = data_cfg
        self.max_pixels = max_pixels
        self._transform = None

    def _get_transform(self) -> ImageTransform:
        # Built lazily inside the task: timm transforms hold PIL/torch state that need not be pickled, and this
        # module imports neither timm nor torch (Ray Data's coordinator actors unpickle this UDF; see decode.py).
        if self._transform is None:
            self._transform = import_decoders()[1](self.data_config, self.data_cfg)
        return self._transform

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_transform": None}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        decode_stored_image = import_decoders()[0]
        transform = self._get_transform()
        encoded = batch["image"]
        channels, height, width = self.data_config["input_size"]
        images = np.empty((len(encoded), height, width, channels), dtype=np.uint8)
        for row, data in enumerate(encoded):
            image = decode_stored_image(data, self.max_pixels, as_tensor=transform.takes_tensors)
            transform(image, out=images[row].transpose(2, 0, 1))
        return {"image": images, "label": np.asarray(batch["label"], dtype=np.int64)}


class BalancedResample:
    """Ray Data batch UDF on encoded rows: repeat each row ``N / (C * count[label])`` times in expectation.

    Rare classes are oversampled and common ones undersampled (stochastic rounding of the repeat count), so every
    class is seen about equally often and an epoch keeps about the split's size. Runs before the shuffle, on the
    small encoded rows, and draws fresh counts every epoch.

    Args:
        class_counts: Rows per label in the train split.
    """

    def __init__(self, class_counts: list[int]):
        counts = np.asarray(class_counts, dtype=np.float64)
        present = counts > 0
        self.weights = np.zeros_like(counts)
        self.weights[present] = counts.sum() / (present.sum() * counts[present])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rng = np.random.default_rng()
        expected = self.weights[np.asarray(batch["label"], dtype=np.int64)]
        repeats = np.floor(expected).astype(np.int64)
        repeats += rng.random(len(expected)) < (expected - repeats)
        return {key: np.repeat(np.asarray(values), repeats, axis=0) for key, values in batch.items()}


def decode_block_rows(num_rows: int, row_bytes: int = 0) -> int:
    """Rows per block of a split of ``num_rows`` rows on the current cluster (see :data:`BLOCKS_PER_CPU`).

    With ``row_bytes`` (one decoded row), also no more rows than fit in Ray Data's target block size: one decode
    call writes a whole block, so this bounds a decode task's memory (e.g. 891 rows at 224 px, 170 at 512 px).

    The rows are then evened out so that the block count is a multiple of the CPUs (unless that makes blocks
    smaller than :data:`MIN_BLOCK_ROWS`): decode tasks run in whole rounds, and the last round does not leave
    CPUs idle while one block decodes alone (8,000 rows at 224 px on 2 CPUs: 10 blocks of 800 rows, not 9 of 891).
    """
    import ray
    from ray.data import DataContext

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    rows = min(BLOCK_ROWS, max(MIN_BLOCK_ROWS, math.ceil(num_rows / (BLOCKS_PER_CPU * cpus))))
    if row_bytes:
        rows = min(rows, max(1, DataContext.get_current().target_max_block_size // row_bytes))
    whole_rounds = math.ceil(math.ceil(num_rows / rows) / cpus) * cpus
    even = math.ceil(num_rows / whole_rounds)
    return int(even if even >= min(rows, MIN_BLOCK_ROWS) else rows)


def read_split(
    data_uri: str, manifest: dict[str, Any], split: str, *, cache: str = "never", block_rows: int | None = None
) -> ray.data.Dataset:
    """The ``image`` and ``label`` columns of one split's Parquet shards: lazy, or cached in Ray's object store.

    Args:
        cache: ``never`` reads the shards lazily (and again every time the dataset runs); ``always`` reads them
            once, now, into the object store (:meth:`ray.data.Dataset.materialize`); ``auto`` does that when the
            shards take at most :data:`CACHE_FRACTION` of the cluster's object store.
        block_rows: Re-block to about this many rows per block (before caching, so a cached split is re-blocked once).
    """
    import ray.data

    uris = manifest_lib.split_shard_uris(data_uri, manifest, split)
    if not uris:
        raise manifest_lib.ManifestError(f"{data_uri}: split {split!r} has no shards")
    filesystem, _ = storage.resolve(uris[0])
    paths = [storage.resolve(uri)[1] for uri in uris]
    size = shard_bytes(filesystem, paths) if cache != "never" else 0
    cached = cache == "always" or (cache == "auto" and _fits_object_store(size, f"{data_uri} ({split})"))
    if cached and size <= DRIVER_READ_BYTES:
        return read_small_shards(filesystem, paths, READ_COLUMNS, block_rows)
    # Ray Data pushes the projection into the Parquet read: the other columns are never fetched.
    ds = ray.data.read_parquet(paths, filesystem=filesystem).select_columns(READ_COLUMNS)
    if block_rows:
        ds = ds.repartition(target_num_rows_per_block=block_rows)
    if cached:
        # Every epoch re-executes the dataset from its source: cached, an epoch starts at the shuffle instead of
        # listing and reading the shards again (about 1 s per epoch on a 16-core node, before any decoding).
        ds.context.enable_progress_bars = False
        ds = ds.materialize()
    return ds


def shard_bytes(filesystem: Any, paths: list[str]) -> int:
    """The total size of the files at ``paths`` on ``filesystem``."""
    return sum(info.size or 0 for info in filesystem.get_file_info(paths))


def read_small_shards(
    filesystem: Any, paths: list[str], columns: list[str], block_rows: int | None = None
) -> ray.data.Dataset:
    """Small shards (:data:`DRIVER_READ_BYTES`) read here with pyarrow, in shard order, and put into the object store
    in blocks of ``block_rows`` rows: the dataset Ray Data's read (+ re-blocking) would materialize, without its
    tasks."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    table = pa.concat_tables([pq.read_table(path, filesystem=filesystem, columns=columns) for path in paths])
    step = max(1, block_rows or BLOCK_ROWS)
    return ray.data.from_arrow([table.slice(start, step) for start in range(0, max(table.num_rows, 1), step)])


@dataclass(frozen=True)
class SharedSplit:
    """A split's encoded rows as :func:`read_split` returned them (cached in the object store, or lazy), read once
    and handed to several runs on the same cluster: the trials of a search take them instead of each reading and
    caching the shards again (seconds of start-up per trial, and one cached copy per running trial).

    A run takes it only for the same dataset and the same rows per block (:func:`decode_block_rows` of its own
    input size); otherwise it reads the split itself.
    """

    data_uri: str
    block_rows: int
    dataset: ray.data.Dataset


def _split_block_rows(manifest: dict[str, Any], split: str, data_config: dict[str, Any]) -> int:
    return decode_block_rows(manifest["splits"][split]["num_rows"], math.prod(data_config["input_size"]))


def read_shared_splits(
    data_uri: str, manifest: dict[str, Any], splits: tuple[str, ...], data_config: dict[str, Any], cfg: DataConfig
) -> dict[str, SharedSplit]:
    """Read ``splits`` once for the runs to come (see :class:`SharedSplit`), blocked for ``data_config``'s input
    size and cached as ``cfg.cache`` says."""
    out = {}
    for split in splits:
        block_rows = _split_block_rows(manifest, split, data_config)
        ds = read_split(data_uri, manifest, split, cache=cfg.cache, block_rows=block_rows)
        out[split] = SharedSplit(data_uri, block_rows, ds)
    return out


def _encoded_rows(
    data_uri: str,
    manifest: dict[str, Any],
    split: str,
    data_config: dict[str, Any],
    cfg: DataConfig,
    shared: Mapping[str, SharedSplit] | None,
) -> ray.data.Dataset:
    block_rows = _split_block_rows(manifest, split, data_config)
    hit = (shared or {}).get(split)
    if hit is not None and (hit.data_uri, hit.block_rows) == (data_uri, block_rows):
        return hit.dataset
    return read_split(data_uri, manifest, split, cache=cfg.cache, block_rows=block_rows)


def _fits_object_store(size: int, what: str) -> bool:
    import ray

    store = ray.cluster_resources().get("object_store_memory", 0)
    fits = size <= CACHE_FRACTION * store
    logger.info(
        "%s: %.1f MB of shards, %s in the object store (%.0f MB)",
        what,
        size / 2**20,
        "cached" if fits else "streamed, not cached,",
        store / 2**20,
    )
    return fits


def build_train_dataset(
    data_uri: str,
    manifest: dict[str, Any],
    data_config: dict[str, Any],
    cfg: DataConfig,
    *,
    seed: int = 0,
    max_pixels: int = 64_000_000,
    shared: Mapping[str, SharedSplit] | None = None,
) -> ray.data.Dataset:
    """The train split: (balanced resample) -> shuffle -> decode + augment, re-run every epoch.

    With ``cfg.shuffle == "global"`` the encoded rows get a full shuffle seeded by ``seed`` and the epoch index
    (reproducible, different each epoch); with ``"local"`` the block order is shuffled here and each worker
    shuffles a buffer of decoded rows (:func:`iter_train_batches`). ``shared["train"]``, when it fits this run
    (:class:`SharedSplit`), replaces reading the shards.
    """
    import ray.data

    ds = _encoded_rows(data_uri, manifest, "train", data_config, cfg, shared)
    if cfg.balanced_sampling:
        counts = manifest["splits"]["train"]["class_counts"]
        ds = ds.map_batches(BalancedResample(counts), batch_format="numpy", batch_size=None, num_cpus=cfg.decode_cpus)
    seed_config = ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True)
    if cfg.shuffle == "global":
        # As many output blocks as input blocks: the shuffle's reduce tasks write decode-sized blocks directly.
        ds = ds.random_shuffle(seed=seed_config)
    else:
        ds = ds.randomize_block_order(seed=seed_config)
    return _decode(ds, DecodeBatch(data_config, cfg, max_pixels), cfg)


def build_eval_dataset(
    data_uri: str,
    manifest: dict[str, Any],
    split: str,
    data_config: dict[str, Any],
    cfg: DataConfig,
    *,
    max_pixels: int = 64_000_000,
    shared: Mapping[str, SharedSplit] | None = None,
) -> ray.data.Dataset:
    """A validation or test split: decode + resize + center crop, in manifest order, no augmentation
    (``shared[split]`` as in :func:`build_train_dataset`)."""
    ds = _encoded_rows(data_uri, manifest, split, data_config, cfg, shared)
    return _decode(ds, DecodeBatch(data_config, None, max_pixels), cfg)


def _decode(ds: ray.data.Dataset, fn: DecodeBatch, cfg: DataConfig) -> ray.data.Dataset:
    import ray.data

    ds.context.enable_progress_bars = cfg.progress_bars  # this dataset's own context copy
    # While the training workers are slower than decoding, Ray Data's scheduling loop would spin (backoff.py).
    if cfg.idle_backoff:
        from cls_ray.data import backoff

        backoff.install(ds.context)
    # Ray Data's reservation allocator gives each running operator an equal share of the CPUs (half reserved per
    # operator, the other half shared equally): with the shuffle beside it, decoding, the only heavy operator, got
    # half the cluster (1 decode task on 2 CPUs, ~8 on 16). Without reservations it may use every CPU the trainers
    # leave (Ray Train still excludes their resources from Ray Data's limits): 1.4x the images/s on 2 CPUs.
    ds.context.op_resource_reservation_enabled = False
    # One decode call per block (batch_size=None: never several blocks bundled into one task, never a block cut into
    # several calls). Each decoded block is then one contiguous array: the training worker's batcher cuts batches
    # out of it as zero-copy slices. A block built from several calls' outputs has one Arrow chunk per call, and Ray
    # Data's batcher first concatenates such a block into one chunk, copying every decoded pixel once more on the
    # consumer (~50 us per 224 px image, half of a 2-core run's consumer CPU). Blocks are at most BLOCK_ROWS rows and
    # Ray Data's target block size decoded (decode_block_rows).
    return ds.map_batches(
        fn,
        batch_format="numpy",
        batch_size=None,
        num_cpus=cfg.decode_cpus,
        compute=ray.data.TaskPoolStrategy(size=cfg.decode_concurrency),
        udf_modifying_row_count=False,
    )


def as_nchw(images: torch.Tensor) -> torch.Tensor:
    """A batch of :class:`DecodeBatch` rows (NHWC) as the NCHW tensor models take: a view, ``torch.channels_last``."""
    return images.permute(0, 3, 1, 2)


def _nchw(batches: Any) -> Iterator[dict[str, torch.Tensor]]:
    for batch in batches:
        batch["image"] = as_nchw(batch["image"])
        yield batch


def iter_train_batches(
    shard: ray.data.DataIterator, cfg: DataConfig, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """Full uint8 batches of one worker's train shard on ``device``: ``{"image": NCHW uint8, "label": int64}``.

    ``drop_last`` keeps every DDP rank at the same number of equally sized steps (Ray Train splits the train
    dataset into equal shards).
    """
    import torch

    return _nchw(
        shard.iter_torch_batches(
            batch_size=cfg.batch_size,
            drop_last=True,
            device=device,
            prefetch_batches=cfg.prefetch_batches,
            dtypes={"image": torch.uint8, "label": torch.int64},
            local_shuffle_buffer_size=cfg.local_shuffle_buffer if cfg.shuffle == "local" else None,
        )
    )


def iter_eval_batches(
    shard: ray.data.DataIterator, cfg: DataConfig, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """Every row of one worker's evaluation shard, in batches of ``cfg.eval_batch_size`` (NCHW, as above)."""
    import torch

    return _nchw(
        shard.iter_torch_batches(
            batch_size=cfg.eval_batch_size,
            drop_last=False,
            device=device,
            prefetch_batches=cfg.prefetch_batches,
            dtypes={"image": torch.uint8, "label": torch.int64},
        )
    )
