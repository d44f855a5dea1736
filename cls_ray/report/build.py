"""Compute the model report of a package on one split of a dataset and write ``report.html``, ``report.json`` and
the package's ``MODEL_CARD.md``.

The clean pass gives the metrics through the same :class:`ClassificationMetrics` as ``cls-ray evaluate`` and the
same decoder and eval transform, so the report's clean top-1 is evaluate's. Every other number is derived from the
per-image results of :func:`cls_ray.report.passes.run_passes`. Nothing is written until everything is computed:
an error (classes that differ, a missing split, unreachable storage) leaves no report behind, and ``report.json``,
written last, marks a complete report.
"""

from __future__ import annotations

import base64
import io
import logging
import posixpath
import time
from typing import Any

import numpy as np
import torch

from cls_ray import storage
from cls_ray.config import ReportConfig
from cls_ray.data import manifest as manifest_lib
from cls_ray.package import PackageError, read_package_meta, update_package_meta
from cls_ray.report import stats
from cls_ray.report.corruptions import CORRUPTIONS
from cls_ray.report.passes import CLEAN, SplitResults, pass_name, run_passes

logger = logging.getLogger(__name__)

REPORT_FORMAT_VERSION = 1
REPORT_JSON, REPORT_HTML, MODEL_CARD = "report.json", "report.html", "MODEL_CARD.md"


class ReportError(ValueError):
    """The report cannot be made for these inputs (the message says what and where)."""


# --------------------------------------------------------------------------------------------------------------
# inputs


def _check_inputs(model_uri: str, data_uri: str, split: str) -> tuple[dict[str, Any], dict[str, Any]]:
    meta = read_package_meta(model_uri)
    manifest = manifest_lib.read_manifest(data_uri)
    if list(manifest["classes"]) != list(meta["classes"]):
        raise PackageError(
            f"{model_uri} predicts classes {meta['classes'][:5]}... but {data_uri} has "
            f"{manifest['classes'][:5]}...; report on a dataset with the same classes in the same order"
        )
    if split not in manifest.get("splits", {}) or not manifest["splits"][split].get("num_rows"):
        raise ReportError(
            f"{data_uri} has no split {split!r} with images (splits: {', '.join(sorted(manifest.get('splits', {})))})"
        )
    return meta, manifest


def _robustness_sample(paths: list[str], labels: dict[str, int], limit: int | None, seed: int) -> set[str] | None:
    """A seeded sample of ``limit`` paths stratified by class (None: every path)."""
    if limit is None or limit >= len(paths):
        return None
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[str]] = {}
    for p in sorted(paths):
        by_class.setdefault(labels[p], []).append(p)
    chosen: list[str] = []
    for label in sorted(by_class):
        members = by_class[label]
        take = max(1, round(limit * len(members) / len(paths)))
        chosen += list(rng.choice(members, size=min(take, len(members)), replace=False))
    return set(chosen)


def _split_paths_and_labels(
    data_uri: str, manifest: dict[str, Any], split: str
) -> tuple[dict[str, int], dict[str, str] | None]:
    """``({path: label}, {path: group} or None)`` of a split; groups from the shards' ``group`` column, None when
    the dataset was ingested without groups (or before the column existed)."""
    import pyarrow.parquet as pq

    labels: dict[str, int] = {}
    groups: dict[str, str] = {}
    for uri in manifest_lib.split_shard_uris(data_uri, manifest, split):
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            columns = ["path", "label"] + (["group"] if "group" in pf.schema_arrow.names else [])
            table = pf.read(columns=columns)
        paths = table["path"].to_pylist()
        labels.update(zip(paths, table["label"].to_pylist(), strict=True))
        if "group" in columns:
            groups.update((p, g) for p, g in zip(paths, table["group"].to_pylist(), strict=True) if g is not None)
    return labels, groups or None


