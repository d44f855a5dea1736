"""The model package: ``model.safetensors`` + ``model.json``, the one artefact evaluate, predict and serve read.

``model.json`` holds the package's name and version, the timm architecture, class names, preprocessing (timm data
config), metrics, the dataset manifest it was trained on, and the training config. No pickle is ever loaded from a
package.

Name and version: the name is chosen by whoever writes the package (``train.package_name``, default the dataset's
name) and must be usable in a URL path (KServe's ``/v2/models/{name}``). The version is the first
:data:`VERSION_DIGITS` hex digits of the SHA-256 of ``model.safetensors``: it needs no shared counter (trials,
re-runs and clusters write packages concurrently to object storage), the same weights always get the same version,
and any other weights a different one, so a served version names exactly the weights behind it.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any

import timm
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from cls_ray import storage
from cls_ray.config import PACKAGE_NAME_PATTERN

logger = logging.getLogger(__name__)

PACKAGE_FORMAT_VERSION = 2
#: Format 1 packages (no name or version) are still read: they get the architecture as name and the digest version.
READABLE_FORMAT_VERSIONS = (1, 2)
VERSION_DIGITS = 12
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


class PackageError(ValueError):
    """A model package is missing, incomplete or of an unknown version."""


@dataclass
class ModelPackage:
    """A loaded model package: the model in eval mode and its metadata."""

    model: nn.Module
    meta: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def data_config(self) -> dict[str, Any]:
        return self.meta["data_config"]

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def version(self) -> str:
        return self.meta["version"]


def package_name(name: str) -> str:
    """``name`` made usable as a package name: characters other than letters, digits, ``.``, ``_`` and ``-``
    become ``-`` (a dataset folder called ``my photos`` gives the package ``my-photos``)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._")[:128]
    return cleaned or "model"


def weights_version(weights: bytes) -> str:
    """The version of a package whose ``model.safetensors`` holds ``weights`` (see the module docstring)."""
    return hashlib.sha256(weights).hexdigest()[:VERSION_DIGITS]


def save_model_package(uri: str, model: nn.Module, meta: dict[str, Any]) -> str:
    """Write ``model.safetensors`` then ``model.json`` (last, so a package with a json is complete).

    ``meta`` needs at least ``name``, ``architecture``, ``classes`` and ``data_config``; the version is the weights'
    digest (set here, never by the caller). The model may be DDP-wrapped or compiled."""
    for key in ("name", "architecture", "classes", "data_config"):
        if key not in meta:
            raise PackageError(f"model package metadata needs {key!r}")
    if "version" in meta:
        raise PackageError("model package metadata: 'version' is the weights' digest, set by save_model_package")
    if not PACKAGE_NAME_PATTERN.fullmatch(meta["name"]):
        raise PackageError(
            f"model package name {meta['name']!r}: use letters, digits, '.', '_' and '-' (it is part "
            f"of URLs), starting with a letter or digit, at most 128 characters"
        )
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights = save_safetensors(state)
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), weights)
    full = {
        "format_version": PACKAGE_FORMAT_VERSION,
        "num_classes": len(meta["classes"]),
        **meta,
        "version": weights_version(weights),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    storage.write_json(storage.join(uri, META_FILE), full)
    logger.info("wrote model package %s (%s version %s)", uri, full["name"], full["version"])
    return uri


def read_package_meta(uri: str) -> dict[str, Any]:
    """``model.json`` of the package at ``uri``, with ``name`` and ``version`` always set.

    Raises:
        PackageError: no package there, or one of a format this cls-ray cannot read.
    """
    meta_uri = storage.join(uri, META_FILE)
    if not storage.exists(meta_uri):
        raise PackageError(f"{uri} is not a model package: {META_FILE} is missing")
    meta = storage.read_json(meta_uri)
    version = meta.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise PackageError(
            f"{meta_uri}: package format version {version!r} is not supported "
            f"(this cls-ray reads versions {', '.join(map(str, READABLE_FORMAT_VERSIONS))})"
        )
    if "version" not in meta:  # format 1: derive what format 2 records
        meta.setdefault("name", package_name(meta["architecture"]))
        meta["version"] = weights_version(storage.read_bytes(storage.join(uri, WEIGHTS_FILE)))
    return meta


def update_package_meta(uri: str, updates: dict[str, Any], target_uri: str | None = None) -> dict[str, Any]:
    """Rewrite ``model.json`` of the package at ``uri`` (or at ``target_uri``, a copy) with ``updates`` merged in.

    The stored JSON is rewritten as it is, plus ``updates``: a format-1 package stays format 1 (its name and version
    are derived when read, never written), and the weights' digest is never touched. One write, so the package is
    either as before or as after. Returns the written metadata.

    Raises:
        PackageError: no package at ``uri``, or ``updates`` tries to change what the weights decide.
    """
    forbidden = {"version", "weights_sha256", "format_version"} & set(updates)
    if forbidden:
        raise PackageError(f"model.json: {sorted(forbidden)} follow from the weights and are never updated")
    read_package_meta(uri)  # the same checks as every reader
    raw = storage.read_json(storage.join(uri, META_FILE))
    raw.update(updates)
    storage.write_json(storage.join(target_uri or uri, META_FILE), raw)
    return raw


def load_model_package(uri: str, device: str | torch.device = "cpu") -> ModelPackage:
    """Load a package written by :func:`save_model_package`; the model is in eval mode on ``device``."""
    meta = read_package_meta(uri)
    model = timm.create_model(
        meta["architecture"], pretrained=False, num_classes=len(meta["classes"]), **meta.get("model_kwargs", {})
    )
    weights = storage.read_bytes(storage.join(uri, WEIGHTS_FILE))
    expected = meta.get("weights_sha256")
    if expected is not None and hashlib.sha256(weights).hexdigest() != expected:
        raise PackageError(
            f"{storage.join(uri, WEIGHTS_FILE)} is not the file {META_FILE} describes (its SHA-256 "
            f"differs): the package was changed or half-copied; copy or write it again"
        )
    model.load_state_dict(load_safetensors(weights), strict=True)
    model.eval().to(device)
    return ModelPackage(model=model, meta=meta)


def read_recorded_export(model_uri: str, meta: dict[str, Any], fmt: str, precision: str = "fp32") -> bytes:
    """The bytes of the package's recorded export of ``fmt`` and ``precision``, checked against its SHA-256.

    Raises:
        PackageError: no such export recorded, or its file is not the one ``model.json`` records.
    """
    record = next((e for e in meta.get("exports", []) if e["format"] == fmt and e["precision"] == precision), None)
    if record is None:
        flag = " --int8" if precision == "int8" else ""
        raise PackageError(
            f"{model_uri} records no {precision} {fmt} export; run `cls-ray export {model_uri} "
            f"--format {fmt}{flag}` first"
        )
    uri = storage.join(model_uri, record["file"])
    data = storage.read_bytes(uri)
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise PackageError(
            f"{uri} is not the export {META_FILE} records (its SHA-256 differs): the file was changed "
            f"or half-copied; run `cls-ray export` again"
        )
    if record.get("package_version") != meta["version"]:
        raise PackageError(
            f"{uri} was exported from package version {record.get('package_version')}, not "
            f"{meta['version']}; run `cls-ray export` again"
        )
    return data
