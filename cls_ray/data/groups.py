"""Group-aware splits: images that belong together (one patient, session, device or subject) never straddle splits.

Groups come from ``ingest.group_by`` (a regular expression over each file's path relative to SRC: its first
capture group, or the whole match without one) or ``ingest.group_file`` (a CSV with ``path,group`` columns or a
JSON object ``{path: group}``, local or s3://). Either way every valid file must get a group, and a mapping that
names files SRC does not have is an error: a silent fallback would hide exactly the leak this guards against.

The split (:func:`cls_ray.data.split.split_by_groups`, beside the per-class split it replaces) is the
StratifiedGroupKFold idea with the split's own fractions rather than equal folds (scikit-learn's
``StratifiedGroupKFold`` only makes K equal folds; 70/15/15 is not one of those): groups, largest first (ties in a
seeded order), each go to the split whose per-class counts it brings closest to their targets (``fraction x
class total``; squared gaps, each class weighted by its size). Deterministic for the same input and seed. The
outcome is measured against the fractions: the largest gap between a split's share of the images and its fraction
is recorded, and one above ``ingest.group_tolerance`` is reported (a few large groups cannot be cut finely).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from cls_ray import storage
from cls_ray.data.scan import IngestError
from cls_ray.data.split import SPLITS, Item


def _examples(paths: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(list(paths)[:limit])
    return shown + (f" (and {len(paths) - limit} more)" if len(paths) > limit else "")


def groups_from_regex(paths: Sequence[str], pattern: str) -> dict[str, str]:
    """The group of each path: the first capture group of ``pattern`` (searched anywhere in the path), else the
    whole match. Every path must match."""
    regex = re.compile(pattern)
    groups: dict[str, str] = {}
    unmatched: list[str] = []
    for path in paths:
        m = regex.search(path)
        if m is None:
            unmatched.append(path)
            continue
        value = next((g for g in m.groups() if g), None) if regex.groups else m.group(0)
        if not value:
            unmatched.append(path)
            continue
        groups[path] = value
    if unmatched:
        raise IngestError(
            f"ingest.group_by={pattern!r} does not match {len(unmatched)} of {len(paths)} files (paths relative to "
            f"SRC, '/' separated): {_examples(unmatched)}; every image needs a group (fix the expression, or use "
            f"ingest.group_file)"
        )
    return groups


def read_group_file(uri: str) -> dict[str, str]:
    """``{path: group}`` from a CSV (header ``path,group``) or JSON (``{"path": "group"}``) file."""
    try:
        data = storage.read_bytes(uri)
    except (storage.StorageError, OSError) as exc:
        raise IngestError(f"ingest.group_file: cannot read {uri}: {exc}") from None
    if uri.lower().endswith(".json"):
        try:
            mapping = json.loads(data)
        except ValueError as exc:
            raise IngestError(f"ingest.group_file {uri}: not valid JSON ({exc})") from None
        if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and isinstance(v, str | int) for k, v in mapping.items()
        ):
            raise IngestError(f'ingest.group_file {uri}: expected one JSON object {{"path": "group", ...}}')
        return {k: str(v) for k, v in mapping.items()}
    try:
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
        if reader.fieldnames is None or not {"path", "group"} <= set(reader.fieldnames):
            raise IngestError(
                f"ingest.group_file {uri}: a CSV needs a header with 'path' and 'group' columns "
                f"(found {reader.fieldnames})"
            )
        mapping = {}
        for line, row in enumerate(reader, start=2):
            path, group = (row.get("path") or "").strip(), (row.get("group") or "").strip()
            if not path or not group:
                raise IngestError(f"ingest.group_file {uri}, line {line}: empty path or group")
            if mapping.get(path, group) != group:
                raise IngestError(
                    f"ingest.group_file {uri}, line {line}: {path} is given two groups ({mapping[path]!r}, {group!r})"
                )
            mapping[path] = group
    except UnicodeDecodeError as exc:
        raise IngestError(f"ingest.group_file {uri}: not UTF-8 text ({exc})") from None
    return mapping


def groups_from_file(paths: Sequence[str], all_paths: Sequence[str], uri: str) -> dict[str, str]:
    """The group of each of ``paths`` from the mapping at ``uri``; ``all_paths`` are every file SRC holds (refused
    ones included), so a mapping entry for a refused file is not mistaken for a missing file."""
    mapping = read_group_file(uri)
    present = set(all_paths)
    unknown = sorted(p for p in mapping if p not in present)
    if unknown:
        raise IngestError(
            f"ingest.group_file {uri} names {len(unknown)} file(s) that SRC does not have: {_examples(unknown)} "
            f"(paths are relative to SRC, '/' separated, class folder first)"
        )
    missing = [p for p in paths if p not in mapping]
    if missing:
        raise IngestError(
            f"ingest.group_file {uri} gives no group for {len(missing)} of {len(paths)} files: {_examples(missing)}"
        )
    return {p: mapping[p] for p in paths}


def group_summary(
    splits: dict[str, list[Item]],
    groups: dict[str, str],
    targets: dict[str, float],
    by: dict[str, Any],
    tolerance: float,
    num_classes: int,
) -> dict[str, Any]:
    """The manifest's ``split.groups``: what grouped the images, groups and images per split, and for the splits
    ingest divided (``targets``: each one's fraction of the images divided; all three for a flat tree, train and the
    carved ones for a pre-split tree) the gap between its share and its target, overall and for the worst class.
    Groups found in more than one split are listed: only possible across the given splits of a pre-split tree
    (the tree's own leak, which ingest cannot undo)."""
    divided = [s for s in SPLITS if s in targets]
    pool = [it for s in divided for it in splits[s]]
    class_totals = np.bincount([it.label for it in pool], minlength=num_classes).astype(float)
    per_split: dict[str, Any] = {}
    gaps: dict[str, float] = {}
    class_gaps: dict[str, float] = {}
    where: dict[str, set[str]] = defaultdict(set)
    for split in SPLITS:
        items = splits[split]
        for it in items:
            where[groups[it.path]].add(split)
        per_split[split] = {"groups": len({groups[it.path] for it in items}), "images": len(items)}
        if split not in targets or not pool:
            continue
        gaps[split] = round(len(items) / len(pool) - targets[split], 6)
        counts = np.bincount([it.label for it in items], minlength=num_classes)
        present = class_totals > 0
        class_gaps[split] = round(float(np.abs(counts[present] / class_totals[present] - targets[split]).max()), 6)
    spanning = sorted(g for g, s in where.items() if len(s) > 1)
    worst = max((abs(g) for g in gaps.values()), default=0.0)
    return {
        **by,
        "num_groups": len(where),
        "per_split": per_split,
        "targets": {s: targets[s] for s in divided},
        "share_gap": gaps,
        "max_share_gap": worst,
        "class_share_gap": class_gaps,
        "tolerance": tolerance,
        "within_tolerance": worst <= tolerance,
        "spanning_splits": {"count": len(spanning), "examples": spanning[:10]},
    }
