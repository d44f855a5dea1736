"""``cls-ray ingest``: class folders (local or s3://) -> validated Parquet shards + ``manifest.json``.

The stages, one module each: :mod:`~cls_ray.data.scan` lists the files, :mod:`~cls_ray.data.validate` decodes
every file in worker processes under a time bound (on this machine, or over a Ray cluster with ``ingest.engine``:
:mod:`~cls_ray.data.ingest_ray`), :mod:`~cls_ray.data.split` drops duplicates and splits by
class (whole groups at a time with ``ingest.group_by``: :mod:`~cls_ray.data.groups`), :mod:`~cls_ray.data.parquet`
writes the shards and :mod:`~cls_ray.data.manifest` writes the manifest, last. Nothing at DEST is touched until
the input has been fully validated, so a bad input loses nothing.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from cls_ray import storage
from cls_ray.config import IngestConfig
from cls_ray.data import near_duplicates
from cls_ray.data.ingest_ray import WORK_DIR, RayEngine, choose_engine, confirm_engine
from cls_ray.data.manifest import (
    MANIFEST_FORMAT_VERSION,
    MANIFEST_NAME,
    ManifestError,
    manifest_uri,
    read_manifest,
    write_manifest,
)
from cls_ray.data.parquet import Row, write_split
from cls_ray.data.scan import SPLIT_DIRS, IngestError, ScanResult, scan_source
from cls_ray.data.split import SPLITS, Item, assign_splits, resolve_duplicates, shard_order
from cls_ray.data.validate import EncodeOptions, validate_file, validate_files

logger = logging.getLogger(__name__)

__all__ = ["IngestError", "ingest"]

_OWN_ENTRIES = frozenset({MANIFEST_NAME, WORK_DIR, *SPLIT_DIRS})
_PROBE = ".cls-ray-write-probe"


class _Spool:
    """Image bytes parked in a local temporary file between validation and shard writing (bounded memory)."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="cls-ray-ingest-")

    def put(self, data: bytes) -> tuple[int, int]:
        offset = self._file.seek(0, os.SEEK_END)
        self._file.write(data)
        return offset, len(data)

    def get(self, where: tuple[int, int]) -> bytes:
        self._file.seek(where[0])
        return self._file.read(where[1])

    def fileno(self) -> int:
        """The spool's descriptor, everything written so far flushed (for readers using ``os.pread``)."""
        self._file.flush()
        return self._file.fileno()

    def close(self) -> None:
        self._file.close()


def _check_stores(src: str, dest: str) -> None:
    """An S3 endpoint that refuses, wrong credentials or a missing bucket fail here, before any work."""
    for what, uri in (("cannot read SRC", src), ("DEST is not writable", dest)):
        try:
            storage.check_bucket(uri)
        except storage.StorageError as exc:
            raise IngestError(f"{what}: {exc}") from None


def _existing_dataset(src: str, dest: str, cfg: IngestConfig) -> dict[str, Any] | None:
    """The manifest of a complete dataset at DEST (then ingest is a no-op), or None when it must be written."""
    try:
        complete = storage.exists(manifest_uri(dest))
    except storage.StorageError as exc:
        raise IngestError(f"cannot reach DEST: {exc}") from None
    if not complete or cfg.overwrite:
        return None
    try:
        manifest = read_manifest(dest)
    except ManifestError as exc:
        raise IngestError(f"{exc}; pass --overwrite (ingest.overwrite=true) to replace it") from None
    if cfg.ffcv and "ffcv" not in manifest:
        logger.warning("%s holds a complete dataset without FFCV files and ingest.ffcv is on; rewriting it", dest)
        return None
    missing = _missing_shards(dest, manifest)
    if missing:
        logger.warning(
            "%s: manifest.json lists %d shard(s) that are gone (%s); rewriting the dataset",
            dest,
            len(missing),
            missing[0],
        )
        return None
    wanted = {
        "source": src,
        "seed": cfg.seed,
        "max_side": cfg.max_side,
        "jpeg_quality": cfg.jpeg_quality,
        "group_by": cfg.group_by,
        "group_file": cfg.group_file,
        "near_duplicates": None if cfg.near_duplicates == "off" else cfg.near_duplicates,
        "near_duplicate_threshold": None if cfg.near_duplicates == "off" else cfg.near_duplicate_threshold,
    }
    found = {
        "source": manifest.get("source"),
        "seed": manifest.get("split", {}).get("seed"),
        "group_by": manifest.get("split", {}).get("groups", {}).get("group_by"),
        "group_file": manifest.get("split", {}).get("groups", {}).get("group_file"),
        "near_duplicates": manifest.get("near_duplicates", {}).get("mode"),
        "near_duplicate_threshold": manifest.get("near_duplicates", {}).get("threshold"),
        "max_side": manifest.get("encoding", {}).get("max_side"),
        "jpeg_quality": manifest.get("encoding", {}).get("jpeg_quality"),
    }
    differs = [f"{k}: {found[k]!r} there, {wanted[k]!r} asked" for k in wanted if found[k] != wanted[k]]
    if differs:
        logger.warning(
            "%s was ingested with other settings (%s); keeping it (pass --overwrite to rewrite it)",
            dest,
            "; ".join(differs),
        )
    logger.info(
        "%s already holds a complete dataset (%d classes); nothing to do (pass --overwrite to rewrite it)",
        dest,
        len(manifest["classes"]),
    )
    return manifest


