"""Writing dataset shards: Parquet files of encoded images, written through pyarrow filesystems (local or S3).

Schema (the dataset contract in docs/design.md): ``image`` binary, ``label`` int64, ``path`` string, ``width``
int32, ``height`` int32, ``group`` string (null unless ``ingest.group_by`` or ``group_file`` gave groups),
``near_duplicate`` string (the image's near-duplicate cluster, named after its first member's path; null outside
clusters and with ``ingest.near_duplicates=off``: what K-fold cross-validation keeps in one fold). Image
bytes are already compressed, so that column is stored uncompressed and without statistics or dictionary; a shard
holds row groups of at most ``ROW_GROUP_ROWS`` rows so readers can stream it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from cls_ray import storage

SCHEMA = pa.schema(
    [
        pa.field("image", pa.binary()),
        pa.field("label", pa.int64()),
        pa.field("path", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("group", pa.string()),
        pa.field("near_duplicate", pa.string()),
    ]
)
ROW_GROUP_ROWS = 1024
ROW_GROUP_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class Row:
    """One Parquet row."""

    image: bytes
    label: int
    path: str
    width: int
    height: int
    group: str | None = None
    near_duplicate: str | None = None


@dataclass
class _Batch:
    rows: list[Row] = field(default_factory=list)

    def table(self) -> pa.Table:
        columns = (
            [r.image for r in self.rows],
            [r.label for r in self.rows],
            [r.path for r in self.rows],
            [r.width for r in self.rows],
            [r.height for r in self.rows],
            [r.group for r in self.rows],
            [r.near_duplicate for r in self.rows],
        )
        return pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(columns, SCHEMA, strict=True)], schema=SCHEMA)


class _Cuts:
    """Where a split's rows are cut into row groups and shards, from the rows' image sizes alone: a row group ends
    at :data:`ROW_GROUP_ROWS` rows, at :data:`ROW_GROUP_BYTES`, or where the shard reaches its target size; a shard
    ends after the row group that takes it to ``target_bytes``. :class:`ShardWriter` writes by it and
    :func:`plan_shards` plans by it, so a shard written on its own (the Ray engine) is the one written in sequence.
    """

    def __init__(self, target_bytes: int) -> None:
        self.target_bytes = target_bytes
        self.shard_bytes = 0
        self.batch_rows = 0
        self.batch_bytes = 0

    def add(self, size: int) -> bool:
        """One more row of ``size`` image bytes; True when the row group ends with it."""
        self.batch_rows += 1
        self.batch_bytes += size
        room = self.target_bytes - self.shard_bytes
        return self.batch_rows >= ROW_GROUP_ROWS or self.batch_bytes >= min(ROW_GROUP_BYTES, room)

    def end_group(self) -> bool:
        """The row group is written; True when the shard ends with it."""
        self.shard_bytes += self.batch_bytes
        self.batch_rows = self.batch_bytes = 0
        if self.shard_bytes >= self.target_bytes:
            self.shard_bytes = 0
            return True
        return False


def plan_shards(sizes: Iterable[int], target_bytes: int) -> list[int]:
    """Rows per shard of a split whose rows have these image sizes, in order (what :func:`write_split` writes)."""
    cuts, shards, rows = _Cuts(target_bytes), [], 0
    for size in sizes:
        rows += 1
        if cuts.add(size) and cuts.end_group():
            shards.append(rows)
            rows = 0
    return [*shards, rows] if rows else shards


class ShardWriter:
    """Writes the rows of one split as ``SPLIT/part-NNNNN.parquet`` files of about ``target_bytes`` each.

    Args:
        dataset_uri: the dataset root (local path or s3:// URI).
        split: ``train``, ``val`` or ``test``.
        num_classes: length of the per-shard ``class_counts``.
        target_bytes: a shard is closed once its image bytes reach this size.
        first_index: the number of the first shard written (a writer of one planned shard, :func:`plan_shards`).
    """

    def __init__(self, dataset_uri: str, split: str, num_classes: int, target_bytes: int, first_index: int = 0):
        self.dataset_uri = dataset_uri
        self.split = split
        self.num_classes = num_classes
        self.first_index = first_index
        self.shards: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self._cuts = _Cuts(target_bytes)
        self._batch = _Batch()

    def _open(self) -> None:
        rel = f"{self.split}/part-{self.first_index + len(self.shards):05d}.parquet"
        uri = storage.join(self.dataset_uri, *rel.split("/"))
        fs, path = storage.resolve(uri)
        if not storage.is_remote(uri):
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        self._writer = pq.ParquetWriter(
            path,
            SCHEMA,
            filesystem=fs,
            compression={
                "image": "NONE",
                "label": "ZSTD",
                "path": "ZSTD",
                "width": "ZSTD",
                "height": "ZSTD",
                "group": "ZSTD",
            },
            use_dictionary=["label"],
            write_statistics=["label", "width", "height"],
        )
        self.shards.append({"path": rel, "num_rows": 0, "class_counts": [0] * self.num_classes})

    def _flush(self) -> None:
        if not self._batch.rows:
            return
        if self._writer is None:
            self._open()
        self._writer.write_table(self._batch.table(), row_group_size=ROW_GROUP_ROWS)
        shard = self.shards[-1]
        for row in self._batch.rows:
            shard["class_counts"][row.label] += 1
        shard["num_rows"] += len(self._batch.rows)
        self._batch = _Batch()
        if self._cuts.end_group():
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def write(self, row: Row) -> None:
        """Append one row."""
        self._batch.rows.append(row)
        if self._cuts.add(len(row.image)):
            self._flush()

    def close(self) -> dict:
        """Finish the last shard; returns the manifest entry of the split."""
        self._flush()
        self._close_shard()
        counts = [sum(s["class_counts"][i] for s in self.shards) for i in range(self.num_classes)]
        return {"num_rows": sum(counts), "class_counts": counts, "shards": self.shards}


def write_split(dataset_uri: str, split: str, rows: Iterable[Row], num_classes: int, target_bytes: int) -> dict:
    """Write all ``rows`` of a split; returns its manifest entry (``num_rows``, ``class_counts``, ``shards``)."""
    writer = ShardWriter(dataset_uri, split, num_classes, target_bytes)
    try:
        for row in rows:
            writer.write(row)
    finally:
        result = writer.close()
    return result
