"""``ingest.engine=ray``: listing, validation and shard writing spread over the Ray cluster the command joins.

The single-machine path (:mod:`cls_ray.data.ingest`, ``engine=pool``) lists, validates and writes in one process
and its pool. Here the same stages run as Ray tasks, and only the decisions stay on the driver:

- **Listing**: SRC's top level is listed on the driver; every folder below it (a class folder, or a split folder's
  class folders) is paged through concurrently by the driver's threads: S3 pages through one prefix sequentially,
  so prefixes are the unit of parallel listing, and listing is waiting, not work. The result is the listing
  :func:`cls_ray.data.scan.scan_source` would make.
- **Validation**: chunks of ``ingest.chunk_files`` files, one task each, reserving ``ingest.task_cpus`` CPUs and
  running a :class:`~cls_ray.data.validate.ValidatorPool` of that many processes (kept alive in the Ray worker
  process between chunks), so the per-file time bound and the refusal of a file that crashes its decoder hold as
  in the pool path. A chunk writes its per-file facts (and the bytes of images it re-encoded) under
  ``DEST/_work/`` and returns the facts; no image bytes travel back to the driver. Chunk results are named by a
  digest of their files and the encoding options, so a re-run of an interrupted ingest reuses every chunk already
  written; a task lost with its node is retried elsewhere by Ray (``max_retries``).
- **Decisions**: duplicates, near-duplicates, groups and the split are made once, on the driver, from the facts:
  the same code as the pool path.
- **Shards**: the driver plans every split's shards from the stored sizes (:func:`cls_ray.data.parquet.plan_shards`,
  the cuts the sequential writer makes) and one task writes each shard straight to DEST, reading files kept as
  they were from SRC again (checked against the validated sha256) and re-encoded ones from ``_work``. The manifest
  is written last, by the caller: the dataset is byte-identical to what the pool path writes, and a partial one is
  never published.

SRC and DEST on object storage are read and written by every node. A local SRC or DEST is only known to be on the
driver's machine, so its tasks are kept on the driver's node (a shared filesystem mounted on every node at the same
path can say so with ``ingest.shared_filesystem=true``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from cls_ray import storage
from cls_ray.config import IngestConfig
from cls_ray.data.parquet import Row, ShardWriter, plan_shards
from cls_ray.data.scan import IngestError, ScanResult, is_hidden, list_below, scan_source
from cls_ray.data.split import SPLITS, Item, shard_order
from cls_ray.data.validate import EncodeOptions, ValidatorPool, validate_file

logger = logging.getLogger(__name__)

WORK_DIR = "_work"
"""Under DEST: chunk results of an unfinished ingest (removed once the manifest is written)."""
CHUNK_FORMAT = 2
"""Part of every chunk's digest: a change to what a chunk records makes earlier chunk results stale (2: the
perceptual hash on the power-of-two grid, ``near_duplicates.thumbnail``)."""
AUTO_MIN_FILES = 20_000
"""``engine=auto`` takes the cluster for at least this many files (below, the pool's start-up is cheaper)."""
READ_THREADS = 16
"""Concurrent reads of one shard-writing task (object storage answers each GET in milliseconds, not microseconds)."""


# ----------------------------------------------------------------------------------------------------------------
# Choosing the engine


def cluster_nodes() -> int:
    """Alive nodes of the Ray cluster this process is connected to (0 when it is not connected)."""
    import ray

    if not ray.is_initialized():
        return 0
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def choose_engine(cfg: IngestConfig, src: str, dest: str) -> tuple[str, str]:
    """``(engine, why)`` before listing: ``ray`` or ``pool`` as asked; for ``auto``, ``ray`` when a Ray cluster of
    more than one node is reachable (already connected, or ``RAY_ADDRESS`` set, as under ``ray job submit``) and SRC
    and DEST are on object storage (or ``ingest.shared_filesystem``), else ``pool``. ``auto`` can still fall back
    to ``pool`` after listing (:func:`confirm_engine`)."""
    if cfg.engine != "auto":
        return cfg.engine, f"ingest.engine={cfg.engine}"
    if cfg.ffcv:
        return "pool", "ingest.ffcv is written by the pool engine"
    shared = cfg.shared_filesystem or (storage.is_remote(src) and storage.is_remote(dest))
    if not shared:
        return "pool", "SRC or DEST is a local path (other nodes cannot read it)"
    import ray

    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):
            return "pool", "no Ray cluster to join (RAY_ADDRESS is not set)"
        from cls_ray.ray_connect import ensure_ray

        ensure_ray()
    nodes = cluster_nodes()
    if nodes < 2:
        return "pool", f"the Ray cluster has {nodes} node"
    return "ray", f"a Ray cluster of {nodes} nodes"