def _missing_shards(dest: str, manifest: dict[str, Any]) -> list[str]:
    _, root = storage.resolve(dest)
    try:
        present = {info.path[len(root) :].lstrip("/").replace(os.sep, "/") for info in storage.list_files(dest)}
    except storage.StorageError as exc:
        raise IngestError(f"cannot list DEST: {exc}") from None
    listed = [shard["path"] for split in manifest["splits"].values() for shard in split["shards"]]
    listed += [entry["path"] for entry in manifest.get("ffcv", {}).get("splits", {}).values()]
    return [p for p in listed if p not in present]


def _check_dest(dest: str, src: str) -> None:
    """DEST must be writable and hold nothing but an earlier cls-ray dataset; checked before any real work."""
    if not storage.is_remote(dest) and not storage.is_remote(src):
        s, d = os.path.realpath(src), os.path.realpath(storage.resolve(dest)[1])
        if d == s or d.startswith(s + os.sep) or s.startswith(d + os.sep):
            raise IngestError(f"DEST {dest} and SRC {src} overlap; write the dataset outside the source tree")
    probe = storage.join(dest, _PROBE)
    try:
        storage.write_bytes(probe, b"")
        storage.delete(probe)
    except storage.StorageError as exc:
        raise IngestError(f"DEST is not writable: {exc}") from None
    fs, path = storage.resolve(dest)
    import pyarrow.fs as pafs

    try:
        entries = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except OSError as exc:
        raise IngestError(f"cannot list DEST: {storage.describe_error(dest, exc)}") from None
    foreign = sorted(e.base_name for e in entries if e.base_name not in _OWN_ENTRIES and e.base_name != _PROBE)
    if foreign:
        raise IngestError(
            f"DEST {dest} is not empty and not a cls-ray dataset (it holds {', '.join(foreign[:5])}); "
            f"choose an empty or new location"
        )


def _clear_dest(dest: str) -> None:
    """Remove an earlier (complete or partial) dataset: the manifest first, so no manifest outlives its shards."""
    storage.delete(manifest_uri(dest))
    for split in SPLIT_DIRS:
        storage.delete(storage.join(dest, split))


def _validate(
    scan: ScanResult, cfg: IngestConfig, spool: _Spool, engine: RayEngine | None, validate: Callable
) -> tuple[list[Item], dict[str, dict], list[dict]]:
    """Every file validated, by the pool here or by the Ray engine's tasks; a valid file's facts say where its
    stored bytes are (``where`` in the spool, or ``read`` for the Ray engine's shard writers)."""
    from cls_ray.progress import bar as progress_bar

    opts = EncodeOptions(cfg.max_pixels, cfg.max_side, cfg.jpeg_quality, phash=cfg.near_duplicates != "off")
    workers = cfg.num_workers or os.cpu_count() or 1
    labels = {name: i for i, name in enumerate(scan.classes)}
    items: list[Item] = []
    facts: dict[str, dict] = {}
    skipped: list[dict] = list(scan.skipped)
    uris = [f.uri for f in scan.files]
    if engine is None:
        logger.info("validating %d files with %d worker processes", len(uris), workers)
        results = validate_files(uris, opts, workers, cfg.file_timeout_s, validate=validate)
    else:
        results = engine.validate_files(uris, opts)
    with progress_bar(len(uris), "validating") as bar:
        try:
            for i, result in results:
                bar.update(1)
                f = scan.files[i]
                if "reason" in result:
                    skipped.append({"path": f.path, "reason": result["reason"], "detail": result["detail"]})
                    continue
                items.append(Item(f.path, labels[f.class_name], result["sha256"], f.split))
                image = result.pop("image", None)
                facts[f.path] = {"where": spool.put(image), **result} if engine is None else result
        except RuntimeError as exc:  # pebble: the pool itself could not start its workers
            raise IngestError(
                f"the validation worker processes failed to start ({exc}); a script that calls "
                f"ingest() must guard its entry point with `if __name__ == '__main__':`"
            ) from None
    skipped.sort(key=lambda s: s["path"])
    return items, facts, skipped


