"""The dataset manifest: the one file that says a dataset at a URI is complete and what it holds.

``manifest.json`` is written last by ingest; readers (train, tune, evaluate) open a dataset only through
:func:`read_manifest` and :func:`split_shard_uris`, so the format is checked in one place.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cls_ray import storage

MANIFEST_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """A dataset URI holds no readable cls-ray manifest, or one this version cannot read."""


def manifest_uri(dataset_uri: str) -> str:
    """The URI of the manifest of a dataset."""
    return storage.join(dataset_uri, MANIFEST_NAME)


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The canonical serialisation: sorted keys, fixed indentation, so equal manifests are equal bytes."""
    return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the canonical serialisation; identifies the exact dataset a model was trained on."""
    return hashlib.sha256(manifest_bytes(manifest)).hexdigest()


def dataset_name(dataset_uri: str, manifest: dict[str, Any]) -> str:
    """The dataset's name: the folder name of its class folders (``s3://b/datasets/flowers`` -> ``flowers``), or of
    the dataset itself where the manifest records no source. Model packages are named after it by default."""
    source = str(manifest.get("source") or dataset_uri).rstrip("/")
    return source.rsplit("/", 1)[-1] or "dataset"


def write_manifest(dataset_uri: str, manifest: dict[str, Any]) -> str:
    """Write ``manifest.json`` (atomically on local disk, one PUT on S3); returns its URI."""
    uri = manifest_uri(dataset_uri)
    storage.write_bytes(uri, manifest_bytes(manifest))
    return uri


def read_manifest(dataset_uri: str) -> dict[str, Any]:
    """Read and check the manifest of the dataset at ``dataset_uri``.

    Raises:
        ManifestError: no manifest.json there, not valid JSON, or an unknown ``format_version``.
        StorageError: the storage itself could not be reached (endpoint, credentials).
    """
    uri = manifest_uri(dataset_uri)
    if not storage.exists(uri):
        raise ManifestError(f"{dataset_uri} is not a cls-ray dataset: no manifest.json (run `cls-ray ingest` first)")
    try:
        manifest = json.loads(storage.read_bytes(uri))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{uri}: not valid JSON ({exc}); re-run `cls-ray ingest --overwrite`") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{uri}: the manifest must be a JSON object")
    version = manifest.get("format_version")
    if version != MANIFEST_FORMAT_VERSION:
        raise ManifestError(
            f"{uri}: unknown manifest format_version {version!r}; this cls-ray reads version "
            f"{MANIFEST_FORMAT_VERSION} (re-ingest with this version, or use the matching cls-ray)"
        )
    for key in ("classes", "splits"):
        if key not in manifest:
            raise ManifestError(f"{uri}: the manifest has no {key!r} key; re-run `cls-ray ingest --overwrite`")
    return manifest


def split_shard_uris(dataset_uri: str, manifest: dict[str, Any], split: str) -> list[str]:
    """Full URIs of the Parquet shards of one split (``train``, ``val`` or ``test``), in manifest order.

    A shard names its file by ``path``, relative to the dataset, or (in a dataset made of another's files, such as
    the cross-validation folds of :mod:`cls_ray.crossval`) by an absolute ``uri``.

    Raises:
        ManifestError: ``split`` is not a split of this dataset.
    """
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ManifestError(f"{dataset_uri}: no split {split!r} in the manifest (has: {', '.join(sorted(splits))})")
    return [
        shard["uri"] if "uri" in shard else storage.join(dataset_uri, *shard["path"].split("/"))
        for shard in splits[split]["shards"]
    ]
