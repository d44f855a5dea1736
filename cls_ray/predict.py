"""Offline batch prediction from a model package, with exactly the preprocessing and forward pass of serving.

:class:`Predictor` is the one inference path: the Ray Serve model replicas call :meth:`Predictor.predict_batch`
and the HTTP ingress calls :func:`preprocess_image`, so an image gets the same probabilities whether it is sent to
the endpoint or scored here (up to float rounding between batch sizes).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import posixpath
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cls_ray import storage
from cls_ray.config import PredictConfig
from cls_ray.data.images import ImageDecodeError, decode_image
from cls_ray.data.transforms import ImageTransform, create_image_transform, normalize
from cls_ray.package import ModelPackage, load_model_package

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 64_000_000
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def preprocess_image(data: bytes, transform: ImageTransform, max_pixels: int) -> np.ndarray:
    """Decode untrusted image bytes and apply the model's eval transform: a uint8 CHW array.

    Raises:
        ImageDecodeError: the bytes are not a usable image (the ``reason`` says why).
    """
    image, _ = decode_image(data, max_pixels)
    try:
        return transform(image)
    except (ValueError, OSError, MemoryError, ZeroDivisionError, RuntimeError) as exc:  # RuntimeError: torch kernels
        # A decodable but degenerate image (e.g. one pixel wide after EXIF rotation) the resize cannot take.
        raise ImageDecodeError("unsupported", f"the image cannot be resized for the model: {exc}") from None


def top_k(probs: np.ndarray, classes: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
    """Per row of ``probs`` (N, C): the ``k`` most probable classes as ``{"label", "class", "probability"}``."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
        [{"label": int(i), "class": classes[int(i)], "probability": float(row[i])} for i in idx]
        for row, idx in zip(probs, order, strict=True)
    ]


class OnnxRuntimeModel:
    """An ONNX export (``cls-ray export``) on ONNX Runtime: normalised float32 NCHW in, logits out, as a torch model.

    Runs on the CUDA execution provider for a CUDA ``device`` where this onnxruntime build has it (the
    ``onnxruntime-gpu`` wheel), else on the CPU provider with as many threads as torch uses (Ray sets both from the
    replica's CPUs), so a replica's two backends compete for the same cores.

    Args:
        model: the bytes of an ``.onnx`` file with one input and the logits as its first output.
        device: the device asked for; see above.
    """

    def __init__(self, model: bytes, device: torch.device):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            else:
                logger.warning(
                    "this onnxruntime build has no CUDA execution provider (install onnxruntime-gpu): "
                    "the ONNX backend runs on the CPU"
                )
        self.session = ort.InferenceSession(model, sess_options=options, providers=providers)
        self.providers = self.session.get_providers()
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (logits, *_) = self.session.run(None, {self.input_name: x.detach().cpu().numpy()})
        return torch.from_numpy(logits)