def _check_classes(items: list[Item], classes: list[str], cfg: IngestConfig, src: str) -> None:
    if len(classes) < 2:
        raise IngestError(
            f"SRC {src} has {len(classes)} class folder ({', '.join(classes)}); a classifier needs "
            f"at least 2 (one subfolder per class)"
        )
    counts = [0] * len(classes)
    for it in items:
        counts[it.label] += 1
    short = [f"{classes[i]} ({n})" for i, n in enumerate(counts) if n < cfg.min_images_per_class]
    if short:
        raise IngestError(
            f"in SRC {src}, these classes have fewer than ingest.min_images_per_class="
            f"{cfg.min_images_per_class} valid images: {', '.join(short)}; add images or remove "
            f"the folders (the manifest's skipped list says why files were refused)"
        )


def _warn_missing(splits: dict[str, list[Item]], classes: list[str]) -> None:
    for split, items in splits.items():
        present = {it.label for it in items}
        missing = [name for i, name in enumerate(classes) if i not in present]
        if items and missing:
            logger.warning(
                "split %s has no image of %d class(es): %s (fewer than 3 images, or none given in a pre-split tree)",
                split,
                len(missing),
                ", ".join(missing[:10]),
            )


def _write_shards(
    dest: str,
    splits: dict[str, list[Item]],
    facts: dict[str, dict],
    spool: _Spool,
    num_classes: int,
    cfg: IngestConfig,
    groups: dict[str, str] | None,
    clusters: list[list[str]],
) -> dict[str, dict]:
    cluster_of = {path: min(cluster) for cluster in clusters for path in cluster}
    out = {}
    for split in SPLIT_DIRS:
        rows = (
            Row(
                spool.get(facts[it.path]["where"]),
                it.label,
                it.path,
                facts[it.path]["width"],
                facts[it.path]["height"],
                groups.get(it.path) if groups else None,
                cluster_of.get(it.path),
            )
            for it in shard_order(splits[split], cfg.seed, split)
        )
        try:
            out[split] = write_split(dest, split, rows, num_classes, cfg.shard_size_mb * 1024 * 1024)
        except OSError as exc:
            raise IngestError(f"writing the {split} shards failed: {storage.describe_error(dest, exc)}") from None
        logger.info("wrote %s: %d rows in %d shards", split, out[split]["num_rows"], len(out[split]["shards"]))
    return out


def _write_betons(
    dest: str, splits: dict[str, list[Item]], facts: dict[str, dict], spool: _Spool, cfg: IngestConfig
) -> dict[str, Any]:
    """FFCV .beton files of the non-empty splits, rows in the Parquet shards' order (``ingest.ffcv``)."""
    from cls_ray.data.ffcv_format import SpoolImages, write_beton

    fd = spool.fileno()
    out: dict[str, Any] = {}
    for split in SPLIT_DIRS:
        entries = [(*facts[it.path]["where"], it.label) for it in shard_order(splits[split], cfg.seed, split)]
        if not entries:
            continue
        try:
            out[split] = write_beton(dest, split, SpoolImages(fd, entries, cfg.max_pixels), cfg)
        except OSError as exc:
            raise IngestError(f"writing the {split} FFCV file failed: {storage.describe_error(dest, exc)}") from None
    return {
        "write_mode": cfg.ffcv_write_mode,
        "max_resolution": cfg.ffcv_max_resolution,
        "smart_threshold": cfg.ffcv_smart_threshold if cfg.ffcv_write_mode == "smart" else None,
        "splits": out,
    }


