"""``cls-ray audit MODEL DATASET``: images whose given label is probably wrong, ranked, with the suggested class.

The model's out-of-sample probabilities on the splits it did not train on (``audit.splits``, default validation
and test) are computed as Ray Data batch inference (the report's clean pass: decode tasks, an actor pool of model
replicas), divided by the package's calibrated temperature when it has one, and given with the labels to
cleanlab's ``find_label_issues`` (confident learning: the per-class confident joint estimates how many images of
each given class really belong to each other class, and the least likely ones are flagged; ``audit.filter_by``).
Each flagged image gets cleanlab's label quality score (``get_label_quality_scores``, self-confidence: the
probability of its given label); the list is ranked by it, lowest first.

Written to ``DIR`` (default ``MODEL/audit``): ``label_issues.csv`` (one row per flagged image) and
``label_issues.json`` (the settings, counts per class and the same rows), the JSON last. Only images the model never
trained on can be audited this way; a model scored on its own training images is over-confident about their
labels, whatever they are: the train split is audited only with ``audit.folds`` = K >= 2, its probabilities then
coming from K models retrained on the other folds (:mod:`cls_ray.crossval`; written under
``DIR/cross-validation``). Every row says which model scored it (``scored_by``).
"""

from __future__ import annotations

import csv
import io
import logging
from typing import Any

import numpy as np

from cls_ray import storage
from cls_ray.config import AuditConfig
from cls_ray.data import manifest as manifest_lib
from cls_ray.package import PackageError, read_package_meta

logger = logging.getLogger(__name__)

AUDIT_JSON = "label_issues.json"
AUDIT_CSV = "label_issues.csv"
AUDIT_FORMAT_VERSION = 1
CROSS_VALIDATION_DIR = "cross-validation"


class AuditError(ValueError):
    """The audit cannot run on these inputs (the message says what and where)."""


