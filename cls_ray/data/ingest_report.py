"""The summary tables printed at the end of ``cls-ray ingest`` (rich): classes x splits, imbalance, refusals."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.console import Console
from rich.table import Table

SPLITS = ("train", "val", "test")


def imbalance_ratio(class_counts: list[int]) -> float:
    """Largest class over smallest class (``inf`` when a class is empty)."""
    if not class_counts:
        return 1.0
    smallest = min(class_counts)
    return float("inf") if smallest == 0 else max(class_counts) / smallest


def _class_table(manifest: dict[str, Any]) -> Table:
    splits = manifest["splits"]
    table = Table(title=f"dataset: {len(manifest['classes'])} classes")
    table.add_column("label", justify="right")
    table.add_column("class")
    for split in SPLITS:
        table.add_column(split, justify="right")
    table.add_column("total", justify="right")
    totals = [0] * len(manifest["classes"])
    for i, name in enumerate(manifest["classes"]):
        cells = [splits[s]["class_counts"][i] for s in SPLITS]
        totals[i] = sum(cells)
        table.add_row(str(i), name, *map(str, cells), str(totals[i]))
    table.add_section()
    table.add_row("", "all", *(str(splits[s]["num_rows"]) for s in SPLITS), str(sum(totals)))
    ratio = imbalance_ratio(totals)
    table.caption = f"imbalance ratio (largest / smallest class): {ratio:.2f}; shards: " + ", ".join(
        f"{s} {len(splits[s]['shards'])}" for s in SPLITS
    )
    return table


def _refusal_table(manifest: dict[str, Any]) -> Table | None:
    reasons = Counter(s["reason"] for s in manifest.get("skipped", []))
    if not reasons:
        return None
    table = Table(title=f"refused files: {sum(reasons.values())} (listed in manifest.json 'skipped')")
    table.add_column("reason")
    table.add_column("files", justify="right")
    table.add_column("example")
    for reason, n in sorted(reasons.items()):
        example = next(s["path"] for s in manifest["skipped"] if s["reason"] == reason)
        table.add_row(reason, str(n), example)
    return table


def _duplicates_line(manifest: dict[str, Any]) -> str:
    dups = manifest.get("duplicates", [])
    conflicts = sum(1 for d in dups if d["label_conflict"])
    dropped = sum(len(d["paths"]) - (0 if d["label_conflict"] else 1) for d in dups)
    enc = manifest.get("encoding", {})
    return (
        f"duplicates: {len(dups)} groups of identical files ({conflicts} with a label conflict, all copies "
        f"dropped); {dropped} files dropped.  encoding: {enc.get('kept_original', 0)} kept as is, "
        f"{enc.get('reencoded', 0)} re-encoded ({enc.get('resized', 0)} resized to max side "
        f"{enc.get('max_side')})"
    )


def print_summary(manifest: dict[str, Any], console: Console | None = None) -> None:
    """Print the ingest summary of ``manifest`` to ``console`` (stdout by default)."""
    console = console or Console()
    console.print(_class_table(manifest))
    refusals = _refusal_table(manifest)
    if refusals is not None:
        console.print(refusals)
    console.print(_duplicates_line(manifest))
    near = manifest.get("near_duplicates")
    if near:
        action = {
            "report": "left where the split put them",
            "group": "each kept in one split",
            "drop": f"one kept per class, {len(near['dropped'])} dropped",
        }[near["mode"]]
        console.print(
            f"near-duplicates (within {near['threshold']} of 256 bits): {near['clusters']} clusters of "
            f"{near['images']} images, {action}; {near['spanning_classes']} span classes (possible label errors), "
            f"{near['spanning_splits']} span splits (listed in manifest.json 'near_duplicates')"
        )
    groups = manifest.get("split", {}).get("groups")
    if groups:
        per = ", ".join(f"{s} {groups['per_split'][s]['groups']}" for s in SPLITS)
        console.print(
            f"groups: {groups['num_groups']} ({per}); largest gap to the split fractions "
            f"{groups['max_share_gap']:.3f} (tolerance {groups['tolerance']})"
        )
    ffcv = manifest.get("ffcv")
    if ffcv:
        files = ", ".join(
            f"{split} {e['num_rows']} rows {e['bytes'] / 2**20:.1f} MB" for split, e in ffcv["splits"].items()
        )
        console.print(f"FFCV files ({ffcv['write_mode']}): {files}")