def confirm_engine(cfg: IngestConfig, engine: str, why: str, files: int) -> tuple[str, str]:
    """``auto`` keeps the cluster only for inputs of at least :data:`AUTO_MIN_FILES` files."""
    if cfg.engine == "auto" and engine == "ray" and files < AUTO_MIN_FILES:
        return "pool", f"{files} files (the cluster pays off from {AUTO_MIN_FILES})"
    return engine, why


# ----------------------------------------------------------------------------------------------------------------
# Listing


LIST_THREADS = 32
"""Prefixes listed at once. Listing is waiting on the store (one request per 1,000 keys), so threads of the driver
do it: measured against Ray tasks, a task per prefix paid a worker process start for a second of waiting."""


def _list_remote_parallel(src: str, threads: int = LIST_THREADS):
    """The listing :func:`cls_ray.data.scan._list_remote` makes, with every folder below SRC's top level (and
    every class folder of a pre-split tree's split folders) paged through concurrently."""
    import pyarrow.fs as pafs

    base = src.rstrip("/")
    fs, root = storage.resolve(base)

    def children(path: str) -> list[pafs.FileInfo]:
        try:
            return fs.get_file_info(pafs.FileSelector(path, recursive=False))
        except OSError as exc:
            raise storage.StorageError(storage.describe_error(f"s3://{path}", exc)) from exc

    pairs: list[tuple[str, str]] = []
    hidden = 0
    prefixes: list[str] = []

    def take(info: pafs.FileInfo) -> None:
        nonlocal hidden
        rel = info.path[len(root) :].lstrip("/")
        if is_hidden(rel):
            hidden += 1
        else:
            pairs.append((f"{base}/{rel}", rel))

    top = children(root)
    top_dirs = {i.base_name for i in top if i.type == pafs.FileType.Directory}
    presplit = "train" in top_dirs and top_dirs <= {"train", "val", "test"}
    for info in top:
        if info.type != pafs.FileType.Directory:
            take(info)
        elif presplit:
            for child in children(info.path):
                if child.type == pafs.FileType.Directory:
                    prefixes.append(child.path)  # bucket/key: pyarrow's S3 path
                else:
                    take(child)
        else:
            prefixes.append(info.path)
    started = time.monotonic()
    with ThreadPoolExecutor(max(1, min(threads, len(prefixes)))) as pool:
        for found, hidden_below in pool.map(lambda p: list_below(base, f"s3://{p}"), prefixes):
            pairs.extend(found)
            hidden += hidden_below
    pairs.sort(key=lambda p: p[1])
    logger.info(
        "listed %s: %d objects below %d prefixes, %d at a time, in %.1f s",
        src,
        len(pairs),
        len(prefixes),
        min(threads, len(prefixes)),
        time.monotonic() - started,
    )
    return pairs, [], hidden, []


def scan_parallel(src: str) -> ScanResult:
    """:func:`~cls_ray.data.scan.scan_source` with the folders of an ``s3://`` SRC listed concurrently (a local SRC
    is walked as usual: one machine's directory tree)."""
    if not storage.is_remote(src):
        return scan_source(src)
    return scan_source(src, lister=_list_remote_parallel)


# ----------------------------------------------------------------------------------------------------------------
# Validation


_POOLS: dict[tuple[int, float, Callable], ValidatorPool] = {}


def _pool(workers: int, timeout_s: float, validate: Callable) -> ValidatorPool:
    """This Ray worker process's validation pool (started by its first chunk, reused by the next ones)."""
    key = (workers, timeout_s, validate)
    if key not in _POOLS:
        _POOLS[key] = ValidatorPool(workers, timeout_s, validate=validate)
    return _POOLS[key]


