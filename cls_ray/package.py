"""The model package: ``model.safetensors`` + ``model.json``, the one artefact evaluate, predict and serve read.

``model.json`` holds the timm architecture, class names, preprocessing (timm data config), metrics, the dataset
manifest it was trained on, and the training config. No pickle is ever loaded from a package.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import timm
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from cls_ray import storage

logger = logging.getLogger(__name__)

PACKAGE_FORMAT_VERSION = 1
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
        return self.meta.get("name", self.meta["architecture"])

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "1"))


def save_model_package(uri: str, model: nn.Module, meta: dict[str, Any]) -> str:
    """Write ``model.safetensors`` then ``model.json`` (last, so a package with a json is complete).

    ``meta`` needs at least ``architecture``, ``classes`` and ``data_config``; the model may be DDP-wrapped or
    compiled."""
    for key in ("architecture", "classes", "data_config"):
        if key not in meta:
            raise PackageError(f"model package metadata needs {key!r}")
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), save_safetensors(state))
    full = {"format_version": PACKAGE_FORMAT_VERSION, "num_classes": len(meta["classes"]), **meta}
    storage.write_json(storage.join(uri, META_FILE), full)
    logger.info("wrote model package %s", uri)
    return uri


def read_package_meta(uri: str) -> dict[str, Any]:
    meta_uri = storage.join(uri, META_FILE)
    if not storage.exists(meta_uri):
        raise PackageError(f"{uri} is not a model package: {META_FILE} is missing")
    meta = storage.read_json(meta_uri)
    version = meta.get("format_version")
    if version != PACKAGE_FORMAT_VERSION:
        raise PackageError(f"{meta_uri}: package format version {version!r} is not supported "
                           f"(this cls-ray reads version {PACKAGE_FORMAT_VERSION})")
    return meta


def load_model_package(uri: str, device: str | torch.device = "cpu") -> ModelPackage:
    """Load a package written by :func:`save_model_package`; the model is in eval mode on ``device``."""
    meta = read_package_meta(uri)
    model = timm.create_model(meta["architecture"], pretrained=False, num_classes=len(meta["classes"]),
                              **meta.get("model_kwargs", {}))
    state = load_safetensors(storage.read_bytes(storage.join(uri, WEIGHTS_FILE)))
    model.load_state_dict(state, strict=True)
    model.eval().to(device)
    return ModelPackage(model=model, meta=meta)
