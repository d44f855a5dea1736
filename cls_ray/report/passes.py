"""The report's per-image work on Ray Data: the clean pass and one pass per corruption and severity.

A split's Parquet shards are read by Ray Data; CPU tasks decode each image once (the decoder of training and
``cls-ray evaluate``), apply every requested corruption to the decoded image and then the serving eval transform
(:class:`CorruptAndPreprocess`); an actor pool of model replicas (:class:`ScorePasses`, one :class:`Predictor` each,
a GPU each when asked) scores them. The driver only receives small per-image results: the raw logits of the clean
pass (for metrics, top losses and calibration) and, per corrupted pass, the prediction and whether it was right.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cls_ray import storage
from cls_ray.data import manifest as manifest_lib
from cls_ray.data.pipeline import DRIVER_READ_BYTES, read_small_shards, shard_bytes

logger = logging.getLogger(__name__)

CLEAN = "clean"
SCORED_COLUMNS = ["image", "label", "path"]


def pass_name(corruption: str, severity: int) -> str:
    return CLEAN if corruption == CLEAN else f"{corruption}:{severity}"


@dataclass
class SplitResults:
    """What the passes over one split produced, in the split's row order (sorted by dataset path)."""

    paths: list[str]
    labels: np.ndarray
    logits: np.ndarray | None = None
    """(N, C) float32 raw logits of the clean pass."""
    corrupted: dict[str, np.ndarray] = field(default_factory=dict)
    """Per corrupted pass name (``noise:2``): (M,) int64 predictions of the rows in :attr:`corrupted_rows`."""
    corrupted_rows: np.ndarray | None = None
    """Row indices (into :attr:`paths`) the corrupted passes scored (all rows, or a seeded sample)."""


class CorruptAndPreprocess:
    """Ray Data batch UDF: encoded rows -> one preprocessed uint8 CHW image per row and pass.

    Args:
        data_config: the package's timm data config (the serving eval transform is built from it).
        passes: ``[(corruption, severity)]``; ``("clean", 0)`` is the image as stored.
        corrupt_paths: when given, the corrupted passes run only for rows whose path is in it.
    """

    def __init__(
        self,
        data_config: dict[str, Any],
        passes: list[tuple[str, int]],
        corrupt_paths: set[str] | None,
        max_pixels: int = 64_000_000,
    ):
        self.data_config = data_config
        self.passes = [tuple(p) for p in passes]
        self.corrupt_paths = corrupt_paths
        self.max_pixels = max_pixels
        self._transform = None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        from torchvision.transforms.v2.functional import pil_to_tensor

        from cls_ray.data.decode import decode_stored_image
        from cls_ray.predict import _eval_transform
        from cls_ray.report.corruptions import corrupt

        if self._transform is None:
            self._transform = _eval_transform(json.dumps(self.data_config, sort_keys=True))
        channels, height, width = self.data_config["input_size"]
        size = int(height)
        images, labels, paths, passes = [], [], [], []
        for data, label, path in zip(batch["image"], batch["label"], batch["path"], strict=True):
            decoded = decode_stored_image(data, self.max_pixels, as_tensor=True)
            if not isinstance(decoded, torch.Tensor):
                decoded = pil_to_tensor(decoded)
            for name, severity in self.passes:
                if name != CLEAN and self.corrupt_paths is not None and path not in self.corrupt_paths:
                    continue
                image = decoded if name == CLEAN else corrupt(decoded, name, severity, key=path, input_size=size)
                images.append(self._transform(image))
                labels.append(int(label))
                paths.append(path)
                passes.append(pass_name(name, severity))
        if not images:
            images_arr = np.zeros((0, channels, height, width), np.uint8)
        else:
            images_arr = np.stack(images)
        return {
            "image": images_arr,
            "label": np.asarray(labels, np.int64),
            "path": np.asarray(paths, dtype=object),
            "pass": np.asarray(passes, dtype=object),
        }


def preprocess_passes(batch: dict[str, np.ndarray], **kwargs: Any) -> dict[str, np.ndarray]:
    """:class:`CorruptAndPreprocess` as a plain function, for Ray Data tasks (the transform is cached per process)."""
    return CorruptAndPreprocess(**kwargs)(batch)


class ScorePasses:
    """Ray Data actor UDF: a model replica returning, per image, its pass, prediction and (clean pass) logits."""

    def __init__(self, model_uri: str, use_gpu: bool):
        from cls_ray.predict import Predictor

        self.predictor = Predictor.from_uri(model_uri, device="cuda" if use_gpu else "cpu")

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa

        n = len(batch["path"])
        if n == 0:
            logits = np.zeros((0, len(self.predictor.classes)), np.float32)
        else:
            logits = self.predictor.logits_batch(list(batch["image"])).numpy()
        clean = [p == CLEAN for p in batch["pass"]]
        return pa.table(
            {
                "path": pa.array(list(batch["path"]), pa.string()),
                "pass": pa.array(list(batch["pass"]), pa.string()),
                "label": pa.array(batch["label"], pa.int64()),
                "pred": pa.array(logits.argmax(axis=1) if n else [], pa.int64()),
                "logits": pa.array(
                    [row.tolist() if c else None for row, c in zip(logits, clean, strict=True)],
                    pa.list_(pa.float32()),
                ),
            }
        )