def label_issues(
    labels: np.ndarray, probs: np.ndarray, filter_by: str = "prune_by_noise_rate"
) -> tuple[np.ndarray, np.ndarray]:
    """``(ranked indices of likely label errors, label quality score of every image)``: cleanlab's
    ``find_label_issues`` ranked by self-confidence, and ``get_label_quality_scores``."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    ranked = find_label_issues(labels, probs, filter_by=filter_by, return_indices_ranked_by="self_confidence", n_jobs=1)
    scores = get_label_quality_scores(labels, probs, method="self_confidence")
    return np.asarray(ranked, dtype=np.int64), scores


def issue_rows(
    paths: list[str],
    splits: list[str],
    labels: np.ndarray,
    probs: np.ndarray,
    ranked: np.ndarray,
    scores: np.ndarray,
    classes: list[str],
    scored_by: list[str] | None = None,
) -> list[dict[str, Any]]:
    rows = []
    for rank, i in enumerate(ranked, start=1):
        suggested = int(np.argmax(probs[i]))
        rows.append(
            {
                "rank": rank,
                "path": paths[i],
                "split": splits[i],
                "given": classes[int(labels[i])],
                "suggested": classes[suggested],
                "given_probability": float(probs[i, labels[i]]),
                "suggested_probability": float(probs[i, suggested]),
                "label_quality": float(scores[i]),
                "scored_by": scored_by[i] if scored_by is not None else "model",
            }
        )
    return rows


def _csv(rows: list[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    fields = [
        "rank",
        "path",
        "split",
        "given",
        "suggested",
        "given_probability",
        "suggested_probability",
        "label_quality",
        "scored_by",
    ]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def audit(
    model_uri: str, data_uri: str, output_dir: str | None = None, cfg: AuditConfig | None = None
) -> dict[str, Any]:
    """Find likely label errors in ``cfg.splits`` of ``data_uri`` with the model at ``model_uri`` (see the module
    docstring); writes the files and returns the JSON's content with ``output_dir`` added."""
    from cls_ray.ray_connect import ensure_ray
    from cls_ray.report.passes import CLEAN, run_passes
    from cls_ray.report.stats import softmax

    cfg = cfg or AuditConfig()
    output_dir = output_dir or storage.join(model_uri, "audit")
    meta = read_package_meta(model_uri)
    manifest = manifest_lib.read_manifest(data_uri)
    classes = list(meta["classes"])
    if list(manifest["classes"]) != classes:
        raise PackageError(
            f"{model_uri} predicts classes {classes[:5]}... but {data_uri} has {manifest['classes'][:5]}...; "
            f"audit a dataset with the same classes in the same order"
        )
    present = manifest.get("splits", {})
    missing = [s for s in cfg.splits if not present.get(s, {}).get("num_rows")]
    if missing:
        sizes = ", ".join(f"{k} {v.get('num_rows', 0)}" for k, v in sorted(present.items()))
        raise AuditError(
            f"{data_uri} has no images in split(s) {', '.join(missing)} (audit.splits; the dataset has {sizes})"
        )
    ensure_ray()
    paths: list[str] = []
    split_of: list[str] = []
    scored_by: list[str] = []
    labels, logits, temperatures = [], [], []
    temperature = float(meta.get("calibration", {}).get("temperature", 1.0))
    cross_validation = None
    for split in cfg.splits:
        if split == "train":
            from cls_ray.crossval import cross_validate

            folds = cross_validate(
                model_uri,
                data_uri,
                storage.join(output_dir, CROSS_VALIDATION_DIR),
                folds=cfg.folds,
                seed=cfg.fold_seed,
                overrides=cfg.fold_overrides,
                batch_size=cfg.batch_size,
                use_gpu=cfg.use_gpu,
                max_replicas=cfg.max_replicas,
            )
            paths += folds.paths
            scored_by += [f"fold {int(f)}" for f in folds.fold]
            labels.append(folds.labels)
            logits.append(folds.logits)
            temperatures.append(np.ones(len(folds.paths)))  # the fold models are not calibrated
            cross_validation = {
                "folds": cfg.folds,
                "seed": cfg.fold_seed,
                "overrides": list(cfg.fold_overrides),
                "packages": folds.packages,
                "fold_top1": folds.fold_top1,
            }
        else:
            results = run_passes(
                model_uri,
                data_uri,
                manifest,
                split,
                [(CLEAN, 0)],
                batch_size=cfg.batch_size,
                use_gpu=cfg.use_gpu,
                max_replicas=cfg.max_replicas,
                desc=f"audit {split}",
            )
            paths += results.paths
            scored_by += ["model"] * len(results.paths)
            labels.append(results.labels)
            logits.append(results.logits)
            temperatures.append(np.full(len(results.paths), temperature))
        split_of += [split] * (len(paths) - len(split_of))
    y = np.concatenate(labels)
    probs = softmax(np.concatenate(logits) / np.concatenate(temperatures)[:, None], 1.0).astype(np.float64)
    missing_classes = sorted(set(range(len(classes))) - set(np.unique(y).tolist()))
    if missing_classes:
        raise AuditError(
            f"audit.splits {', '.join(cfg.splits)} of {data_uri} hold no image of class(es) "
            f"{', '.join(classes[c] for c in missing_classes[:5])}: confident learning needs every class present"
        )
    ranked, scores = label_issues(y, probs, cfg.filter_by)
    rows = issue_rows(paths, split_of, y, probs, ranked, scores, classes, scored_by)
    per_class = {c: 0 for c in classes}
    for row in rows:
        per_class[row["given"]] += 1
    result = {
        "format_version": AUDIT_FORMAT_VERSION,
        "model_uri": model_uri,
        "model": {"name": meta["name"], "version": meta["version"]},
        "dataset": data_uri,
        "splits": list(cfg.splits),
        "images": len(paths),
        "temperature": temperature,
        "cross_validation": cross_validation,
        "method": f"cleanlab.filter.find_label_issues(filter_by={cfg.filter_by!r}), ranked by self-confidence",
        "issues": len(rows),
        "issues_per_class": per_class,
        "accuracy": float((probs.argmax(axis=1) == y).mean()),
        "rows": rows,
    }
    storage.write_bytes(storage.join(output_dir, AUDIT_CSV), _csv(rows))
    storage.write_json(storage.join(output_dir, AUDIT_JSON), result)
    logger.info("wrote %d likely label errors of %d images to %s", len(rows), len(paths), output_dir)
    return {**result, "output_dir": output_dir}


def print_audit(result: dict[str, Any], limit: int = 20) -> None:
    """The CLI's table: the most likely label errors and where the full list is."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"likely label errors: {result['issues']} of {result['images']} images")
    for name in ("rank", "path", "given", "suggested", "p(given)", "p(suggested)"):
        table.add_column(name, justify="right" if name.startswith(("rank", "p(")) else "left")
    for row in result["rows"][:limit]:
        table.add_row(
            str(row["rank"]),
            row["path"],
            row["given"],
            row["suggested"],
            f"{row['given_probability']:.3f}",
            f"{row['suggested_probability']:.3f}",
        )
    console = Console()
    console.print(table)
    print(f"audit: {storage.join(result['output_dir'], AUDIT_CSV)} (and {AUDIT_JSON})")  # unwrapped: a path
