"""``cls-ray export``: a model package as ONNX (fp32, or int8 by static quantisation) or TorchScript, each export
checked against the package before it is recorded.

An export is written into the package (or a copy of it) and recorded under ``exports`` in its ``model.json``: file,
format, opset, precision, SHA-256 and the parity figures it passed. Nothing is written before every export asked for
has passed its check, and ``model.json`` is written last, so a file not recorded there is not an export.

The check runs the export and the package on real images preprocessed exactly as serving does
(:func:`cls_ray.predict.preprocess_image`): the validation split of the dataset the package was trained on, or a
folder given as calibration data. It compares class probabilities (max absolute difference), top-1 agreement and
top-1 accuracy of both; fp32 exports must match within ``export.fp32_max_abs_diff``, int8 ones must lose at most
``export.int8_max_accuracy_drop`` top-1 accuracy, or the export is refused with the figures.

ONNX graphs come from ``torch.onnx.export(dynamo=True)`` (the ``torch.export`` based exporter, PyTorch's default and
supported path since 2.9; the TorchScript-based one is deprecated and warns that it will be removed). Its input
``input`` is a normalised float32 NCHW batch with a dynamic batch axis, its output ``logits``; ``metadata_props``
hold the package's name, version, architecture, class names and data config. TorchScript files (``torch.jit.trace``)
carry the same metadata as the extra file ``cls_ray.json``. int8 is ONNX Runtime's static quantisation in QDQ format
(per-channel int8 weights, uint8 activations, min-max calibration on the check's images).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cls_ray import storage
from cls_ray.config import ExportConfig
from cls_ray.data.transforms import normalize
from cls_ray.export_images import ParityImages, load_parity_images
from cls_ray.package import (
    META_FILE,
    ModelPackage,
    load_model_package,
    read_package_meta,
    update_package_meta,
)
from cls_ray.predict import Predictor

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
EXPORT_FILES = {
    ("onnx", "fp32"): "model.onnx",
    ("onnx", "int8"): "model.int8.onnx",
    ("torchscript", "fp32"): "model.ts",
}
INPUT_NAME, OUTPUT_NAME = "input", "logits"
ONNX_SIZE_LIMIT = 2**31 - 1  # protobuf's limit for a single-file ONNX model


class ExportError(ValueError):
    """An export failed its parity check, or cannot be made for this package."""


@dataclass
class Export:
    """An export made in memory: its file's bytes, how to run it, and (once checked) its record."""

    format: str
    precision: str
    data: bytes
    predict: Callable[[list[np.ndarray]], np.ndarray]
    """uint8 CHW images -> class probabilities, through the runtime the export is meant for."""
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def file(self) -> str:
        return EXPORT_FILES[(self.format, self.precision)]


def _metadata(meta: dict[str, Any]) -> dict[str, str]:
    """What a runtime needs to use an export without the package: strings, JSON where structured."""
    return {
        "name": meta["name"],
        "version": meta["version"],
        "architecture": meta["architecture"],
        "classes": json.dumps(list(meta["classes"])),
        "data_config": json.dumps(meta["data_config"]),
        "input": "float32 NCHW RGB, (pixel / 255 - mean) / std with data_config's mean and std",
        "output": "logits (softmax(logits / temperature) gives class probabilities, in the order of classes)",
        "temperature": str(float(meta.get("calibration", {}).get("temperature", 1.0))),
    }


@contextlib.contextmanager
def _quiet_exporters():
    """The ONNX exporter's console progress, optimiser INFO lines and deprecation warnings, out of the user's log."""
    names = ("onnxscript", "onnx_ir", "onnxruntime")
    levels = {name: logging.getLogger(name).level for name in names}
    with contextlib.redirect_stdout(io.StringIO()) as progress, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(deprecated|legacy).*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*(deprecated|legacy).*", category=DeprecationWarning)
        # Tracing warns where Python control flow reads tensor values; the parity check runs the traced module on
        # other images and batch sizes than the trace's, which is what would expose such a trace.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        for name in names:
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
            logger.debug("exporter output: %s", progress.getvalue())


