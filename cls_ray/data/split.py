"""Duplicate resolution and the deterministic, stratified train/val/test split.

Duplicates are exact: equal sha256 of the file bytes. In a group of duplicates

- all under one class: the first path in sorted order is kept, the others are dropped, so copies of one image
  can never straddle train and test;
- under two or more classes (a label conflict): all copies are dropped, since no label can be trusted.

Every group is recorded in the manifest with what was kept.

The split is per class (stratified): the class's paths are sorted, permuted by a generator seeded with
``(seed, label)``, and cut into test, val and train. A class with at least 3 images gets at least one image in
each split whose fraction is above zero; a smaller class goes to train only. The same input and seed always give
the same split.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Item:
    """A valid image on its way to a shard."""

    path: str
    label: int
    sha256: str
    given_split: str | None
    """The split of a pre-split tree, else None."""


def resolve_duplicates(items: list[Item], classes: list[str]) -> tuple[list[Item], list[dict]]:
    """Drop exact duplicates (see module docstring); returns the kept items and the manifest's ``duplicates``."""
    groups: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        groups[item.sha256].append(item)
    kept: list[Item] = []
    duplicates: list[dict] = []
    for digest, group in groups.items():
        group.sort(key=lambda it: it.path)
        if len(group) == 1:
            kept.append(group[0])
            continue
        labels = sorted({it.label for it in group})
        conflict = len(labels) > 1
        if not conflict:
            kept.append(group[0])
        duplicates.append(
            {
                "sha256": digest,
                "paths": [it.path for it in group],
                "label_conflict": conflict,
                "classes": [classes[label] for label in labels],
                "kept": None if conflict else group[0].path,
            }
        )
    kept.sort(key=lambda it: it.path)
    duplicates.sort(key=lambda d: d["paths"][0])
    return kept, duplicates


def _cut_sizes(n: int, fractions: dict[str, float]) -> dict[str, int]:
    if n < 3:
        return {"train": n, "val": 0, "test": 0}
    sizes = {s: int(round(n * fractions.get(s, 0.0))) for s in ("val", "test")}
    for s in ("val", "test"):
        if fractions.get(s, 0.0) > 0:
            sizes[s] = max(1, sizes[s])
    while n - sizes["val"] - sizes["test"] < 1:  # leave at least one training image
        largest = max(("val", "test"), key=lambda s: sizes[s])
        sizes[largest] -= 1
    sizes["train"] = n - sizes["val"] - sizes["test"]
    return sizes


def _permute(paths: list[str], seed: int, label: int) -> list[str]:
    order = np.random.default_rng([seed, label]).permutation(len(paths))
    return [paths[i] for i in order]


def split_class(paths: list[str], label: int, fractions: dict[str, float], seed: int) -> dict[str, list[str]]:
    """Split one class's paths into ``{"train": [...], "val": [...], "test": [...]}`` (fractions of val/test)."""
    shuffled = _permute(sorted(paths), seed, label)
    sizes = _cut_sizes(len(shuffled), fractions)
    n_test, n_val = sizes["test"], sizes["val"]
    return {"test": shuffled[:n_test], "val": shuffled[n_test : n_test + n_val], "train": shuffled[n_test + n_val :]}


def assign_splits(
    items: list[Item],
    num_classes: int,
    fractions: dict[str, float],
    seed: int,
    presplit: bool,
    groups: dict[str, str] | None = None,
) -> tuple[dict[str, list[Item]], list[str]]:
    """Assign every item to a split; returns ``({split: items sorted by path}, carved)``.

    For a pre-split tree the given splits are kept; each split that the tree lacks (``val`` and/or ``test``) is
    carved off its ``train`` split, stratified, with that split's fraction of the train images. ``carved`` lists
    the splits made that way. With ``groups`` (path -> group) whole groups are assigned instead of single images
    (:func:`split_by_groups`).
    """
    out: dict[str, list[Item]] = {s: [] for s in SPLITS}
    carved: list[str] = []
    if presplit:
        present = {it.given_split for it in items}
        carved = [s for s in ("val", "test") if s not in present]
        for it in items:
            if it.given_split != "train":
                out[it.given_split].append(it)
        pool = [it for it in items if it.given_split == "train"]
        carve_fractions = {s: (fractions[s] if s in carved else 0.0) for s in ("val", "test")}
    else:
        pool = list(items)
        carve_fractions = {s: fractions[s] for s in ("val", "test")}
    if groups is not None:
        for split, chosen in split_by_groups(pool, groups, num_classes, carve_fractions, seed).items():
            out[split].extend(chosen)
        return {s: sorted(v, key=lambda it: it.path) for s, v in out.items()}, carved
    by_path = {it.path: it for it in pool}
    per_class: dict[int, list[str]] = defaultdict(list)
    for it in pool:
        per_class[it.label].append(it.path)
    for label in range(num_classes):
        for split, paths in split_class(per_class.get(label, []), label, carve_fractions, seed).items():
            out[split].extend(by_path[p] for p in paths)
    return {s: sorted(v, key=lambda it: it.path) for s, v in out.items()}, carved


def split_by_groups(
    items: Sequence[Item], groups: dict[str, str], num_classes: int, fractions: dict[str, float], seed: int
) -> dict[str, list[Item]]:
    """Assign whole groups (``groups``: path -> group) to splits, the algorithm :mod:`cls_ray.data.groups`
    describes; returns ``{split: items sorted by path}``."""
    members: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        members[groups[it.path]].append(it)
    names = sorted(members)
    counts = np.zeros((len(names), num_classes))
    for g, name in enumerate(names):
        for it in members[name]:
            counts[g, it.label] += 1
    totals = counts.sum(axis=0)
    weight = 1.0 / np.maximum(totals, 1.0)  # squared gaps relative to the class size
    share = {"val": fractions.get("val", 0.0), "test": fractions.get("test", 0.0)}
    share["train"] = 1.0 - share["val"] - share["test"]
    open_splits = [s for s in SPLITS if share[s] > 0]
    target = np.stack([share[s] * totals for s in open_splits])
    current = np.zeros_like(target)
    rank = np.random.default_rng([seed, 104729]).permutation(len(names))
    order = sorted(range(len(names)), key=lambda g: (-counts[g].sum(), rank[g]))
    out: dict[str, list[Item]] = {s: [] for s in SPLITS}
    for g in order:
        v = counts[g]
        gain = (((current + v - target) ** 2 - (current - target) ** 2) * weight).sum(axis=1)
        best = int(np.argmin(gain))  # ties: the first of train, val, test
        current[best] += v
        out[open_splits[best]].extend(members[names[g]])
    return {s: sorted(v, key=lambda it: it.path) for s, v in out.items()}


def shard_order(items: list[Item], seed: int, split: str) -> list[Item]:
    """The row order of a split's shards: a seeded permutation, so no shard holds a single class."""
    order = np.random.default_rng([seed, SPLITS.index(split), 7919]).permutation(len(items))
    return [items[i] for i in order]