def _replicas(use_gpu: bool, max_replicas: int | None) -> int:
    import ray

    if max_replicas is not None:
        return max_replicas
    resources = ray.cluster_resources()
    if use_gpu:
        return max(1, int(resources.get("GPU", 0)))
    return max(1, int(resources.get("CPU", 1)) - 1)


def run_passes(
    model_uri: str,
    data_uri: str,
    manifest: dict[str, Any],
    split: str,
    passes: list[tuple[str, int]],
    *,
    corrupt_paths: set[str] | None = None,
    batch_size: int = 128,
    use_gpu: bool = False,
    max_replicas: int | None = None,
    max_pixels: int = 64_000_000,
    desc: str = "report",
) -> SplitResults:
    """Score ``split`` under every pass of ``passes`` on Ray Data (see the module docstring)."""
    import ray

    from cls_ray.package import read_package_meta
    from cls_ray.progress import bar as progress_bar

    meta = read_package_meta(model_uri)
    uris = manifest_lib.split_shard_uris(data_uri, manifest, split)
    if not uris:
        raise manifest_lib.ManifestError(f"{data_uri}: split {split!r} has no shards")
    filesystem, _ = storage.resolve(uris[0])
    paths = [storage.resolve(u)[1] for u in uris]
    rows = int(manifest["splits"][split]["num_rows"])
    corrupted = [p for p in passes if p[0] != CLEAN]
    per_row = 1 + len(corrupted) * (len(corrupt_paths) / max(1, rows) if corrupt_paths is not None else 1)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    blocks = max(1, min(rows // 8 or 1, 4 * cpus * max(1, int(per_row))))
    if shard_bytes(filesystem, paths) <= DRIVER_READ_BYTES:  # no read and re-blocking tasks for a small split
        ds = read_small_shards(filesystem, paths, SCORED_COLUMNS, block_rows=math.ceil(rows / blocks))
    else:
        ds = ray.data.read_parquet(paths, filesystem=filesystem).select_columns(SCORED_COLUMNS).repartition(blocks)
    # Small input batches: each row becomes one image per pass.
    decode_batch = max(1, int(batch_size // per_row))
    ds = ds.map_batches(
        preprocess_passes,
        fn_kwargs={
            "data_config": meta["data_config"],
            "passes": passes,
            "corrupt_paths": corrupt_paths,
            "max_pixels": max_pixels,
        },
        batch_size=decode_batch,
        num_cpus=1,
    )
    ds = ds.map_batches(
        ScorePasses,
        fn_constructor_args=(model_uri, use_gpu),
        batch_size=batch_size,
        num_cpus=0 if use_gpu else 1,
        num_gpus=1 if use_gpu else 0,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=_replicas(use_gpu, max_replicas)),
    )
    want_clean = any(p[0] == CLEAN for p in passes)
    total = int(rows * per_row) if want_clean else int(rows * (per_row - 1))
    clean_logits: dict[str, list[float]] = {}
    labels: dict[str, int] = {}
    preds: dict[str, dict[str, int]] = {pass_name(*p): {} for p in corrupted}
    with progress_bar(total, desc) as bar:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            cols = batch.to_pydict()
            for path, name, label, pred, logit in zip(
                cols["path"], cols["pass"], cols["label"], cols["pred"], cols["logits"], strict=True
            ):
                labels[path] = label
                if name == CLEAN:
                    clean_logits[path] = logit
                else:
                    preds[name][path] = pred
            bar.update(batch.num_rows)
    paths = sorted(labels)
    if want_clean and len(paths) != rows:
        raise RuntimeError(f"report: {split} has {rows} rows but the passes returned {len(paths)}")
    index = {p: i for i, p in enumerate(paths)}
    out = SplitResults(paths=paths, labels=np.asarray([labels[p] for p in paths], np.int64))
    if want_clean:
        out.logits = np.asarray([clean_logits[p] for p in paths], np.float32)
    if corrupted:
        sampled = sorted(corrupt_paths) if corrupt_paths is not None else paths
        out.corrupted_rows = np.asarray([index[p] for p in sampled], np.int64)
        for name, by_path in preds.items():
            out.corrupted[name] = np.asarray([by_path[p] for p in sampled], np.int64)
    logger.debug("report passes on %s/%s: %s", data_uri, split, json.dumps([pass_name(*p) for p in passes]))
    return out
