"""The real images ``cls-ray export`` checks (and calibrates int8) exports on, preprocessed exactly as serving does.

By default the validation split of the dataset the package was trained on (``model.json``'s ``dataset.uri``); or
a folder of images at any depth (``--calibration-data``), labelled where its first-level folders are named like
the package's classes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from cls_ray import storage
from cls_ray.data import manifest as manifest_lib
from cls_ray.data.images import ImageDecodeError
from cls_ray.data.transforms import create_image_transform
from cls_ray.package import ModelPackage
from cls_ray.predict import preprocess_image

logger = logging.getLogger(__name__)


class ParityImagesError(ValueError):
    """No usable images to check an export on."""


@dataclass
class ParityImages:
    """Images as serving preprocesses them: uint8 (N, C, H, W), with labels where the source has them."""

    images: np.ndarray
    labels: np.ndarray | None
    source: str


def _spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``k >= n``)."""
    return list(range(n)) if k >= n else sorted({int(i) for i in np.linspace(0, n - 1, k).round()})


def validation_images(package: ModelPackage, max_images: int, max_pixels: int) -> ParityImages:
    """Up to ``max_images`` images of the validation split of the package's dataset (spread over the split)."""
    data_uri = package.meta.get("dataset", {}).get("uri")
    if not data_uri:
        raise ParityImagesError(
            f"model package {package.name} records no dataset (model.json has no dataset.uri); "
            f"give a folder of images with --calibration-data"
        )
    try:
        manifest = manifest_lib.read_manifest(data_uri)
    except (manifest_lib.ManifestError, storage.StorageError) as exc:
        raise ParityImagesError(
            f"the package's dataset {data_uri} cannot be read ({exc}); give a folder of images with --calibration-data"
        ) from None
    if list(manifest["classes"]) != list(package.classes):
        raise ParityImagesError(
            f"{data_uri} has other classes than package {package.name}; give a folder of images with --calibration-data"
        )
    total = int(manifest["splits"].get("val", {}).get("num_rows", 0))
    wanted = set(_spread(total, max_images))
    transform = create_image_transform(package.data_config)
    images, labels, row = [], [], 0
    for uri in manifest_lib.split_shard_uris(data_uri, manifest, "val"):
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=256, columns=["image", "label"]):
                for data, label in zip(
                    batch.column("image").to_pylist(), batch.column("label").to_pylist(), strict=True
                ):
                    if row in wanted:
                        images.append(preprocess_image(data, transform, max_pixels))  # ingest validated them
                        labels.append(label)
                    row += 1
    return _checked(images, np.asarray(labels, dtype=np.int64), f"{data_uri} (val split)")


def folder_images(package: ModelPackage, folder: str, max_images: int, max_pixels: int) -> ParityImages:
    """Up to ``max_images`` images below ``folder`` (spread over its sorted files; files that are not usable images
    are skipped and counted). Labels only where every image's first-level folder is one of the package's classes."""
    root = storage.absolute(folder).rstrip("/")
    _, base = storage.resolve(root)
    relative = sorted(i.path[len(base) :].lstrip("/") for i in storage.list_files(root))
    relative = [r for r in relative if not any(part.startswith(".") for part in r.split("/"))]
    transform = create_image_transform(package.data_config)
    index = {c: i for i, c in enumerate(package.classes)}
    images, labels, skipped = [], [], 0
    for path in (relative[i] for i in _spread(len(relative), max_images)):
        try:
            images.append(
                preprocess_image(storage.read_bytes(storage.join(root, *path.split("/"))), transform, max_pixels)
            )
        except (ImageDecodeError, storage.StorageError) as exc:
            skipped += 1
            logger.debug("skipped %s: %s", path, exc)
            continue
        parts = path.split("/")
        labels.append(index.get(parts[0], -1) if len(parts) > 1 else -1)
    if skipped:
        logger.warning("%d files below %s are not usable images and were skipped", skipped, folder)
    label_array = np.asarray(labels, dtype=np.int64)
    if len(label_array) and (label_array < 0).any():
        logger.info(
            "%s is not class folders named like the package's classes: exports are compared without accuracies", folder
        )
        label_array = None
    return _checked(images, label_array, folder)


def _checked(images: list[np.ndarray], labels: np.ndarray | None, source: str) -> ParityImages:
    if not images:
        raise ParityImagesError(f"{source} holds no usable image to check the export on")
    return ParityImages(np.stack(images), labels, source)


def load_parity_images(
    package: ModelPackage, calibration_data: str | None, max_images: int, max_pixels: int
) -> ParityImages:
    """The images exports of ``package`` are checked on: ``calibration_data`` if given, else its validation split."""
    if calibration_data:
        return folder_images(package, calibration_data, max_images, max_pixels)
    return validation_images(package, max_images, max_pixels)
