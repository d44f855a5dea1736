"""FFCV, the second dataset format: ingest writes a .beton per split (local and on the S3 server) holding exactly the
Parquet shards' rows, and training with data.format=ffcv reads it in every DDP worker (real Ray, CPU), learns, and
packages a model that ``evaluate`` reproduces; a dataset without .beton files is refused before any worker starts.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from conftest import FAST_TRAIN, write_digits_folders
from PIL import Image

from cls_ray import storage
from cls_ray.config import ConfigError, IngestConfig, load_config
from cls_ray.data.ingest import ingest
from cls_ray.data.manifest import manifest_digest, read_manifest, split_shard_uris
from cls_ray.data.subset import write_subset
from cls_ray.evaluate import evaluate
from cls_ray.train.trainer import train

pytestmark = pytest.mark.ray

FFCV_TRAIN = ["data.format=ffcv", *FAST_TRAIN]


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    ray.init(address="local", num_cpus=4, object_store_memory=400 * 1024**2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_digits_folders(tmp_path_factory.mktemp("ffcv-folders"), per_class=60)


def _read_beton(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Every row of a .beton in stored order: (N, H, W, 3) uint8 images and labels."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    loader = Loader(
        path,
        batch_size=64,
        num_workers=1,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder(), ToTensor()]},
    )
    images, labels = [], []
    for image, label in loader:
        images.append(np.array(image))
        labels.append(label.numpy().reshape(-1).copy())  # FFCV reuses its output buffers
    return np.concatenate(images), np.concatenate(labels)


def _parquet_rows(dataset: str, split: str) -> tuple[list[np.ndarray], list[int]]:
    manifest = read_manifest(dataset)
    images, labels = [], []
    for uri in split_shard_uris(dataset, manifest, split):
        fs, path = storage.resolve(uri)
        table = pq.read_table(path, filesystem=fs, columns=["image", "label"])
        images += [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in table.column("image").to_pylist()]
        labels += table.column("label").to_pylist()
    return images, labels


def test_ingest_writes_raw_betons_holding_the_parquet_rows(folders, tmp_path):
    dest = str(tmp_path / "digits")
    manifest = ingest(str(folders), dest, IngestConfig(ffcv=True, ffcv_write_mode="raw"), summary=False)

    betons = manifest["ffcv"]["splits"]
    assert set(betons) == {"train", "val", "test"} and manifest["ffcv"]["write_mode"] == "raw"
    for split, entry in betons.items():
        assert entry["path"] == f"{split}/data.beton"
        assert entry["num_rows"] == manifest["splits"][split]["num_rows"] > 0
        images, labels = _read_beton(str(tmp_path / "digits" / entry["path"]))
        expected_images, expected_labels = _parquet_rows(dest, split)
        assert labels.tolist() == expected_labels  # same rows, same order
        assert images.shape == (len(expected_images), 32, 32, 3)
        assert np.array_equal(images, np.stack(expected_images))  # raw: grayscale -> RGB, pixel for pixel

    # A per-class subset (the pipeline's proxy search) gets its own .beton files, with the subset's rows.
    subset = write_subset(dest, str(tmp_path / "subset"), per_class=4)
    assert set(subset["ffcv"]["splits"]) == {"train", "val", "test"}
    for split, entry in subset["ffcv"]["splits"].items():
        images, labels = _read_beton(str(tmp_path / "subset" / entry["path"]))
        expected_images, expected_labels = _parquet_rows(str(tmp_path / "subset"), split)
        assert labels.tolist() == expected_labels and len(labels) == 40
        assert np.array_equal(images, np.stack(expected_images))


def test_ingest_adds_betons_to_a_dataset_without_them_and_jpeg_mode(folders, tmp_path):
    dest = str(tmp_path / "digits")
    plain = ingest(str(folders), dest, IngestConfig(), summary=False)
    assert "ffcv" not in plain and not (tmp_path / "digits" / "train" / "data.beton").exists()
    # smart mode with a threshold below one 32x32 image: every image is stored as JPEG.
    manifest = ingest(str(folders), dest, IngestConfig(ffcv=True, ffcv_smart_threshold=100), summary=False)
    assert manifest["splits"] == plain["splits"]
    images, labels = _read_beton(str(tmp_path / "digits" / "val" / "data.beton"))
    expected_images, expected_labels = _parquet_rows(dest, "val")
    assert labels.tolist() == expected_labels
    diff = np.abs(images.astype(np.int16) - np.stack(expected_images).astype(np.int16))
    assert 0 < diff.mean() < 4  # lossy, but the same pictures


@pytest.mark.slow
def test_ddp_training_reads_the_beton_from_s3_and_evaluate_reproduces(ray_cluster, folders, s3_bucket, tmp_path):
    dest = f"{s3_bucket}/digits"
    ingest(str(folders), dest, IngestConfig(ffcv=True), summary=False)
    cfg = load_config(
        None,
        [
            *FFCV_TRAIN,
            f"train.storage_path={tmp_path / 'runs'}",
            "train.run_name=ffcv",
            "train.epochs=4",
            "train.num_workers=2",
            "train.keep_checkpoints=1",
        ],
    )
    result = train(dest, cfg)

    assert result.metrics["val_top1"] > 0.6  # 10 classes: chance is 0.1
    # The workers read the node's local copy of the S3 object (FFCV memory-maps local files).
    digest = manifest_digest(read_manifest(dest))
    copy = Path(tempfile.gettempdir()) / "cls-ray-ffcv" / f"{digest[:16]}-train.beton"
    assert copy.stat().st_size == read_manifest(dest)["ffcv"]["splits"]["train"]["bytes"]
    evaluated = evaluate(result.package_uri, dest, split="val", output_dir=str(tmp_path / "eval"))
    for key in ("top1", "top5", "f1_macro"):
        assert evaluated[key] == pytest.approx(result.metrics[f"val_{key}"], abs=1e-6), key


def test_ffcv_format_refused_before_workers_start(ray_cluster, folders, tmp_path):
    dest = str(tmp_path / "digits")
    ingest(str(folders), dest, IngestConfig(), summary=False)
    cfg = load_config(None, [*FFCV_TRAIN, f"train.storage_path={tmp_path / 'runs'}", "train.run_name=refused"])
    with pytest.raises(ConfigError, match="ingest.ffcv") as info:
        train(dest, cfg)
    assert "no 'train' .beton" in str(info.value)
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written
    with pytest.raises(ConfigError, match=r"data\.auto_augment=null data\.color_jitter=0"):
        load_config(None, ["data.format=ffcv"])
    with pytest.raises(ConfigError, match="data.balanced_sampling"):
        load_config(None, [*FFCV_TRAIN, "data.balanced_sampling=true"])
