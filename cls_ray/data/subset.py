"""A smaller copy of an ingested dataset: at most N images per class and split, for quick proxy searches.

The subset is a dataset like any other (manifest written last, same shard schema), so train and tune read it
unchanged. Rows are taken in shard order, which ingest already shuffled with its seed, so the subset is a
deterministic, stratified sample. A source with FFCV files gets subset FFCV files too (same settings, same rows).
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cls_ray import storage
from cls_ray.data.manifest import manifest_digest, read_manifest, split_shard_uris, write_manifest

logger = logging.getLogger(__name__)


def _take_per_class(table: pa.Table, limit: int, counts: list[int]) -> pa.Table:
    keep = []
    for i, label in enumerate(table.column("label").to_pylist()):
        if counts[label] < limit:
            counts[label] += 1
            keep.append(i)
    return table.take(pa.array(keep, type=pa.int64()))


def _subset_split(data_uri: str, manifest: dict[str, Any], split: str, dest: str, limit: int) -> tuple[dict, pa.Table]:
    counts = [0] * len(manifest["classes"])
    parts = []
    for uri in split_shard_uris(data_uri, manifest, split):
        fs, path = storage.resolve(uri)
        parts.append(_take_per_class(pq.read_table(path, filesystem=fs), limit, counts))
        if all(c >= limit for c in counts):
            break
    table = pa.concat_tables(parts)
    rel = f"{split}/part-00000.parquet"
    fs, path = storage.resolve(storage.join(dest, split, "part-00000.parquet"))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)
    shard = {"path": rel, "num_rows": table.num_rows, "class_counts": counts}
    return {"num_rows": table.num_rows, "class_counts": counts, "shards": [shard]}, table


def _subset_betons(manifest: dict[str, Any], tables: dict[str, pa.Table], dest: str) -> dict[str, Any]:
    from cls_ray.config import IngestConfig
    from cls_ray.data.ffcv_format import write_beton_from_bytes

    settings = manifest["ffcv"]
    quality = manifest.get("encoding", {}).get("jpeg_quality", IngestConfig.jpeg_quality)
    max_pixels = manifest.get("encoding", {}).get("max_pixels", IngestConfig.max_pixels)
    splits = {
        split: write_beton_from_bytes(
            dest,
            split,
            table.column("image").to_pylist(),
            table.column("label").to_pylist(),
            settings,
            quality,
            max_pixels,
        )
        for split, table in tables.items()
        if table.num_rows and split in settings["splits"]
    }
    return {**settings, "splits": splits}


def write_subset(data_uri: str, dest: str, per_class: int) -> dict[str, Any]:
    """Write a dataset with at most ``per_class`` images per class in each split; returns its manifest.

    A complete subset already at ``dest`` (same source manifest and limit) is reused.
    """
    manifest = read_manifest(data_uri)
    source_digest = manifest_digest(manifest)
    try:
        existing = read_manifest(dest)
        subset_of = existing.get("subset_of", {})
        if subset_of.get("digest") == source_digest and subset_of.get("per_class") == per_class:
            return existing
    except ValueError:
        pass
    written = {split: _subset_split(data_uri, manifest, split, dest, per_class) for split in manifest["splits"]}
    subset = {
        **manifest,
        "splits": {split: entry for split, (entry, _) in written.items()},
        "subset_of": {"uri": data_uri, "digest": source_digest, "per_class": per_class},
    }
    if "ffcv" in manifest:
        subset["ffcv"] = _subset_betons(manifest, {split: table for split, (_, table) in written.items()}, dest)
    write_manifest(dest, subset)
    logger.info("wrote a %d-per-class subset of %s to %s", per_class, data_uri, dest)
    return subset