@dataclass(frozen=True)
class Chunk:
    index: int
    name: str
    uris: list[str]


def _chunk_name(index: int, uris: list[str], opts: EncodeOptions) -> str:
    digest = hashlib.sha256(json.dumps([CHUNK_FORMAT, asdict(opts), uris]).encode()).hexdigest()[:16]
    return f"chunk-{index:06d}-{digest}"


def _fact_record(result: dict[str, Any]) -> dict[str, Any]:
    record = {k: v for k, v in result.items() if k != "image"}
    if "phash" in record:
        record["phash"] = record["phash"].hex()
    return record


def validate_chunk(
    chunk: Chunk, opts: EncodeOptions, work: str, workers: int, timeout_s: float, validate: Callable = validate_file
) -> dict[str, Any]:
    """One validation task: the chunk's files through this process's pool; re-encoded images and then the facts
    (the chunk's completion mark) written under ``work``. Returns ``{"facts", "node"}``."""
    import ray

    facts: list[dict[str, Any] | None] = [None] * len(chunk.uris)
    for i, result in _pool(workers, timeout_s, validate).run(chunk.uris, opts):
        image = result.get("image")
        if image is not None:  # re-encoded here: the shard writer reads it from _work
            storage.write_bytes(storage.join(work, "encoded", chunk.name, f"{i:06d}"), image)
        facts[i] = _fact_record(result)
    record = {"name": chunk.name, "uris": chunk.uris, "facts": facts}
    storage.write_bytes(storage.join(work, "chunks", f"{chunk.name}.json"), json.dumps(record).encode())
    return {"facts": facts, "node": ray.get_runtime_context().get_node_id()}


# ----------------------------------------------------------------------------------------------------------------
# Shard writing


def _read_checked(uri: str, sha256: str | None) -> bytes:
    data = storage.read_bytes(uri)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise IngestError(f"{uri} changed while it was being ingested (its bytes differ from those validated)")
    return data


def write_shard(
    dest: str, split: str, index: int, rows: list[tuple], num_classes: int, target_bytes: int
) -> dict[str, Any]:
    """One shard-writing task: ``rows`` (``(uri, sha256 or None, label, path, width, height, group, near_dup)``) read
    concurrently, in order, and written as shard ``index`` of ``split``. Returns its manifest entry."""
    writer = ShardWriter(dest, split, num_classes, target_bytes, first_index=index)
    # Object storage: concurrent GETs hide each one's latency. Local files: one thread, because 16 threads contending
    # for the GIL over 8 KB reads measured 5x slower than a plain loop (2.1 s against 0.43 s for 7,000 files).
    remote = any(storage.is_remote(row[0]) for row in rows)
    with ThreadPoolExecutor(READ_THREADS) if remote else contextlib.nullcontext() as pool:
        images = (pool.map if pool else map)(lambda r: _read_checked(r[0], r[1]), rows)
        for row, image in zip(rows, images, strict=True):
            writer.write(Row(image, *row[2:]))
    entry = writer.close()
    if len(entry["shards"]) != 1:  # the plan and the writer cut alike (parquet._Cuts); anything else is a bug
        raise RuntimeError(f"shard {split}/{index} planned as one shard was written as {len(entry['shards'])}")
    return entry["shards"][0]


# ----------------------------------------------------------------------------------------------------------------
# The engine


def _cause(exc: BaseException, uri: str) -> str:
    """What a failed task says, in a line: the exception raised in it (Ray's ``RayTaskError.cause``), else Ray's."""
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, OSError) and not isinstance(cause, storage.StorageError):
        return storage.describe_error(uri, cause)
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0]