def _read_images(data_uri: str, manifest: dict[str, Any], split: str, paths: set[str]) -> dict[str, bytes]:
    """The stored bytes of ``paths`` of ``split``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out: dict[str, bytes] = {}
    wanted = list(paths)
    for uri in manifest_lib.split_shard_uris(data_uri, manifest, split):
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            table = pq.read_table(f, columns=["path", "image"])
        table = table.filter(pc.is_in(table["path"], value_set=pa.array(wanted, pa.string())))
        out.update(zip(table["path"].to_pylist(), table["image"].to_pylist(), strict=True))
    return out


# --------------------------------------------------------------------------------------------------------------
# pictures


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _thumb(image_hwc: np.ndarray, size: int) -> str:
    from PIL import Image

    img = Image.fromarray(image_hwc)
    img = img.resize((size, max(1, round(size * img.height / img.width))), Image.Resampling.NEAREST)
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def _curves_png(history: list[dict[str, Any]]) -> str | None:
    epochs = [r["epoch"] for r in history]
    if not epochs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for key, label in (("train_loss", "train loss"), ("val_loss", "validation loss")):
        pts = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        if pts:
            axes[0].plot(*zip(*pts, strict=True), marker="o", label=label)
    axes[0].set_title("loss")
    axes[0].legend()
    pts = [(r["epoch"], r["val_top1"]) for r in history if r.get("val_top1") is not None and r.get("evaluated", True)]
    if pts:
        axes[1].plot(*zip(*pts, strict=True), marker="o", color="tab:green")
    axes[1].set_title("validation top-1")
    pts = [(r["epoch"], r["lr"]) for r in history if r.get("lr") is not None]
    if pts:
        axes[2].plot(*zip(*pts, strict=True), marker="o", color="tab:purple")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return _png(fig)


def _confusion_pngs(matrix: list[list[int]], classes: list[str]) -> tuple[str, str]:
    from cls_ray.evaluate import confusion_figure

    return (
        _png(confusion_figure(matrix, classes, "counts", show="counts")),
        _png(confusion_figure(matrix, classes, "share of the true class", show="rates")),
    )


def _robustness_png(rows: list[dict[str, Any]], clean: float) -> str | None:
    if not rows:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    for name in dict.fromkeys(r["corruption"] for r in rows):
        pts = sorted((r["severity"], r["top1"], r["relative_drop"]) for r in rows if r["corruption"] == name)
        sev = [0] + [p[0] for p in pts]
        axes[0].plot(sev, [clean] + [p[1] for p in pts], marker="o", label=name)
        axes[1].plot(sev, [0.0] + [100 * p[2] for p in pts], marker="o", label=name)
    axes[0].set_title("top-1 by severity")
    axes[1].set_title("relative drop (%)")
    for ax in axes:
        ax.set_xlabel("severity")
        ax.set_xticks(range(0, max(r["severity"] for r in rows) + 1))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    return _png(fig)


def _reliability_png(calibration: dict[str, Any], temperature: float) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for ax, key, title in (
        (axes[0], "reliability_before", f"before (ECE {calibration['ece_before']:.3f})"),
        (axes[1], "reliability_after", f"T = {temperature:.2f} (ECE {calibration['ece_after']:.3f})"),
    ):
        bars = calibration[key]
        centers = [(b["low"] + b["high"]) / 2 for b in bars]
        acc = [b["accuracy"] or 0.0 for b in bars]
        ax.bar(centers, acc, width=1.0 / len(bars), edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.set_xlabel("confidence")
        ax.set_title(title)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7, loc="upper left")
    return _png(fig)


# --------------------------------------------------------------------------------------------------------------
# sections


def _summary(meta: dict[str, Any], manifest: dict[str, Any], model_uri: str, data_uri: str) -> dict[str, Any]:
    from safetensors.torch import load as load_safetensors

    weights = storage.read_bytes(storage.join(model_uri, "model.safetensors"))
    parameters = int(sum(t.numel() for t in load_safetensors(weights).values() if t.is_floating_point()))
    model_cfg = meta.get("train_config", {}).get("model", {})
    return {
        "name": meta["name"],
        "version": meta["version"],
        "architecture": meta["architecture"],
        "input_size": list(meta["data_config"]["input_size"]),
        "parameters": parameters,
        "training_mode": model_cfg.get("mode", "scratch"),
        "pretrained": model_cfg.get("pretrained"),
        "weights": meta.get("weights", "raw"),
        "dataset": data_uri,
        "classes": list(meta["classes"]),
        "split_sizes": {k: int(v.get("num_rows", 0)) for k, v in manifest.get("splits", {}).items()},
    }


def _history(meta: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    from cls_ray.train.history import read_history

    checkpoint = meta.get("checkpoint")
    if not checkpoint:
        return [], "the package records no training run (no checkpoint in model.json)"
    run = posixpath.dirname(str(checkpoint).rstrip("/"))
    try:
        history = read_history(run)
    except storage.StorageError as exc:
        return [], f"the training run's history could not be read: {exc}"
    if not history:
        return [], f"the training run {run} has no history records"
    keep = ("epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "evaluated", "images_per_s")
    return [{k: r.get(k) for k in keep if k in r} for r in history], None


def _confused_pairs(matrix: list[list[int]], classes: list[str], limit: int = 10) -> list[dict[str, Any]]:
    cm = np.asarray(matrix)
    support = cm.sum(axis=1)
    pairs = [
        {"true": classes[i], "predicted": classes[j], "count": int(cm[i, j]), "share": float(cm[i, j] / support[i])}
        for i in range(len(classes))
        for j in range(len(classes))
        if i != j and cm[i, j] > 0
    ]
    return sorted(pairs, key=lambda p: (-p["count"], p["true"], p["predicted"]))[:limit]


def _group_of(path: str, group: str | None) -> str | None:
    if group is not None:
        return group
    parts = path.split("/")
    return parts[1] if len(parts) > 2 else None


def _slices(
    results: SplitResults, preds: np.ndarray, groups: dict[str, str] | None, cfg: ReportConfig, overall: float
) -> dict[str, Any]:
    keys = [_group_of(p, (groups or {}).get(p)) for p in results.paths]
    if all(k is None for k in keys):
        return {
            "source": None,
            "note": "this dataset has no groups: its images sit directly in their class folders and it records no "
            "group column (ingest.group_by); put images in sub-folders per source (class/source/image.jpg) to get "
            "per-source metrics",
            "groups": [],
        }
    correct = preds == results.labels
    rows = []
    for key in sorted({k for k in keys if k is not None}):
        mask = np.asarray([k == key for k in keys])
        n = int(mask.sum())
        top1 = float(correct[mask].mean())
        rows.append(
            {
                "group": key,
                "images": n,
                "top1": top1,
                "flagged": n >= cfg.slice_min_images and top1 < overall - cfg.slice_flag_drop,
            }
        )
    return {
        "source": "group column" if groups else "first folder below the class",
        "note": None,
        "groups": sorted(rows, key=lambda r: r["top1"]),
    }


def _robustness(results: SplitResults, preds: np.ndarray, cfg: ReportConfig, classes: list[str]) -> dict[str, Any]:
    if not results.corrupted:
        return {"images": 0, "clean_top1": None, "rows": [], "classes": []}
    rows_idx = results.corrupted_rows
    labels = results.labels[rows_idx]
    clean_correct = preds[rows_idx] == labels
    clean = float(clean_correct.mean())
    rows = []
    class_drop = np.zeros(len(classes))
    class_count = np.zeros(len(classes))
    for name in cfg.corruptions:
        for severity in cfg.severities:
            corrupted = results.corrupted.get(pass_name(name, severity))
            if corrupted is None:
                continue
            correct = corrupted == labels
            top1 = float(correct.mean())
            rows.append(
                {
                    "corruption": name,
                    "severity": severity,
                    "parameter": CORRUPTIONS[name][1][severity - 1] if severity else None,
                    "top1": top1,
                    "drop": clean - top1,
                    "relative_drop": (clean - top1) / clean if clean > 0 else 0.0,
                }
            )
            for c in range(len(classes)):
                mask = labels == c
                if mask.any():
                    class_drop[c] += clean_correct[mask].mean() - correct[mask].mean()
                    class_count[c] += 1
    mean_drop = np.divide(class_drop, class_count, out=np.zeros_like(class_drop), where=class_count > 0)
    worst = [
        {"class": classes[c], "mean_drop": float(mean_drop[c])}
        for c in np.argsort(-mean_drop, kind="stable")[: min(5, len(classes))]
        if class_count[c] > 0
    ]
    return {
        "images": int(len(rows_idx)),
        "clean_top1": clean,
        "rows": rows,
        "classes": worst,
        "descriptions": {n: CORRUPTIONS[n][0] for n in cfg.corruptions},
    }


def _label_issues(results: SplitResults, meta: dict[str, Any], cfg: ReportConfig, num_classes: int) -> dict[str, Any]:
    """The likely label errors of the split (cleanlab, as ``cls-ray audit``): their count, and the rows of the
    ``cfg.label_issues`` most likely with their label quality scores; a note instead when it cannot run."""
    out: dict[str, Any] = {"count": None, "note": None, "rows": [], "quality": []}
    if not cfg.label_issues:
        out["note"] = "report.label_issues is 0"
        return out
    if len(np.unique(results.labels)) < num_classes:
        out["note"] = "this split lacks some classes; confident learning needs every class present"
        return out
    from cls_ray.audit import label_issues

    temperature = float(meta.get("calibration", {}).get("temperature", 1.0))
    ranked, scores = label_issues(results.labels, stats.softmax(results.logits, temperature))
    out["count"] = len(ranked)
    out["rows"] = [int(i) for i in ranked[: cfg.label_issues]]
    out["quality"] = [float(scores[i]) for i in out["rows"]]
    return out


def _gradcam_task(model_uri: str, images: np.ndarray, targets: list[int], use_gpu: bool) -> dict[str, Any]:
    from cls_ray.package import load_model_package
    from cls_ray.report.gradcam import GradCamUnsupported, grad_cam

    package = load_model_package(model_uri, device="cuda" if use_gpu else "cpu")
    try:
        layer, maps = grad_cam(package.model, images, targets, package.data_config["mean"], package.data_config["std"])
    except GradCamUnsupported as exc:
        return {"error": str(exc), "layer": None, "maps": None}
    return {"error": None, "layer": layer, "maps": maps}


# --------------------------------------------------------------------------------------------------------------
# the report


def build_report(
    model_uri: str,
    data_uri: str,
    split: str = "test",
    output_dir: str | None = None,
    cfg: ReportConfig | None = None,
    calibrate: bool = False,
) -> dict[str, Any]:
    """Compute the report of ``model_uri`` on ``split`` of ``data_uri`` and write it (see the module docstring).

    Returns the report (``report.json``'s content) with ``output_dir``, ``html`` and ``model_card`` URIs added.
    """
    from cls_ray.metrics import ClassificationMetrics
    from cls_ray.ray_connect import ensure_ray

    cfg = cfg or ReportConfig()
    started = time.perf_counter()
    output_dir = output_dir or storage.join(model_uri, f"report-{split}")
    meta, manifest = _check_inputs(model_uri, data_uri, split)
    classes = list(meta["classes"])
    labels_by_path, groups = _split_paths_and_labels(data_uri, manifest, split)
    sample = _robustness_sample(list(labels_by_path), labels_by_path, cfg.robustness_max_images, cfg.seed)
    ensure_ray()
    common = {"batch_size": cfg.batch_size, "use_gpu": cfg.use_gpu, "max_replicas": cfg.max_replicas}
    passes = [(CLEAN, 0)] + [(n, s) for n in cfg.corruptions for s in cfg.severities]
    # Severity 0 of a corruption is its own pass: the identity, through the corruption path.
    results = run_passes(
        model_uri, data_uri, manifest, split, passes, corrupt_paths=sample, desc=f"report {split}", **common
    )
    cal_split = "val" if split != "val" and manifest["splits"].get("val", {}).get("num_rows") else split
    if cal_split == split:
        cal_labels, cal_logits = results.labels, results.logits
    else:
        cal = run_passes(model_uri, data_uri, manifest, cal_split, [(CLEAN, 0)], desc=f"report {cal_split}", **common)
        cal_labels, cal_logits = cal.labels, cal.logits

    # metrics: the same code as cls-ray evaluate
    metrics = ClassificationMetrics(len(classes))
    logits_t = torch.from_numpy(results.logits)
    metrics.update(logits_t, torch.from_numpy(results.labels))
    scalars, details = metrics.compute()
    intervals = stats.bootstrap_intervals(
        results.labels, results.logits, resamples=cfg.bootstrap_resamples, seed=cfg.seed
    )
    preds = results.logits.argmax(axis=1)
    probs = stats.softmax(results.logits)
    losses = torch.nn.functional.cross_entropy(logits_t, torch.from_numpy(results.labels), reduction="none").numpy()

    # calibration
    temperature = stats.fit_temperature(cal_logits, cal_labels)
    calibration = {
        "temperature": temperature,
        "fitted_on": cal_split,
        "note": stats.temperature_note(temperature, cal_logits, cal_labels),
        **stats.calibration_summary(results.logits, results.labels, temperature, cfg.calibration_bins),
    }

    # top losses, gallery, Grad-CAM sample
    wrong = np.flatnonzero(preds != results.labels)
    top = wrong[np.argsort(-losses[wrong], kind="stable")][: cfg.top_losses]
    gallery: dict[str, dict[str, list[int]]] = {}
    cam_rows: list[int] = list(top)
    for c in range(len(classes)):
        members = np.flatnonzero(results.labels == c)
        ok = members[preds[members] == c]
        bad = members[preds[members] != c]
        ok = ok[np.argsort(-probs[ok, c], kind="stable")]
        bad = bad[np.argsort(-losses[bad], kind="stable")]
        gallery[classes[c]] = {
            "correct": list(ok[: cfg.gallery_per_class]),
            "wrong": list(bad[: cfg.gallery_per_class]),
        }
        cam_rows += list(ok[: cfg.gradcam_per_class])
    cam_rows = list(dict.fromkeys(int(i) for i in cam_rows))[: cfg.gradcam_max_images]
    issues = _label_issues(results, meta, cfg, len(classes))
    shown = sorted(
        {int(i) for i in top}
        | {int(i) for g in gallery.values() for v in g.values() for i in v}
        | set(cam_rows)
        | set(issues["rows"])
    )
    raw = _read_images(data_uri, manifest, split, {results.paths[i] for i in shown})
    from cls_ray.report.passes import CorruptAndPreprocess

    prep = CorruptAndPreprocess(meta["data_config"], [(CLEAN, 0)], None)
    pixels: dict[int, np.ndarray] = {}
    if shown:
        batch = prep(
            {
                "image": np.asarray([raw[results.paths[i]] for i in shown], dtype=object),
                "label": results.labels[shown],
                "path": np.asarray([results.paths[i] for i in shown], dtype=object),
            }
        )
        pixels = {i: img for i, img in zip(shown, batch["image"], strict=True)}
    gradcam: dict[str, Any] = {"layer": None, "error": None, "images": []}
    cams: dict[int, str] = {}
    if cam_rows:
        import ray

        task = ray.remote(_gradcam_task).options(num_cpus=1, num_gpus=1 if cfg.use_gpu else 0)
        images = np.stack([pixels[i] for i in cam_rows])
        out = ray.get(task.remote(model_uri, images, [int(preds[i]) for i in cam_rows], cfg.use_gpu))
        gradcam.update(layer=out["layer"], error=out["error"])
        if out["maps"] is not None:
            from cls_ray.report.gradcam import overlay

            for i, heat in zip(cam_rows, out["maps"], strict=True):
                cams[i] = _thumb(overlay(pixels[i], heat), cfg.thumbnail_size)
                gradcam["images"].append(
                    {"path": results.paths[i], "target": classes[int(preds[i])], "top_loss": bool(i in set(top))}
                )

    def item(i: int) -> dict[str, Any]:
        i = int(i)
        return {
            "path": results.paths[i],
            "true": classes[int(results.labels[i])],
            "predicted": classes[int(preds[i])],
            "probability": float(probs[i, preds[i]]),
            "true_probability": float(probs[i, results.labels[i]]),
            "loss": float(losses[i]),
            "thumbnail": _thumb(pixels[i].transpose(1, 2, 0), cfg.thumbnail_size) if i in pixels else None,
            "gradcam": cams.get(i),
        }

    history, history_note = _history(meta)
    confusion = details["confusion_matrix"]
    per_class = [{"class": c, **r} for c, r in zip(classes, details["per_class"], strict=True)]
    robustness = _robustness(results, preds, cfg, classes)
    report = {
        "format_version": REPORT_FORMAT_VERSION,
        "model_uri": model_uri,
        "split": split,
        "summary": _summary(meta, manifest, model_uri, data_uri),
        "metrics": scalars,
        "intervals": intervals,
        "history": history,
        "history_note": history_note,
        "per_class": per_class,
        "confusion_matrix": confusion,
        "confused_pairs": _confused_pairs(confusion, classes),
        "top_losses": [item(i) for i in top],
        "gallery": {c: {k: [item(i) for i in v] for k, v in g.items()} for c, g in gallery.items()},
        "gradcam": {**gradcam, "overlays": [item(i) for i in cam_rows if i in cams]},
        "robustness": robustness,
        "label_issues": {
            **{k: v for k, v in issues.items() if k != "rows"},
            "items": [{**item(i), "label_quality": q} for i, q in zip(issues["rows"], issues["quality"], strict=True)],
        },
        "calibration": calibration,
        "slices": _slices(results, preds, groups, cfg, scalars["top1"]),
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "seconds": None,
    }
    plots = {
        "curves": _curves_png(history),
        "confusion": _confusion_pngs(confusion, classes),
        "robustness": _robustness_png(robustness["rows"], robustness["clean_top1"] or 0.0),
        "reliability": _reliability_png(calibration, temperature),
    }
    report["seconds"] = time.perf_counter() - started
    from cls_ray.report.card import model_card
    from cls_ray.report.html import render

    html = render(report, plots)
    card = model_card(report, meta)
    # Written last, in this order: the page, the card, then report.json (its presence marks a complete report).
    storage.write_bytes(storage.join(output_dir, REPORT_HTML), html.encode())
    storage.write_bytes(storage.join(model_uri, MODEL_CARD), card.encode())
    if calibrate and calibration["note"] is not None:
        raise ReportError(f"--calibrate: not writing a temperature into {model_uri}: {calibration['note']}")
    if calibrate:
        update_package_meta(
            model_uri,
            {
                "calibration": {
                    "temperature": temperature,
                    "fitted_on": f"{data_uri} ({cal_split})",
                    "ece_before": calibration["ece_before"],
                    "ece_after": calibration["ece_after"],
                    "bins": cfg.calibration_bins,
                }
            },
        )
    storage.write_json(storage.join(output_dir, REPORT_JSON), _json_ready(report))
    logger.info("wrote the report of %s on %s/%s to %s", model_uri, data_uri, split, output_dir)
    from cls_ray.tracking import log_report

    log_report(meta, output_dir)  # to the training run's MLflow run, when it was tracked
    return {
        **report,
        "output_dir": output_dir,
        "html": storage.join(output_dir, REPORT_HTML),
        "model_card": storage.join(model_uri, MODEL_CARD),
    }


def _json_ready(report: dict[str, Any]) -> dict[str, Any]:
    """report.json holds every number on the page; the inline pictures stay on the page only."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: strip(v) for k, v in value.items() if k not in ("thumbnail", "gradcam") or not isinstance(v, str)
            }
        if isinstance(value, list):
            return [strip(v) for v in value]
        if isinstance(value, (np.integer,)):
            return int(value)
        if isinstance(value, (np.floating,)):
            return float(value)
        return value

    return strip(report)


def print_report(report: dict[str, Any]) -> None:
    """The CLI's output: the headline numbers and where the page is."""
    from rich.console import Console

    m, ci, cal, rob = report["metrics"], report["intervals"], report["calibration"], report["robustness"]
    top1 = ci.get("top1", {})
    worst = max(rob["rows"], key=lambda x: x["relative_drop"], default=None)
    lines = [
        f"{report['summary']['name']} version {report['summary']['version']} on {report['split']} "
        f"({int(m['num_samples'])} images): top-1 {m['top1']:.4f}"
        + (f" (95% {top1['low']:.4f}-{top1['high']:.4f})" if top1 else "")
        + f", macro F1 {m['f1_macro']:.4f}",
        f"calibration: ECE {cal['ece_before']:.4f}, {cal['ece_after']:.4f} at temperature {cal['temperature']:.3f}",
    ]
    if worst is not None:
        lines.append(
            f"robustness: worst {worst['corruption']} severity {worst['severity']}: top-1 {worst['top1']:.4f} "
            f"({100 * worst['relative_drop']:.1f}% below clean)"
        )
    lines.append(f"report: {report['html']}")
    lines.append(f"model card: {report['model_card']}")
    Console().print("\n".join(lines), soft_wrap=True, highlight=False)