def _example_input(package: ModelPackage) -> torch.Tensor:
    # Two images: a batch of one would let torch.export specialise the batch axis to 1.
    return torch.zeros(2, *package.data_config["input_size"])


def export_onnx(package: ModelPackage, opset: int) -> bytes:
    """The package's model as an ONNX file (see the module docstring for its input, output and metadata)."""
    import onnx

    batch = torch.export.Dim("batch")
    with _quiet_exporters():
        program = torch.onnx.export(
            package.model.cpu().eval(),
            (_example_input(package),),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    proto = program.model_proto
    onnx.helper.set_model_props(proto, _metadata(package.meta))
    proto.doc_string = f"cls-ray export of model package {package.name} version {package.version}"
    if proto.ByteSize() > ONNX_SIZE_LIMIT:
        raise ExportError(
            f"{package.meta['architecture']}: the ONNX model is over 2 GB, the limit of a single-file "
            f"ONNX model; export it with --format torchscript"
        )
    return proto.SerializeToString()


def export_torchscript(package: ModelPackage) -> bytes:
    """The package's model traced to a TorchScript archive, with the ONNX export's metadata as ``cls_ray.json``."""
    with _quiet_exporters():  # torch.jit warns it is deprecated: TorchScript is the format asked for
        traced = torch.jit.trace(package.model.cpu().eval(), _example_input(package))
        out = io.BytesIO()
        torch.jit.save(traced, out, _extra_files={"cls_ray.json": json.dumps(_metadata(package.meta))})
    return out.getvalue()


class _CalibrationReader:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over the check's images, ``batch_size`` at a time."""

    def __init__(self, images: ParityImages, data_config: dict[str, Any], batch_size: int):
        self.batches = iter(
            [
                {INPUT_NAME: _normalised(images.images[i : i + batch_size], data_config)}
                for i in range(0, len(images.images), batch_size)
            ]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def _normalised(images: np.ndarray, data_config: dict[str, Any]) -> np.ndarray:
    return normalize(torch.from_numpy(images), data_config["mean"], data_config["std"]).numpy()


def quantize_int8(fp32: bytes, images: ParityImages, data_config: dict[str, Any], cfg: ExportConfig) -> bytes:
    """Static int8 quantisation (QDQ) of an fp32 ONNX file, calibrated on ``images``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    with tempfile.TemporaryDirectory(prefix="cls-ray-int8-") as tmp, _quiet_exporters():
        paths = {name: os.path.join(tmp, f"{name}.onnx") for name in ("fp32", "prepared", "int8")}
        with open(paths["fp32"], "wb") as f:
            f.write(fp32)
        quant_pre_process(paths["fp32"], paths["prepared"])  # shape inference + graph optimisation, as ORT advises
        quantize_static(
            paths["prepared"],
            paths["int8"],
            _CalibrationReader(images, data_config, cfg.batch_size),
            quant_format=QuantFormat.QDQ,
            per_channel=cfg.int8_per_channel,
            reduce_range=cfg.int8_reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            # LayerNorm's scale is 1-D: per-channel along axis 0 (ORT's default axis 1 is out of range).
            extra_options={"QDQOpTypePerChannelSupportToAxis": {"LayerNormalization": 0}},
        )
        with open(paths["int8"], "rb") as f:
            return f.read()


def _torchscript_predict(
    data: bytes, data_config: dict[str, Any], temperature: float
) -> Callable[[list[np.ndarray]], np.ndarray]:
    with _quiet_exporters():  # our own bytes, made a moment ago in this process: nothing is loaded from storage
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")

    @torch.inference_mode()
    def predict(images: list[np.ndarray]) -> np.ndarray:
        x = normalize(torch.from_numpy(np.stack(images)), data_config["mean"], data_config["std"])
        return torch.softmax(module(x).float() / temperature, dim=1).numpy()

    return predict


def runner_temperature(package: ModelPackage) -> float:
    """The calibrated temperature the package records (1 without one): exports score as serving does."""
    return float(package.meta.get("calibration", {}).get("temperature", 1.0))


def make_export(package: ModelPackage, fmt: str, precision: str, data: bytes) -> Export:
    """An :class:`Export` of ``data`` (an export file's bytes) with the runtime serving would run it on."""
    if fmt == "onnx":
        runner = Predictor(package, backend="onnx", onnx_model=data)
        return Export(fmt, precision, data, runner.predict_batch)
    return Export(fmt, precision, data, _torchscript_predict(data, package.data_config, runner_temperature(package)))


# --------------------------------------------------------------------------------------------------------------
# The parity check


def probabilities(
    predict: Callable[[list[np.ndarray]], np.ndarray], images: np.ndarray, batch_size: int, desc: str = "parity"
) -> np.ndarray:
    """Class probabilities of every image: the first alone, then ``batch_size`` at a time (so a batch of one and a
    full batch, and usually a remainder, are all checked); a progress bar named ``desc`` counts the images."""
    from cls_ray.progress import bar

    starts = [0, *range(1, len(images), batch_size)] if len(images) > 1 else [0]
    ends = [*starts[1:], len(images)]
    out = []
    with bar(len(images), desc) as progress:
        for s, e in zip(starts, ends, strict=True):
            out.append(predict(list(images[s:e])))
            progress.update(e - s)
    return np.concatenate(out)


def parity_figures(reference: np.ndarray, exported: np.ndarray, images: ParityImages) -> dict[str, Any]:
    """Max abs difference of the probabilities, top-1 agreement, and top-1 accuracy of both (None without labels)."""
    top_ref, top_exp = reference.argmax(1), exported.argmax(1)
    figures: dict[str, Any] = {
        "images": len(reference),
        "source": images.source,
        "max_abs_diff": float(np.abs(reference - exported).max()),
        "top1_agreement": float((top_ref == top_exp).mean()),
        "top1_torch": None,
        "top1_export": None,
    }
    if images.labels is not None:
        figures["top1_torch"] = float((top_ref == images.labels).mean())
        figures["top1_export"] = float((top_exp == images.labels).mean())
    return figures


def accuracy_drop(figures: dict[str, Any]) -> float:
    """Top-1 accuracy lost by the export; without labels, the share of images whose top-1 changed (an upper
    bound of the accuracy it can lose)."""
    if figures["top1_torch"] is None:
        return 1.0 - figures["top1_agreement"]
    return figures["top1_torch"] - figures["top1_export"]


def describe_figures(figures: dict[str, Any]) -> str:
    accuracy = (
        f"top-1 accuracy {figures['top1_torch']:.4f} PyTorch vs {figures['top1_export']:.4f} export"
        if figures["top1_torch"] is not None
        else "no labels, so no accuracy"
    )
    return (
        f"max abs difference of probabilities {figures['max_abs_diff']:.3g}, top-1 agreement "
        f"{figures['top1_agreement']:.4f}, {accuracy} ({figures['images']} images of {figures['source']})"
    )


def check_parity(
    export: Export, reference: np.ndarray, images: ParityImages, cfg: ExportConfig, architecture: str
) -> dict[str, Any]:
    """Run ``export`` on the images and compare it with the package's ``reference`` probabilities.

    Returns:
        The parity figures (see :func:`parity_figures`).

    Raises:
        ExportError: the export is not within the tolerance of its precision; the message holds the figures.
    """
    exported = probabilities(
        export.predict, images.images, cfg.batch_size, f"parity {export.format} {export.precision}"
    )
    figures = parity_figures(reference, exported, images)
    if export.precision == "fp32" and not figures["max_abs_diff"] <= cfg.fp32_max_abs_diff:  # NaN fails too
        raise ExportError(
            f"{export.file} failed the parity check and was not recorded: {describe_figures(figures)}; "
            f"fp32 must be within {cfg.fp32_max_abs_diff:g} (export.fp32_max_abs_diff)"
        )
    drop = accuracy_drop(figures)
    figures["accuracy_drop"] = drop
    if export.precision == "int8" and not drop <= cfg.int8_max_accuracy_drop:
        raise ExportError(
            f"{export.file} refused: {architecture} does not quantise well with ONNX Runtime's static "
            f"int8 quantisation (QDQ, min-max calibration): it loses {drop:.4f} top-1 "
            f"{'accuracy' if figures['top1_torch'] is not None else 'agreement'}, more than "
            f"export.int8_max_accuracy_drop={cfg.int8_max_accuracy_drop:g} "
            f"({describe_figures(figures)}); ship the fp32 export instead"
        )
    logger.info("%s passed the parity check: %s", export.file, describe_figures(figures))
    return figures


def compare_latency(exports: list[Export], images: np.ndarray, cfg: ExportConfig) -> dict[str, dict[str, float]]:
    """Median milliseconds per forward pass of each export at batch 1 and ``cfg.batch_size``, on the CPU.

    The exports take turns run by run, so load from anything else on the machine falls on all of them alike.
    """
    result: dict[str, dict[str, float]] = {}
    for batch_size in sorted({1, cfg.batch_size}):
        batch = list(np.resize(images, (batch_size, *images.shape[1:])))
        times: dict[str, list[float]] = {e.precision: [] for e in exports}
        for export in exports:  # warm-up: first runs allocate and pick kernels
            export.predict(batch)
        for _ in range(cfg.latency_runs):
            for export in exports:
                start = time.perf_counter()
                export.predict(batch)
                times[export.precision].append(1000 * (time.perf_counter() - start))
        result[f"batch_{batch_size}"] = {p: float(np.median(t)) for p, t in times.items()}
    return result


# --------------------------------------------------------------------------------------------------------------
# Recording


def _base_record(export: Export, meta: dict[str, Any], cfg: ExportConfig) -> dict[str, Any]:
    record = {
        "file": export.file,
        "format": export.format,
        "precision": export.precision,
        "sha256": hashlib.sha256(export.data).hexdigest(),
        "bytes": len(export.data),
        "package_version": meta["version"],
        "torch": torch.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if export.format == "onnx":
        record.update(opset=cfg.opset, input=INPUT_NAME, output=OUTPUT_NAME, exporter="torch.onnx.export(dynamo=True)")
    else:
        record.update(opset=None, exporter="torch.jit.trace")
    return record


def _copy_package(src: str, dest: str) -> None:
    """Every file of the package at ``src`` but ``model.json`` (written last, by the caller) into ``dest``."""
    if storage.exists(storage.join(dest, META_FILE)):
        raise ExportError(
            f"--output {dest} is a model package already; choose a new location, or export into {dest} itself"
        )
    fs, base = storage.resolve(src)
    for info in storage.list_files(src):
        relative = info.path[len(base) :].lstrip("/")
        if relative != META_FILE:
            storage.copy_file(storage.join(src, *relative.split("/")), storage.join(dest, *relative.split("/")))


def record_exports(model_uri: str, exports: list[Export], output_uri: str | None = None) -> str:
    """Write checked exports into the package (or a copy at ``output_uri``), then its ``model.json`` (last, one
    write): every earlier record of the same file is replaced. Returns the package URI written."""
    meta = read_package_meta(model_uri)
    target = output_uri or model_uri
    if output_uri and storage.absolute(output_uri) != storage.absolute(model_uri):
        _copy_package(model_uri, output_uri)
    for export in exports:
        storage.write_bytes(storage.join(target, export.file), export.data)
    written = {e.file for e in exports}
    records = [e for e in meta.get("exports", []) if e["file"] not in written] + [e.record for e in exports]
    # The stored JSON plus the records: a format-1 package keeps deriving its name and version when read.
    update_package_meta(model_uri, {"exports": records}, target_uri=target)
    logger.info("recorded %s in %s", ", ".join(sorted(written)), storage.join(target, META_FILE))
    return target


def export_package(
    model_uri: str,
    format: str = "onnx",
    int8: bool = False,
    output_uri: str | None = None,
    calibration_data: str | None = None,
    cfg: ExportConfig | None = None,
) -> list[dict[str, Any]]:
    """Export a model package, check every export against it, and record those that pass.

    Args:
        model_uri: the package (local path or s3://).
        format: ``"onnx"`` or ``"torchscript"``.
        int8: with ONNX, also a static int8 export, compared with the fp32 one in accuracy, size and CPU latency.
        output_uri: write into a copy of the package there instead of into the package.
        calibration_data: a folder of images (class folders named like the package's classes give accuracies) to
            check and calibrate on instead of the validation split of the package's dataset.
        cfg: the ``export`` config section.

    Returns:
        The records written to ``model.json`` (one per file), parity figures included.

    Raises:
        ExportError: an export failed its check (nothing is written then), or the arguments do not fit.
    """
    cfg = cfg or ExportConfig()
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}: use {' or '.join(FORMATS)}")
    if int8 and format != "onnx":
        raise ExportError("--int8 quantises the ONNX export: use it with --format onnx")
    package = load_model_package(model_uri, device="cpu")
    images = load_parity_images(package, calibration_data, cfg.max_images, cfg.max_pixels)
    reference = probabilities(Predictor(package).predict_batch, images.images, cfg.batch_size, "parity torch")
    data = export_onnx(package, cfg.opset) if format == "onnx" else export_torchscript(package)
    exports = [make_export(package, format, "fp32", data)]
    if int8:
        exports.append(make_export(package, "onnx", "int8", quantize_int8(data, images, package.data_config, cfg)))
    architecture = package.meta["architecture"]
    for export in exports:
        export.record = {
            **_base_record(export, package.meta, cfg),
            "parity": check_parity(export, reference, images, cfg, architecture),
        }
    if int8:
        exports[1].record["vs_fp32"] = _int8_comparison(exports, images, cfg)
    record_exports(model_uri, exports, output_uri)
    return [e.record for e in exports]


def _int8_comparison(exports: list[Export], images: ParityImages, cfg: ExportConfig) -> dict[str, Any]:
    fp32, int8 = (e.record for e in exports)
    comparison: dict[str, Any] = {
        "bytes_fp32": fp32["bytes"],
        "bytes_int8": int8["bytes"],
        "size_ratio": int8["bytes"] / fp32["bytes"],
        "latency_ms": compare_latency(exports, images.images, cfg),
        "threads": torch.get_num_threads(),
    }
    if fp32["parity"]["top1_export"] is not None:
        comparison["accuracy_drop"] = fp32["parity"]["top1_export"] - int8["parity"]["top1_export"]
    else:
        comparison["top1_agreement_drop"] = fp32["parity"]["top1_agreement"] - int8["parity"]["top1_agreement"]
    return comparison


def print_exports(records: list[dict[str, Any]], target: str) -> None:
    """Print the parity figures of each export (and the int8-vs-fp32 comparison): the CLI's output."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"exports recorded in {target}")
    table.add_column("file", no_wrap=True)
    for column in ("precision", "max abs diff", "top-1 agree", "top-1 torch", "top-1 export", "MB"):
        table.add_column(column, justify="right")
    for r in records:
        p = r["parity"]
        table.add_row(
            r["file"],
            r["precision"],
            f"{p['max_abs_diff']:.2e}",
            f"{p['top1_agreement']:.4f}",
            "-" if p["top1_torch"] is None else f"{p['top1_torch']:.4f}",
            "-" if p["top1_export"] is None else f"{p['top1_export']:.4f}",
            f"{r['bytes'] / 1e6:.2f}",
        )
    console = Console()
    console.print(table)
    console.print(f"checked on {records[0]['parity']['images']} images of {records[0]['parity']['source']}")
    comparison = records[-1].get("vs_fp32")
    if comparison:
        for batch, ms in comparison["latency_ms"].items():
            console.print(
                f"CPU latency {batch.replace('_', ' ')} ({comparison['threads']} threads): fp32 "
                f"{ms['fp32']:.2f} ms, int8 {ms['int8']:.2f} ms ({ms['fp32'] / ms['int8']:.2f}x)"
            )
        console.print(
            f"int8 size {comparison['size_ratio']:.2f}x of fp32"
            + (f", top-1 accuracy drop {comparison['accuracy_drop']:+.4f}" if "accuracy_drop" in comparison else "")
        )