class RayEngine:
    """The cluster side of one ingest: validation chunks and shard writing as Ray tasks (module docstring)."""

    def __init__(self, src: str, dest: str, cfg: IngestConfig, *, validate: Callable = validate_file) -> None:
        import ray

        from cls_ray.ray_connect import ensure_ray

        if cfg.ffcv:
            raise IngestError(
                "ingest.ffcv is not available with ingest.engine=ray yet; ingest with ingest.engine=pool to write "
                "FFCV files (or add them later to a Parquet dataset: `cls-ray ingest` with ingest.ffcv on the same "
                "DEST)"
            )
        ensure_ray()
        self.src, self.dest, self.cfg, self.validate = src, dest, cfg, validate
        self.work = storage.join(dest, WORK_DIR)
        self.nodes: dict[str, int] = {}
        self.counts = {"listed": 0, "validated": 0, "refused": 0, "written": 0}
        local = not cfg.shared_filesystem and not (storage.is_remote(src) and storage.is_remote(dest))
        self.task_options: dict[str, Any] = {}
        if local:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = ray.get_runtime_context().get_node_id()
            self.task_options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(here, soft=False)
            logger.info("SRC or DEST is a local path: the work stays on this node (put both on object storage to use "
                        "the whole cluster, or set ingest.shared_filesystem=true)")  # fmt: skip
        else:
            self.task_options["scheduling_strategy"] = "SPREAD"
        largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
        self.task_cpus = max(1, min(cfg.task_cpus, int(largest)))

    def scan(self) -> ScanResult:
        scan = scan_parallel(self.src)
        self._progress(listed=len(scan.files))
        return scan

    def _progress(self, **counts: int) -> None:
        """The job's progress in the Ray dashboard: the ``cls_ray_ingest_files`` gauges (:mod:`cls_ray.telemetry`)."""
        from cls_ray import telemetry

        self.counts.update(counts)
        telemetry.record_ingest(self.dest, self.counts)

    def _done_chunks(self) -> dict[str, dict[str, Any]]:
        """Chunk results an earlier, interrupted run left under ``_work``, by name."""
        chunks = storage.join(self.work, "chunks")
        try:
            infos = storage.list_files(chunks) if storage.exists(chunks) else []
        except storage.StorageError as exc:
            raise IngestError(f"cannot list {chunks}: {exc}") from None
        done = {}
        for info in infos:
            name = info.path.rsplit("/", 1)[-1]
            if name.endswith(".json"):
                uri = f"s3://{info.path}" if storage.is_remote(chunks) else info.path
                done[name[: -len(".json")]] = uri
        return done

    def validate_files(self, uris: list[str], opts: EncodeOptions) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(index, result)`` of every file (any order), as :func:`~cls_ray.data.validate.validate_files` yields
        them but without image bytes: reused chunk results first, then the chunks' tasks as they finish. A valid
        file's result carries ``read``: where the shard writer reads its stored bytes, and the sha256 to check."""
        import ray

        opts = EncodeOptions(**{**asdict(opts), "return_original": False})
        size = self.cfg.chunk_files
        chunks = [
            Chunk(i, _chunk_name(i, uris[i * size : (i + 1) * size], opts), uris[i * size : (i + 1) * size])
            for i in range(math.ceil(len(uris) / size))
        ]
        done = self._done_chunks()
        todo = []
        reused = 0
        for chunk in chunks:
            record = json.loads(storage.read_bytes(done[chunk.name])) if chunk.name in done else None
            if record is not None and record.get("uris") == chunk.uris:
                reused += 1
                yield from self._facts(chunk, record["facts"])
            else:
                todo.append(chunk)
        logger.info(
            "validating %d files in %d chunks of up to %d on the cluster (%d CPUs per task)%s",
            len(uris),
            len(chunks),
            size,
            self.task_cpus,
            f"; {reused} chunks done by an earlier run reused" if reused else "",
        )
        task = ray.remote(max_retries=5)(validate_chunk)
        options = {"num_cpus": self.task_cpus, **self.task_options}
        window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)) // self.task_cpus)
        started = time.monotonic()
        pending: dict[Any, Chunk] = {}
        queue = list(reversed(todo))
        while queue or pending:
            while queue and len(pending) < window:
                chunk = queue.pop()
                name = f"cls-ray ingest: validate chunk {chunk.index + 1}/{len(chunks)}"
                ref = task.options(name=name, **options).remote(
                    chunk, opts, self.work, self.task_cpus, self.cfg.file_timeout_s, self.validate
                )
                pending[ref] = chunk
            ready, _ = ray.wait(list(pending), num_returns=1)
            chunk = pending.pop(ready[0])
            try:
                out = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                raise IngestError(
                    f"validating chunk {chunk.index + 1} ({chunk.uris[0]} ...) failed: {_cause(exc, self.work)}"
                ) from None
            self.nodes[out["node"]] = self.nodes.get(out["node"], 0) + 1
            yield from self._facts(chunk, out["facts"])
        if self.nodes:
            logger.info(
                "validated %d chunks in %.1f s on %d node(s): %s",
                sum(self.nodes.values()),
                time.monotonic() - started,
                len(self.nodes),
                ", ".join(f"{node[:12]} ({n})" for node, n in sorted(self.nodes.items())),
            )

    def _facts(self, chunk: Chunk, facts: list[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
        size = self.cfg.chunk_files
        refused = sum("reason" in record for record in facts)
        self._progress(validated=self.counts["validated"] + len(facts), refused=self.counts["refused"] + refused)
        for row, record in enumerate(facts):
            result = dict(record)
            if "phash" in result:
                result["phash"] = bytes.fromhex(result["phash"])
            if "sha256" in result and "reason" not in result:
                if result["encoding"] == "original":
                    result["read"] = (chunk.uris[row], result["sha256"])
                else:
                    result["read"] = (storage.join(self.work, "encoded", chunk.name, f"{row:06d}"), None)
            yield chunk.index * size + row, result

    def write_shards(
        self,
        splits: dict[str, list[Item]],
        facts: dict[str, dict[str, Any]],
        num_classes: int,
        groups: dict[str, str] | None,
        clusters: list[list[str]],
    ) -> dict[str, dict[str, Any]]:
        """Every split's shards, one task per shard, planned here (module docstring); returns the splits' manifest
        entries."""
        import ray

        from cls_ray.progress import bar as progress_bar

        cfg = self.cfg
        target = cfg.shard_size_mb * 1024 * 1024
        cluster_of = {path: min(cluster) for cluster in clusters for path in cluster}
        task = ray.remote(max_retries=5)(write_shard)
        refs: dict[str, list[Any]] = {}
        total = sum(len(items) for items in splits.values())
        for split in SPLITS:
            ordered = shard_order(splits[split], cfg.seed, split)
            rows = [
                (
                    *facts[it.path]["read"],
                    it.label,
                    it.path,
                    facts[it.path]["width"],
                    facts[it.path]["height"],
                    groups.get(it.path) if groups else None,
                    cluster_of.get(it.path),
                )
                for it in ordered
            ]
            plan = plan_shards((facts[it.path]["size"] for it in ordered), target)
            refs[split], start = [], 0
            for index, count in enumerate(plan):
                name = f"cls-ray ingest: write {split}/part-{index:05d}"
                refs[split].append(
                    task.options(name=name, num_cpus=1, **self.task_options).remote(
                        self.dest, split, index, rows[start : start + count], num_classes, target
                    )
                )
                start += count
        out: dict[str, dict[str, Any]] = {}
        with progress_bar(total, "writing shards") as bar:
            for split in SPLITS:
                shards = []
                for ref in refs[split]:
                    try:
                        shards.append(ray.get(ref))
                    except ray.exceptions.RayError as exc:
                        cause = getattr(exc, "cause", None)
                        if isinstance(cause, IngestError):
                            raise IngestError(str(cause)) from None
                        raise IngestError(f"writing the {split} shards failed: {_cause(exc, self.dest)}") from None
                    bar.update(shards[-1]["num_rows"])
                    self._progress(written=self.counts["written"] + shards[-1]["num_rows"])
                counts = [sum(s["class_counts"][i] for s in shards) for i in range(num_classes)]
                out[split] = {"num_rows": sum(counts), "class_counts": counts, "shards": shards}
                logger.info("wrote %s: %d rows in %d shards", split, out[split]["num_rows"], len(shards))
        return out

    def finish(self) -> None:
        """The manifest is written: the chunk results are no longer needed."""
        storage.delete(self.work)