def _drop_near_duplicates(kept: list[Item], found: list[list[str]]) -> tuple[list[Item], list[list[str]], list[str]]:
    """``ingest.near_duplicates=drop``: keep the first path (sorted) of each cluster per class; returns the kept
    items, the clusters of what is left (survivors of a cluster spanning classes stay a cluster, so they are kept
    together), and the dropped paths, sorted. In a pre-split tree ``test/...`` sorts before ``train/...``: a train
    copy of a test image is the one dropped, as for exact duplicates."""
    label = {it.path: it.label for it in kept}
    dropped: set[str] = set()
    left: list[list[str]] = []
    for cluster in found:
        seen: set[int] = set()
        survivors = []
        for path in cluster:
            if label[path] in seen:
                dropped.add(path)
            else:
                seen.add(label[path])
                survivors.append(path)
        if len(survivors) > 1:
            left.append(survivors)
    return [it for it in kept if it.path not in dropped], left, sorted(dropped)


def _merge_clusters(groups: dict[str, str], found: list[list[str]]) -> dict[str, str]:
    """User groups joined through near-duplicate clusters: two groups sharing a cluster become one (named after
    the first of them in sorted order), so neither copies nor groups straddle splits."""
    from cls_ray.data.near_duplicates import cluster_labels

    names = sorted(set(groups.values()))
    index = {g: k for k, g in enumerate(names)}
    i, j = [], []
    for cluster in found:
        first = index[groups[cluster[0]]]
        for path in cluster[1:]:
            i.append(first)
            j.append(index[groups[path]])
    labels = cluster_labels(len(names), np.asarray(i, np.int64), np.asarray(j, np.int64))
    root: dict[int, str] = {}
    for name, label in zip(names, labels, strict=True):
        root.setdefault(int(label), name)
    return {path: root[int(labels[index[g]])] for path, g in groups.items()}


def _keep_clusters_together(
    splits: dict[str, list[Item]], found: list[list[str]], presplit: bool, carved: list[str]
) -> dict[str, list[Item]]:
    """``ingest.near_duplicates=group`` without user groups: after the per-class split, the members of each cluster
    that ingest placed move to the split holding most of them (ties: train, val, test), so images outside clusters
    keep exactly the split they would have without near-duplicate detection. Members in a given split of a
    pre-split tree stay where the tree put them."""
    movable = set(SPLITS if not presplit else ["train", *carved])
    where = {it.path: (split, it) for split, members in splits.items() for it in members}
    moves: dict[str, str] = {}
    for cluster in found:
        placed = [p for p in cluster if where[p][0] in movable]
        if len(placed) < 2:
            continue
        votes = {s: sum(1 for p in placed if where[p][0] == s) for s in SPLITS if s in movable}
        target = max(votes, key=lambda s: (votes[s], -SPLITS.index(s)))
        moves.update({p: target for p in placed if where[p][0] != target})
    if not moves:
        return splits
    out: dict[str, list[Item]] = {s: [] for s in SPLITS}
    for split, members in splits.items():
        for it in members:
            out[moves.get(it.path, split)].append(it)
    return {s: sorted(v, key=lambda it: it.path) for s, v in out.items()}


def _warn_near_duplicates(info: dict[str, Any]) -> None:
    if info["clusters"]:
        logger.info(
            "near-duplicates (%s within %d bits): %d clusters of %d images; %d span classes, %d span splits%s",
            info["hash"],
            info["threshold"],
            info["clusters"],
            info["images"],
            info["spanning_classes"],
            info["spanning_splits"],
            f"; {len(info['dropped'])} dropped" if info["dropped"] else "",
        )
    if info["spanning_splits"]:
        logger.warning(
            "%d near-duplicate cluster(s) span splits (manifest.json near_duplicates.notable): %s",
            info["spanning_splits"],
            "only the given splits of a pre-split tree can do that under ingest.near_duplicates=group or drop"
            if info["mode"] != "report"
            else "ingest.near_duplicates=report leaves them; group keeps each cluster in one split",
        )


