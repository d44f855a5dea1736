"""Group-aware splits (``ingest.group_by`` / ``ingest.group_file``) on real images: scikit-learn's handwritten
digits, each file given a "writer" group that spans several classes, as a real dataset's subjects do."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_digits_folders

from cls_ray.config import ConfigError, IngestConfig
from cls_ray.data.ingest import IngestError, ingest
from cls_ray.data.split import SPLITS
from cls_ray.report.build import _split_paths_and_labels

GROUP_BY = r"^[^/]+/(w\d+)_"


def grouped_digits(root: Path, per_class: int = 40, writers: int = 40, seed: int = 0) -> Path:
    """Digits as ``digit_C/wNN_IIIII.png``: each image belongs to one of ``writers`` writers (unequal sizes,
    each spanning several classes)."""
    src = write_digits_folders(root, per_class=per_class)
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.3, 1.7, size=writers)
    for path in sorted(src.rglob("*.png")):
        writer = int(rng.choice(writers, p=weights / weights.sum()))
        path.rename(path.with_name(f"w{writer:02d}_{path.name}"))
    return src


def split_rows(dataset: Path, split: str) -> list[dict]:
    rows = []
    for shard in sorted((dataset / split).glob("*.parquet")):
        rows += pq.read_table(shard, columns=["path", "label", "group"]).to_pylist()
    return rows


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return grouped_digits(tmp_path_factory.mktemp("grouped") / "src")


def test_groups_never_straddle_splits_and_the_split_is_reproducible(digits, tmp_path):
    cfg = IngestConfig(group_by=GROUP_BY)
    first = ingest(str(digits), str(tmp_path / "a"), cfg, summary=False)
    ingest(str(digits), str(tmp_path / "b"), cfg, summary=False)
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    for split in SPLITS:
        shards = sorted((tmp_path / "a" / split).glob("*.parquet"))
        assert [p.read_bytes() for p in shards] == [
            p.read_bytes() for p in sorted((tmp_path / "b" / split).glob("*.parquet"))
        ]

    rows = {split: split_rows(tmp_path / "a", split) for split in SPLITS}
    where: dict[str, set[str]] = {}
    for split, split_rows_ in rows.items():
        for row in split_rows_:
            assert row["group"] == row["path"].split("/")[1].split("_")[0]
            where.setdefault(row["group"], set()).add(split)
    assert len(where) == 40 and all(len(s) == 1 for s in where.values()), "a writer in two splits"

    info = first["split"]["groups"]
    assert info["group_by"] == GROUP_BY and info["num_groups"] == 40
    assert sum(info["per_split"][s]["groups"] for s in SPLITS) == 40
    assert info["within_tolerance"] and info["max_share_gap"] <= 0.05, info
    total = sum(len(r) for r in rows.values())
    for split, fraction in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        assert abs(len(rows[split]) / total - fraction) <= 0.05
        # stratified as the groups allow: every class's share of each split near the split's fraction
        counts = np.bincount([r["label"] for r in rows[split]], minlength=10)
        assert np.abs(counts / 40 - fraction).max() <= 0.1, (split, counts)  # measured: 0.05 at most
    assert max(info["class_share_gap"].values()) <= 0.1

    # the plain stratified split leaks writers across splits (what the grouping is for)
    plain = tmp_path / "plain"
    ingest(str(digits), str(plain), IngestConfig(), summary=False)
    plain_where: dict[str, set[str]] = {}
    for split in SPLITS:
        for row in split_rows(plain, split):
            assert row["group"] is None
            plain_where.setdefault(row["path"].split("/")[1].split("_")[0], set()).add(split)
    assert sum(len(s) > 1 for s in plain_where.values()) > 30
    assert "groups" not in json.loads((plain / "manifest.json").read_text())["split"]
    for shard in (plain / "train").glob("*.parquet"):  # the dataset contract's columns (docs/design.md)
        assert pq.read_schema(shard).names == ["image", "label", "path", "width", "height", "group", "near_duplicate"]

    # the report's slices read the group column
    labels, groups = _split_paths_and_labels(str(tmp_path / "a"), first, "test")
    assert groups is not None and set(groups) == set(labels) and set(groups.values()) <= set(where)


def test_a_group_file_gives_the_same_split_as_the_expression(digits, tmp_path):
    mapping = {
        f"{p.parent.name}/{p.name}": p.name.split("_")[0] for p in sorted(digits.rglob("*.png"))
    }  # fmt: skip
    csv_file = tmp_path / "groups.csv"
    with csv_file.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "group"])
        writer.writerows(mapping.items())
    json_file = tmp_path / "groups.json"
    json_file.write_text(json.dumps(mapping))
    by_regex = ingest(str(digits), str(tmp_path / "regex"), IngestConfig(group_by=GROUP_BY), summary=False)
    by_csv = ingest(str(digits), str(tmp_path / "csv"), IngestConfig(group_file=str(csv_file)), summary=False)
    by_json = ingest(str(digits), str(tmp_path / "json"), IngestConfig(group_file=str(json_file)), summary=False)
    assert by_csv["split"]["groups"]["group_file"] == str(csv_file)
    for split in SPLITS:
        expected = split_rows(tmp_path / "regex", split)
        assert split_rows(tmp_path / "csv", split) == expected
        assert split_rows(tmp_path / "json", split) == expected
    assert by_regex["splits"] == by_csv["splits"] == by_json["splits"]


def test_too_few_groups_say_by_how_much_they_miss(tmp_path, caplog):
    src = grouped_digits(tmp_path / "src", per_class=12, writers=3, seed=1)
    with caplog.at_level(logging.WARNING, logger="cls_ray.data.ingest"):
        manifest = ingest(str(src), str(tmp_path / "ds"), IngestConfig(group_by=GROUP_BY), summary=False)
    info = manifest["split"]["groups"]
    assert not info["within_tolerance"] and info["max_share_gap"] > 0.05
    assert info["max_share_gap"] == max(abs(g) for g in info["share_gap"].values())
    assert "misses its fractions by up to" in caplog.text and "ingest.group_tolerance=0.05" in caplog.text
    assert info["spanning_splits"]["count"] == 0


def test_a_presplit_tree_keeps_its_splits_and_reports_groups_it_leaks(digits, tmp_path, caplog):
    tree = tmp_path / "tree"
    files = sorted(digits.rglob("*.png"))
    for i, path in enumerate(files):
        split = "test" if i % 5 == 0 else "train"  # writers land in both given splits
        out = tree / split / path.parent.name / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(path.read_bytes())
    with caplog.at_level(logging.WARNING, logger="cls_ray.data.ingest"):
        manifest = ingest(str(tree), str(tmp_path / "ds"), IngestConfig(group_by=r"/(w\d+)_"), summary=False)
    assert manifest["split"]["carved"] == ["val"]
    info = manifest["split"]["groups"]
    assert set(info["targets"]) == {"train", "val"} and info["spanning_splits"]["count"] > 0
    assert "appear in more than one of the given splits" in caplog.text
    val = {r["group"] for r in split_rows(tmp_path / "ds", "val")}
    train = {r["group"] for r in split_rows(tmp_path / "ds", "train")}
    assert val and not val & train  # the carved split takes whole groups off train
    assert len(split_rows(tmp_path / "ds", "test")) == len(files[::5])


def test_bad_group_settings_are_named_and_write_nothing(digits, tmp_path):
    dest = tmp_path / "never"
    with pytest.raises(IngestError, match=r"ingest.group_by=.* does not match 400 of 400 files .*digit_0/w\d\d_"):
        ingest(str(digits), str(dest), IngestConfig(group_by=r"^[^/]+/(x\d+)_"), summary=False)
    mapping = tmp_path / "map.csv"
    first = sorted(digits.rglob("*.png"))[0]
    mapping.write_text(f"path,group\ndigit_0/nope.png,a\n{first.parent.name}/{first.name},b\n")
    with pytest.raises(IngestError, match=r"map.csv names 1 file\(s\) that SRC does not have: digit_0/nope.png"):
        ingest(str(digits), str(dest), IngestConfig(group_file=str(mapping)), summary=False)
    mapping.write_text(f"path,group\n{first.parent.name}/{first.name},b\n")
    with pytest.raises(IngestError, match=r"map.csv gives no group for 399 of 400 files"):
        ingest(str(digits), str(dest), IngestConfig(group_file=str(mapping)), summary=False)
    mapping.write_text("file,writer\na,b\n")
    with pytest.raises(IngestError, match=r"map.csv: a CSV needs a header with 'path' and 'group'"):
        ingest(str(digits), str(dest), IngestConfig(group_file=str(mapping)), summary=False)
    with pytest.raises(IngestError, match=r"ingest.group_file: cannot read .*missing.json"):
        ingest(str(digits), str(dest), IngestConfig(group_file=str(tmp_path / "missing.json")), summary=False)
    assert not dest.exists() or not any(dest.iterdir())
    with pytest.raises(ConfigError, match="ingest.group_by and ingest.group_file: set one of them, not both"):
        IngestConfig(group_by="x", group_file="y.csv")
    with pytest.raises(ConfigError, match=r"ingest.group_by: '\(unclosed' is not a valid regular expression"):
        IngestConfig(group_by="(unclosed")