class Predictor:
    """A loaded model package ready for inference: uint8 CHW images in, class probabilities out.

    Probabilities are calibrated by the temperature the package records (``calibration.temperature`` in
    ``model.json``, written by ``cls-ray report --calibrate``), so serving and batch prediction both use it.

    Backend, device, autocast and memory format are decided once here (for the torch backend: channels-last and
    bf16/fp16 autocast on CUDA, float32 on CPU), so :meth:`predict_batch` only calls the chosen forward. The onnx
    backend runs an ONNX export of the same package (:class:`OnnxRuntimeModel`) after the same preprocessing and
    normalisation, on the CPU (its inputs are handed to ONNX Runtime as host arrays).

    Args:
        package: a loaded model package (for the torch backend its model is moved to ``device``).
        device: ``"cpu"``, ``"cuda"`` or a torch device.
        amp: autocast dtype of the torch backend on CUDA: ``"bf16"``, ``"fp16"`` or ``"none"``.
        backend: ``"torch"`` (the package's weights) or ``"onnx"`` (``onnx_model`` on ONNX Runtime).
        onnx_model: the ONNX file's bytes, for the onnx backend (:meth:`from_uri` reads the package's recorded one).
    """

    def __init__(
        self,
        package: ModelPackage,
        device: str | torch.device = "cpu",
        amp: str = "bf16",
        backend: str = "torch",
        onnx_model: bytes | None = None,
    ):
        self.package = package
        self.backend = backend
        self.classes = list(package.classes)
        self.mean = list(package.data_config["mean"])
        self.std = list(package.data_config["std"])
        self.transform = create_image_transform(package.data_config)
        self.temperature = float(package.meta.get("calibration", {}).get("temperature", 1.0))
        if backend == "torch":
            self._init_torch(torch.device(device), amp)
        elif backend == "onnx":
            if onnx_model is None:
                raise ValueError(
                    "Predictor(backend='onnx') needs onnx_model, the bytes of the package's ONNX export "
                    "(Predictor.from_uri reads it from the package)"
                )
            self.device, self.memory_format = torch.device("cpu"), torch.contiguous_format
            self.model = OnnxRuntimeModel(onnx_model, torch.device(device))
            self._forward = self.model
        else:
            raise ValueError(f"unknown inference backend {backend!r}: use 'torch' or 'onnx'")

    def _init_torch(self, device: torch.device, amp: str) -> None:
        self.device = device
        on_cuda = device.type == "cuda"
        self.memory_format = torch.channels_last if on_cuda else torch.contiguous_format
        self.model = self.package.model.to(device, memory_format=self.memory_format).eval()
        autocast = (
            functools.partial(torch.autocast, "cuda", dtype=AMP_DTYPES[amp])
            if on_cuda and amp in AMP_DTYPES
            else contextlib.nullcontext
        )

        def forward(x: torch.Tensor) -> torch.Tensor:
            with autocast():
                return self.model(x)

        self._forward = forward

    @classmethod
    def from_uri(
        cls,
        model_uri: str,
        device: str | torch.device = "cpu",
        amp: str = "bf16",
        backend: str = "torch",
        precision: str = "fp32",
    ) -> Predictor:
        """Load the package at ``model_uri`` (local path or s3://) onto ``device``.

        For the onnx backend, the package's recorded ONNX export of ``precision`` (``"fp32"``, or ``"int8"`` from
        ``cls-ray export --int8``) is read and checked against the SHA-256 its ``model.json`` records.

        Raises:
            PackageError: no package there, or no such export recorded, or an export file that is not the recorded one.
        """
        package = load_model_package(model_uri, device="cpu")
        if backend != "onnx":
            if precision != "fp32":
                raise ValueError(
                    f"precision {precision!r} is for the onnx backend; the torch backend runs the "
                    f"package's weights (use amp for reduced precision on GPU)"
                )
            return cls(package, device=device, amp=amp, backend=backend)
        from cls_ray.package import read_recorded_export

        onnx_model = read_recorded_export(model_uri, package.meta, "onnx", precision)
        return cls(package, device=device, amp=amp, backend="onnx", onnx_model=onnx_model)

    def preprocess(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Image bytes -> uint8 CHW array, as the serving ingress does it."""
        return preprocess_image(data, self.transform, max_pixels)

    @torch.inference_mode()
    def logits_batch(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Raw float32 logits (N, C), on the CPU, of preprocessed uint8 CHW images (no temperature applied)."""
        batch = torch.from_numpy(np.stack(images)).to(self.device, non_blocking=True)
        x = normalize(batch, self.mean, self.std).contiguous(memory_format=self.memory_format)
        return self._forward(x).float().cpu()

    def predict_batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Class probabilities (N, C) float32 of preprocessed uint8 CHW images: the softmax of the logits divided
        by the package's calibrated temperature (:attr:`temperature`, 1 unless ``cls-ray report --calibrate``
        fitted one)."""
        return torch.softmax(self.logits_batch(images) / self.temperature, dim=1).numpy()

    def predict_bytes(
        self, images: Sequence[bytes], batch_size: int = 64, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> np.ndarray:
        """Probabilities (N, C) of encoded images; raises :class:`ImageDecodeError` on the first bad one."""
        arrays = [self.preprocess(data, max_pixels) for data in images]
        chunks = [self.predict_batch(arrays[i : i + batch_size]) for i in range(0, len(arrays), batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.classes)), np.float32)


def predict_files(
    model_uri: str,
    uris: Sequence[str],
    *,
    batch_size: int = 64,
    k: int = 5,
    device: str = "cpu",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[dict[str, Any]]:
    """Score image files (local paths or s3:// URIs) with a model package.

    Returns one dict per input, in order: ``{"path", "model", "top_k": [...], "probabilities": [...]}`` or, for a
    file that cannot be read or is not a usable image, ``{"path", "model", "error", "reason"}`` (``reason``
    ``unreadable`` for storage errors, else the decoder's reason); a bad file never stops the others. ``model`` is
    the package's ``{"name", "version"}``.
    """
    predictor = Predictor.from_uri(model_uri, device=device)
    k = max(1, min(k, len(predictor.classes)))
    model = {"name": predictor.package.name, "version": predictor.package.version}
    results: list[dict[str, Any]] = [{"path": uri, "model": model} for uri in uris]
    good: list[int] = []
    arrays: list[np.ndarray] = []
    for i, uri in enumerate(uris):
        try:
            arrays.append(predictor.preprocess(storage.read_bytes(uri), max_pixels))
            good.append(i)
        except storage.StorageError as exc:
            results[i].update(error=str(exc), reason="unreadable")
        except ImageDecodeError as exc:
            results[i].update(error=str(exc), reason=exc.reason)
    for start in range(0, len(arrays), batch_size):
        probs = predictor.predict_batch(arrays[start : start + batch_size])
        for i, row, best in zip(
            good[start : start + batch_size], probs, top_k(probs, predictor.classes, k), strict=True
        ):
            results[i].update(top_k=best, probabilities=row.tolist())
    logger.info("scored %d of %d files with %s", len(good), len(uris), model_uri)
    return results


# --------------------------------------------------------------------------------------------------------------
# cls-ray predict: batch scoring of a folder or bucket on Ray Data

SUMMARY_FILE = "_summary.json"
"""Written last into DEST: what was scored with which model; its presence says the output is complete."""
PART_PREFIX = "part-"


def list_inputs(src: str, extensions: Sequence[str] | None = None, max_workers: int = 16) -> list[str]:
    """Every file below ``src`` (local folder or ``s3://`` prefix, any depth) as a sorted list of URIs.

    Hidden files and folders (a name starting with ``.``) are left out. Each top-level folder is listed by its own
    thread (recursive listings of object-store prefixes are sequential pages; folders are natural partitions).

    Raises:
        StorageError: ``src`` cannot be listed (the message names it and what to check).
    """
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.fs as pafs

    root = storage.absolute(src).rstrip("/")
    fs, base = storage.resolve(root)
    try:
        top = fs.get_file_info(pafs.FileSelector(base, recursive=False, allow_not_found=False))
    except OSError as exc:
        raise storage.StorageError(storage.describe_error(src, exc)) from exc
    files = [i for i in top if i.type == pafs.FileType.File]
    folders = [i.path for i in top if i.type == pafs.FileType.Directory and not i.base_name.startswith(".")]

    def walk(path: str) -> list[pafs.FileInfo]:
        try:
            return fs.get_file_info(pafs.FileSelector(path, recursive=True))
        except OSError as exc:
            raise storage.StorageError(storage.describe_error(path, exc)) from exc

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        for infos in pool.map(walk, folders):
            files.extend(i for i in infos if i.type == pafs.FileType.File)
    wanted = tuple(e.lower() for e in extensions) if extensions else None
    prefix = "s3://" if storage.is_remote(root) else ""
    uris = []
    for info in files:
        relative = info.path[len(base) :].lstrip("/")
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        if wanted is None or info.path.lower().endswith(wanted):
            uris.append(prefix + info.path)
    return sorted(uris)


def plan_outputs(uris: Sequence[str], files_per_output: int, settings: str) -> dict[str, list[str]]:
    """Input URIs cut into output files: ``{part name: its URIs}`` in input order.

    A part's name holds a digest of its URIs and of ``settings`` (model version, backend, top-k, pixel limit), so
    a re-run over the same inputs with the same model finds the part it wrote and skips it, and any change names a
    new part.
    """
    parts: dict[str, list[str]] = {}
    for index, start in enumerate(range(0, len(uris), files_per_output)):
        chunk = list(uris[start : start + files_per_output])
        digest = hashlib.sha256("\n".join([settings, *chunk]).encode()).hexdigest()[:12]
        parts[f"{PART_PREFIX}{index:05d}-{digest}"] = chunk
    return parts


@functools.lru_cache(maxsize=4)
def _eval_transform(data_config_json: str) -> ImageTransform:
    return create_image_transform(json.loads(data_config_json))


def read_and_preprocess(
    batch: dict[str, np.ndarray], data_config: dict[str, Any], max_pixels: int
) -> dict[str, np.ndarray]:
    """Ray Data batch UDF: ``path`` URIs -> the serving preprocessing's uint8 CHW ``image`` and an ``error``.

    A file that cannot be read or is not a usable image gets a zero image and the reason in ``error``; nothing a
    file holds stops the batch.
    """
    transform = _eval_transform(json.dumps(data_config, sort_keys=True))
    channels, height, width = data_config["input_size"]
    paths = batch["path"]
    images = np.zeros((len(paths), channels, height, width), dtype=np.uint8)
    errors = np.full(len(paths), "", dtype=object)
    for i, uri in enumerate(paths):
        try:
            images[i] = preprocess_image(storage.read_bytes(uri), transform, max_pixels)
        except storage.StorageError as exc:
            errors[i] = f"unreadable: {exc}"
        except ImageDecodeError as exc:
            errors[i] = f"{exc.reason}: {exc}"
        except Exception as exc:  # noqa: BLE001 - one hostile file must never abort the job
            errors[i] = f"decoder_error: {type(exc).__name__}: {exc}"
    return {"path": paths, "part": batch["part"], "image": images, "error": errors}


class ScoreImages:
    """Ray Data actor UDF: one model replica (a :class:`Predictor`) turning preprocessed images into top-k rows."""

    def __init__(self, model_uri: str, top_k: int, backend: str, use_gpu: bool):
        kwargs = {"backend": backend} if backend != "torch" else {}
        self.predictor = Predictor.from_uri(model_uri, device="cuda" if use_gpu else "cpu", **kwargs)
        self.k = max(1, min(top_k, len(self.predictor.classes)))

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa

        ok = np.flatnonzero(batch["error"] == "")
        classes, probabilities = [None] * len(batch["path"]), [None] * len(batch["path"])
        if len(ok):
            probs = self.predictor.predict_batch(list(batch["image"][ok]))
            for i, best in zip(ok, top_k(probs, self.predictor.classes, self.k), strict=True):
                classes[i] = [b["class"] for b in best]
                probabilities[i] = [b["probability"] for b in best]
        errors = [e or None for e in batch["error"]]
        return pa.table(
            {
                "path": pa.array(list(batch["path"]), pa.string()),
                "part": pa.array(list(batch["part"]), pa.string()),
                "top_k_classes": pa.array(classes, pa.list_(pa.string())),
                "top_k_probabilities": pa.array(probabilities, pa.list_(pa.float32())),
                "error": pa.array(errors, pa.string()),
            }
        )


def _replica_count(cfg: PredictConfig) -> int:
    """Model replicas the cluster can hold (at least ``min_replicas``): one per GPU; on CPUs, as many as fit beside
    one decode task, or in all CPUs when decoding runs inside the replicas (Ray Data fuses the two stages when they
    ask for the same resources)."""
    import ray

    if cfg.max_replicas is not None:
        return cfg.max_replicas
    resources = ray.cluster_resources()
    if cfg.use_gpu:
        return max(cfg.min_replicas, int(resources.get("GPU", 0)))
    beside = 0.0 if cfg.decode_cpus == cfg.replica_cpus else cfg.decode_cpus
    return max(cfg.min_replicas, int((resources.get("CPU", 1) - beside) // cfg.replica_cpus))


def _part_bytes(rows: Any, fmt: str) -> bytes:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    out = pa.BufferOutputStream()
    if fmt == "parquet":
        pq.write_table(rows, out)
    else:  # CSV has no lists: "a;b;c"

        def joined(values, fmt_value):
            return pa.array(
                [None if v is None else ";".join(fmt_value(x) for x in v) for v in values.to_pylist()], pa.string()
            )

        rows = rows.set_column(
            rows.schema.get_field_index("top_k_classes"), "top_k_classes", joined(rows["top_k_classes"], str)
        )
        rows = rows.set_column(
            rows.schema.get_field_index("top_k_probabilities"),
            "top_k_probabilities",
            joined(rows["top_k_probabilities"], lambda x: f"{x:.6g}"),
        )
        pacsv.write_csv(rows, out)
    return out.getvalue().to_pybytes()


def _finish_part(rows: Any, order: list[str], model: dict[str, str]) -> Any:
    """A part's rows in input order, with the top-1 columns and the model that scored them."""
    import pyarrow as pa
    import pyarrow.compute as pc

    position = {uri: i for i, uri in enumerate(order)}
    rows = rows.drop_columns(["part"])
    rows = rows.take(pa.array(sorted(range(rows.num_rows), key=lambda i: position[rows["path"][i].as_py()])))
    return (
        rows.append_column("top_1", pc.list_element(rows["top_k_classes"], 0))
        .append_column("top_1_probability", pc.list_element(rows["top_k_probabilities"], 0))
        .append_column("model_name", pa.array([model["name"]] * rows.num_rows, pa.string()))
        .append_column("model_version", pa.array([model["version"]] * rows.num_rows, pa.string()))
    )


def predict(model_uri: str, src: str, dest: str, cfg: PredictConfig | None = None) -> dict[str, Any]:
    """``cls-ray predict``: score every file below ``src`` with a model package on Ray Data; results in ``dest``.

    Files are read and preprocessed in CPU tasks exactly as serving preprocesses them, scored by an autoscaling
    pool of model replicas (``predict.*``), and written as ``dest/part-NNNNN-DIGEST.parquet`` (or ``.csv``): one
    row per input file with ``path``, ``top_k_classes``, ``top_k_probabilities``, ``top_1``,
    ``top_1_probability``, ``error`` (why a file could not be scored; null otherwise), ``model_name`` and
    ``model_version``. Each output file is written whole once all its inputs are scored (atomically), a re-run
    skips output files already written, and ``dest/_summary.json`` is written last.

    Returns:
        The summary: input and output counts, files refused, the model, and where the outputs are.
    """
    from cls_ray.package import read_package_meta
    from cls_ray.ray_connect import ensure_ray

    cfg = cfg or PredictConfig()
    meta = read_package_meta(model_uri)
    model = {"name": meta["name"], "version": meta["version"]}
    uris = list_inputs(src, cfg.extensions)
    if not uris:
        raise storage.StorageError(
            f"{src}: no files to score" + (f" with extensions {cfg.extensions}" if cfg.extensions else "")
        )
    settings = f"{meta['version']}|{cfg.backend}|{cfg.top_k}|{cfg.max_pixels}"
    parts = plan_outputs(uris, cfg.files_per_output, settings)
    suffix = f".{cfg.format}"
    done = {posixpath.basename(i.path)[: -len(suffix)] for i in _existing_outputs(dest, suffix)}
    todo = {name: part for name, part in parts.items() if name not in done}
    logger.info(
        "predict: %d files in %d output files (%d already written) with %s version %s",
        len(uris),
        len(parts),
        len(parts) - len(todo),
        model["name"],
        model["version"],
    )
    timing = None
    if todo:
        ensure_ray()
        timing = _score_parts(model_uri, meta, todo, dest, suffix, model, cfg)
    for info in _existing_outputs(dest, suffix):  # outputs of an earlier SRC listing or model
        if posixpath.basename(info.path)[: -len(suffix)] not in parts:
            storage.delete(storage.join(dest, posixpath.basename(info.path)))
    summary = _summarise(dest, parts, suffix, model, model_uri, src, cfg)
    storage.write_json(storage.join(dest, SUMMARY_FILE), summary)
    summary["timing"] = timing  # this run's, not part of the written summary (a re-run that skips all has none)
    logger.info(
        "predict: scored %d of %d files (%d refused); results in %s",
        summary["scored"],
        summary["files"],
        summary["refused"],
        dest,
    )
    return summary


def _existing_outputs(dest: str, suffix: str) -> list:
    if not storage.exists(dest):
        return []
    return [
        i
        for i in storage.list_files(dest, recursive=False)
        if posixpath.basename(i.path).startswith(PART_PREFIX) and i.path.endswith(suffix)
    ]


def _score_parts(
    model_uri: str,
    meta: dict[str, Any],
    todo: dict[str, list[str]],
    dest: str,
    suffix: str,
    model: dict[str, str],
    cfg: PredictConfig,
) -> dict[str, float | None]:
    """Score the parts of ``todo`` and write each when complete; returns this run's timing (seconds to the first
    result, in all, and the images/s after the first result)."""
    import pyarrow as pa
    import ray

    from cls_ray.progress import bar as progress_bar

    names = [name for name, part in todo.items() for _ in part]
    paths = [uri for part in todo.values() for uri in part]
    ds = ray.data.from_arrow(pa.table({"path": paths, "part": names}))
    blocks = max(1, min(len(paths) // 16, 4 * int(ray.cluster_resources().get("CPU", 1))))
    ds = ds.repartition(blocks).map_batches(
        read_and_preprocess,
        fn_kwargs={"data_config": meta["data_config"], "max_pixels": cfg.max_pixels},
        batch_size=cfg.batch_size,
        num_cpus=cfg.decode_cpus,
    )
    ds = ds.map_batches(
        ScoreImages,
        fn_constructor_args=(model_uri, cfg.top_k, cfg.backend, cfg.use_gpu),
        batch_size=cfg.batch_size,
        num_cpus=cfg.replica_cpus,
        num_gpus=1 if cfg.use_gpu else 0,
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_replicas, max_size=_replica_count(cfg)),
    )
    pending: dict[str, list] = {name: [] for name in todo}
    counts = dict.fromkeys(todo, 0)
    start, first = time.perf_counter(), None
    with progress_bar(len(paths), "predict") as bar:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            first = first or (time.perf_counter(), batch.num_rows)
            for name in set(batch["part"].to_pylist()):
                rows = batch.filter(pa.compute.equal(batch["part"], name))
                pending[name].append(rows)
                counts[name] += rows.num_rows
                if counts[name] == len(todo[name]):
                    table = _finish_part(pa.concat_tables(pending.pop(name)), todo[name], model)
                    storage.write_bytes(storage.join(dest, name + suffix), _part_bytes(table, cfg.format))
            bar.update(batch.num_rows)
    if pending:
        raise RuntimeError(f"predict: output files {sorted(pending)[:3]} did not get all their rows")
    end = time.perf_counter()
    rate = (len(paths) - first[1]) / (end - first[0]) if end > first[0] and len(paths) > first[1] else None
    return {"scoring_s": end - start, "first_result_s": first[0] - start, "steady_images_per_s": rate}


def _read_part_errors(uri: str, fmt: str) -> list[str | None]:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    data = pa.BufferReader(storage.read_bytes(uri))
    if fmt == "parquet":
        return pq.read_table(data, columns=["error"])["error"].to_pylist()
    options = pacsv.ConvertOptions(
        include_columns=["error"], column_types={"error": pa.string()}, strings_can_be_null=True
    )
    return pacsv.read_csv(data, convert_options=options)["error"].to_pylist()


def _summarise(
    dest: str,
    parts: dict[str, list[str]],
    suffix: str,
    model: dict[str, str],
    model_uri: str,
    src: str,
    cfg: PredictConfig,
) -> dict[str, Any]:
    errors = [e for name in parts for e in _read_part_errors(storage.join(dest, name + suffix), cfg.format)]
    refused = [e for e in errors if e is not None]
    reasons: dict[str, int] = {}
    for e in refused:
        reasons[e.split(":", 1)[0]] = reasons.get(e.split(":", 1)[0], 0) + 1
    return {
        "source": src,
        "model": {**model, "uri": model_uri},
        "files": len(errors),
        "scored": len(errors) - len(refused),
        "refused": len(refused),
        "refused_by_reason": reasons,
        "dest": dest,
        "outputs": sorted(name + suffix for name in parts),
        "format": cfg.format,
        "backend": cfg.backend,
        "top_k": cfg.top_k,
    }


def read_predictions(dest: str) -> Any:
    """All rows ``cls-ray predict`` wrote to ``dest`` as one pyarrow Table, in input order.

    Raises:
        StorageError: ``dest`` holds no complete prediction output (no ``_summary.json``).
    """
    import pyarrow as pa

    summary_uri = storage.join(dest, SUMMARY_FILE)
    if not storage.exists(summary_uri):
        raise storage.StorageError(f"{dest}: no {SUMMARY_FILE}; cls-ray predict has not completed there")
    summary = {**storage.read_json(summary_uri), "dest": dest}
    return pa.concat_tables([read_predictions_part(summary, name) for name in summary["outputs"]])


def print_prediction_summary(summary: dict[str, Any], rows: int = 5) -> None:
    """The CLI's output: the first ``rows`` results, then counts and where the outputs are."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    outputs = summary["outputs"]
    if rows and outputs:
        first = read_predictions_part(summary, outputs[0])
        table = Table(title=f"first {min(rows, first.num_rows)} of {summary['files']} files")
        for column in ("path", "top_1", "top_1_probability", "error"):
            table.add_column(column, overflow="fold")
        for row in first.slice(0, rows).to_pylist():
            probability = row["top_1_probability"]
            table.add_row(
                str(row["path"]),
                str(row["top_1"] or ""),
                "" if probability is None else f"{probability:.4f}",
                str(row["error"] or ""),
            )
        console.print(table)
    model = summary["model"]
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary["refused_by_reason"].items()))
    console.print(
        f"scored {summary['scored']} of {summary['files']} files with {model['name']} version "
        f"{model['version']}; refused {summary['refused']}"
        + (f" ({reasons})" if reasons else "")
        + f"\nresults: {summary['dest']} ({len(outputs)} {summary['format']} file(s))",
        soft_wrap=True,
    )


def read_predictions_part(summary: dict[str, Any], name: str) -> Any:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    data = pa.BufferReader(storage.read_bytes(storage.join(summary["dest"], name)))
    return pq.read_table(data) if summary["format"] == "parquet" else pacsv.read_csv(data)