def _groups(scan: ScanResult, items: list[Item], skipped: list[dict], cfg: IngestConfig) -> dict[str, str] | None:
    """Every valid file's group (``ingest.group_by`` / ``group_file``), or None without grouping."""
    from cls_ray.data.groups import groups_from_file, groups_from_regex

    paths = [it.path for it in items]
    if cfg.group_by:
        return groups_from_regex(paths, cfg.group_by)
    if cfg.group_file:
        every = [f.path for f in scan.files] + [s["path"] for s in skipped]
        return groups_from_file(paths, every, cfg.group_file)
    return None


def _group_info(
    splits: dict[str, list[Item]],
    groups: dict[str, str] | None,
    fractions: dict[str, float],
    carved: list[str],
    scan: ScanResult,
    cfg: IngestConfig,
) -> dict[str, Any] | None:
    """The manifest's ``split.groups`` (see :func:`cls_ray.data.groups.group_summary`); warns when the split
    misses its fractions by more than ``ingest.group_tolerance`` or a pre-split tree's group spans given splits."""
    from cls_ray.data.groups import group_summary

    if groups is None:
        return None
    if scan.presplit:
        targets = {s: fractions[s] for s in carved}
        targets["train"] = round(1 - sum(targets.values()), 6)
    else:
        targets = dict(fractions)
    by = {"group_by": cfg.group_by} if cfg.group_by else {"group_file": cfg.group_file}
    info = group_summary(splits, groups, targets, by, cfg.group_tolerance, len(scan.classes))
    if not info["within_tolerance"]:
        gaps = ", ".join(
            f"{s} {info['per_split'][s]['images']} images ({g:+.3f})" for s, g in info["share_gap"].items()
        )
        logger.warning(
            "the group split misses its fractions by up to %.3f (ingest.group_tolerance=%g): %s; %d groups are too "
            "few or too unequal to cut finer",
            info["max_share_gap"],
            cfg.group_tolerance,
            gaps,
            info["num_groups"],
        )
    spanning = info["spanning_splits"]
    if spanning["count"]:
        logger.warning(
            "%d group(s) appear in more than one of the given splits of SRC (e.g. %s): the tree's own split leaks "
            "them; ingest keeps given splits as they are",
            spanning["count"],
            ", ".join(spanning["examples"][:3]),
        )
    return info


def _encoding_summary(kept: list[Item], facts: dict[str, dict], cfg: IngestConfig) -> dict[str, Any]:
    kinds = [facts[it.path]["encoding"] for it in kept]
    return {
        "max_side": cfg.max_side,
        "jpeg_quality": cfg.jpeg_quality,
        "max_pixels": cfg.max_pixels,
        "kept_original": kinds.count("original"),
        "reencoded": len(kinds) - kinds.count("original"),
        "reencoded_jpeg": kinds.count("jpeg"),
        "reencoded_png": kinds.count("png"),
        "resized": sum(1 for it in kept if facts[it.path]["resized"]),
    }


def ingest(
    src: str, dest: str, cfg: IngestConfig, *, summary: bool = True, validate: Callable = validate_file
) -> dict[str, Any]:
    """Validate the class folders at ``src`` and write a dataset (shards + manifest.json) to ``dest``.

    Args:
        src: class folders, local directory or ``s3://bucket/prefix`` (flat or pre-split, see ``scan``).
        dest: dataset location, local directory or ``s3://bucket/prefix``.
        cfg: the ``ingest`` config section.
        summary: print the summary table when done.
        validate: the per-file function the worker processes run (a module-level function; tests and benchmarks
            wrap :func:`~cls_ray.data.validate.validate_file` to plant crashes, hangs or delays).

    Returns:
        The manifest written (or found, when DEST already holds a complete dataset and overwrite is off).

    Raises:
        IngestError: bad SRC or DEST, fewer than two classes, or a class without enough valid images.
    """
    if cfg.ffcv:
        from cls_ray.data.ffcv_format import require_ffcv

        require_ffcv("ingest.ffcv")
    _check_stores(src, dest)
    existing = _existing_dataset(src, dest, cfg)
    if existing is not None:
        if summary:
            print_ingest_summary(existing)
        return existing
    if cfg.near_duplicates != "off":
        # The matching step's libraries (faiss, scipy's graph module: ~0.5 s of CPU to import) load in the
        # background while the source is listed and the worker processes start, instead of after validation.
        threading.Thread(target=near_duplicates.preload, name="cls-ray-preload", daemon=True).start()
    engine, why = choose_engine(cfg, src, dest)
    ray_engine = RayEngine(src, dest, cfg, validate=validate) if engine == "ray" else None
    scan = ray_engine.scan() if ray_engine is not None else scan_source(src)
    engine, why = confirm_engine(cfg, engine, why, len(scan.files))
    if engine == "pool":
        ray_engine = None
    logger.info("ingest engine: %s (%s)", engine, why)
    _check_dest(dest, src)
    spool = _Spool()
    try:
        items, facts, skipped = _validate(scan, cfg, spool, ray_engine, validate)
        _check_classes(items, scan.classes, cfg, src)
        kept, duplicates = resolve_duplicates(items, scan.classes)
        _check_classes(kept, scan.classes, cfg, src)
        fractions = {
            "train": round(1 - cfg.val_fraction - cfg.test_fraction, 6),
            "val": cfg.val_fraction,
            "test": cfg.test_fraction,
        }
        found, pairs, near_dropped = [], 0, []
        if cfg.near_duplicates != "off":
            found, pairs = near_duplicates.clusters(
                [it.path for it in kept], [facts[it.path]["phash"] for it in kept], cfg.near_duplicate_threshold
            )
            if cfg.near_duplicates == "drop":
                kept, found, near_dropped = _drop_near_duplicates(kept, found)
                _check_classes(kept, scan.classes, cfg, src)
        groups = _groups(scan, items, skipped, cfg)
        split_keys = groups
        if groups is not None and found and cfg.near_duplicates in ("group", "drop"):
            split_keys = _merge_clusters(groups, found)
        splits, carved = assign_splits(kept, len(scan.classes), fractions, cfg.seed, scan.presplit, split_keys)
        if groups is None and found and cfg.near_duplicates in ("group", "drop"):
            splits = _keep_clusters_together(splits, found, scan.presplit, carved)
        group_info = _group_info(splits, split_keys, fractions, carved, scan, cfg)
        near_info = None
        if cfg.near_duplicates != "off":
            near_info = near_duplicates.describe(
                found,
                pairs,
                cfg.near_duplicates,
                cfg.near_duplicate_threshold,
                {it.path: scan.classes[it.label] for it in kept},
                {it.path: split for split, members in splits.items() for it in members},
                near_dropped,
            )
            _warn_near_duplicates(near_info)
        _warn_missing(splits, scan.classes)
        _clear_dest(dest)
        if ray_engine is not None:
            split_entries = ray_engine.write_shards(splits, facts, len(scan.classes), groups, found)
        else:
            split_entries = _write_shards(dest, splits, facts, spool, len(scan.classes), cfg, groups, found)
        betons = _write_betons(dest, splits, facts, spool, cfg) if cfg.ffcv else None
    finally:
        spool.close()
    manifest = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "classes": scan.classes,
        "splits": split_entries,
        "split": {
            "seed": cfg.seed,
            "fractions": fractions,
            "presplit": scan.presplit,
            "presplit_given": scan.splits_present,
            "carved": carved,
            **({"groups": group_info} if group_info is not None else {}),
        },
        "encoding": _encoding_summary(kept, facts, cfg),
        "skipped": skipped,
        "duplicates": duplicates,
        "counts": {
            "files": len(scan.files),
            "valid": len(items),
            "kept": len(kept),
            "skipped": len(skipped),
            "duplicates_dropped": len(items) - len(kept) - len(near_dropped),
            "hidden_ignored": scan.hidden_ignored,
        },
        "source": src,
    }
    if betons is not None:
        manifest["ffcv"] = betons
    if near_info is not None:
        manifest["near_duplicates"] = near_info
        manifest["counts"]["near_duplicates_dropped"] = len(near_dropped)
    write_manifest(dest, manifest)
    try:  # chunk results of this or an interrupted cluster ingest
        storage.delete(storage.join(dest, WORK_DIR))
    except storage.StorageError as exc:
        logger.warning("the dataset is complete, but its work files were not removed: %s", exc)
    logger.info("dataset complete: %s", manifest_uri(dest))
    if summary:
        print_ingest_summary(manifest)
    return manifest


def print_ingest_summary(manifest: dict[str, Any]) -> None:
    """Print the summary table of a dataset: per-class split counts, imbalance, refused files and duplicates."""
    from cls_ray.data.ingest_report import print_summary

    print_summary(manifest)
