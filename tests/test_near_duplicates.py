"""Near-duplicate detection in ingest (``ingest.near_duplicates``), on a set built here from real images:
Fashion-MNIST photos, with resized, re-encoded and colour-shifted copies planted next to their originals (and
slightly cropped ones, which a perceptual hash does not catch: measured, not asserted), against 600 truly
different images."""

from __future__ import annotations

import io
import json
import shutil
from itertools import combinations
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageEnhance

from cls_ray.config import ConfigError, IngestConfig
from cls_ray.data.fashion_mnist import write_fashion_mnist
from cls_ray.data.ingest import ingest
from cls_ray.data.near_duplicates import HASH_BYTES, clusters, find_pairs, perceptual_hash
from cls_ray.data.split import SPLITS

CAUGHT = ("resized", "jpeg", "colour")  # the copies the hash is meant to catch
PER_CLASS = 60
PLANTED_PER_CLASS = 10


def _variant(image: Image.Image, kind: str) -> Image.Image:
    w, h = image.size
    if kind == "resized":
        return image.resize((2 * w, 2 * h), Image.Resampling.BICUBIC)
    if kind == "jpeg":
        buf = io.BytesIO()
        image.convert("RGB").save(buf, "JPEG", quality=75)
        return Image.open(io.BytesIO(buf.getvalue()))
    if kind == "colour":
        rgb = ImageEnhance.Contrast(image.convert("RGB")).enhance(1.15)
        return ImageEnhance.Brightness(rgb).enhance(0.9)
    c = max(1, round(w * 0.06))  # "cropped": 6% off each side, back to the original size
    return image.crop((c, c, w - c, h - c)).resize((w, h), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """600 Fashion-MNIST training images in class folders, and for 10 per class a resized, a JPEG, a colour-shifted
    and a cropped copy in the same folder. Returns the folder and ``{copy path: (original path, kind)}``."""
    root = tmp_path_factory.mktemp("near")
    write_fashion_mnist(str(root / "fm"), limit_per_class=PER_CLASS)
    src = root / "src"
    shutil.copytree(root / "fm" / "train", src)
    copies: dict[str, tuple[str, str]] = {}
    for folder in sorted(src.iterdir()):
        for original in sorted(folder.glob("*.png"))[:PLANTED_PER_CLASS]:
            image = Image.open(original)
            image.load()
            for kind in (*CAUGHT, "cropped"):
                out = folder / f"{original.stem}_{kind}.png"
                _variant(image, kind).save(out)
                copies[f"{folder.name}/{out.name}"] = (f"{folder.name}/{original.name}", kind)
    return {"src": src, "copies": copies}


def _rows(dataset: Path) -> dict[str, str]:
    """``{path: split}`` of every row of a dataset."""
    out = {}
    for split in SPLITS:
        for shard in sorted((dataset / split).glob("*.parquet")):
            out.update((p, split) for p in pq.read_table(shard, columns=["path"])["path"].to_pylist())
    return out


def _clusters(manifest: dict) -> list[list[str]]:
    info = manifest["near_duplicates"]
    assert info["notable_listed"] == len(info["notable"])
    return [c["paths"] for c in info["notable"]]


def test_matching_is_exact_against_brute_force():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(3000, HASH_BYTES), dtype=np.uint8)
    for k in range(0, 600, 2):  # pairs at every distance from 0 to 40 bits
        flip = rng.choice(256, size=(k // 2) % 41, replace=False)
        bits = np.unpackbits(codes[k])
        bits[flip] ^= 1
        codes[k + 1] = np.packbits(bits)
    bits = np.unpackbits(codes, axis=1).astype(np.int16)
    distance = bits.sum(1)[:, None] + bits.sum(1)[None, :] - 2 * bits @ bits.T
    for threshold in (0, 3, 20, 33):
        want_i, want_j = np.nonzero(np.triu(distance <= threshold, k=1))
        want = list(zip(want_i.tolist(), want_j.tolist(), strict=True))
        assert want
        for method in ("mih", "flat", "auto"):
            i, j = find_pairs(codes, threshold, method=method)
            assert list(zip(i.tolist(), j.tolist(), strict=True)) == want, (method, threshold)


def _bits_apart(a: bytes, b: bytes) -> int:
    return sum(bin(x ^ y).count("1") for x, y in zip(a, b, strict=True))


def _area_mean(pixels: np.ndarray, side: int) -> np.ndarray:
    """The exact box filter to ``side`` x ``side``: every pixel repeated ``side`` times along an axis, then means of
    runs of the original length (each output the mean of the span of input it covers, fractions included)."""
    h, w = pixels.shape
    rows = np.repeat(pixels.astype(np.float64), side, axis=1).reshape(h, side, w).mean(axis=2)
    return np.repeat(rows, side, axis=0).reshape(side, h, side).mean(axis=1)


def test_the_hash_is_imagehash_phash_of_the_box_filtered_image(planted):
    import imagehash
    import scipy.fftpack

    paths = sorted(planted["src"].rglob("*.png"))[::7][:100]
    exact = 0
    for path in paths:
        with Image.open(path) as image:
            gray = image.convert("L")
        # a 64 px image needs no filtering: imagehash's own phash of it, bit for bit up to float32 ties
        small = gray.resize((64, 64), Image.Resampling.BICUBIC)
        reference = np.packbits(imagehash.phash(small, hash_size=16).hash.reshape(-1)).tobytes()
        assert _bits_apart(perceptual_hash(small), reference) <= 2, path
        exact += perceptual_hash(small) == reference
        # a photo-sized one: imagehash's steps (scipy's DCT, numpy's median) on its exact box filter to 64 px,
        # after the power-of-two reduction of the short side to 64-127 px (224 -> 112)
        rgb = gray.convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
        pixels = _area_mean(np.asarray(rgb.convert("L").reduce(2)), 64)
        low = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)[:16, :16]
        reference = np.packbits(low > np.median(low)).tobytes()
        assert _bits_apart(perceptual_hash(rgb), reference) <= 2, path
    assert exact >= 0.9 * len(paths), exact


def test_planted_copies_are_caught_and_kept_in_one_split(planted, tmp_path):
    src, copies = planted["src"], planted["copies"]
    manifest = ingest(str(src), str(tmp_path / "ds"), IngestConfig(), summary=False)  # default: group, 20 bits
    info = manifest["near_duplicates"]
    assert info["mode"] == "group" and info["threshold"] == 20 and info["spanning_splits"] == 0
    report = ingest(str(src), str(tmp_path / "report"), IngestConfig(near_duplicates="report"), summary=False)
    found = report["near_duplicates"]
    # The manifest lists only clusters that span splits or classes: the full clustering, to score it, is
    # recomputed here from the same hashes.

    paths = sorted(str(p.relative_to(src)) for p in src.rglob("*.png"))
    hashes = []
    for p in paths:
        with Image.open(src / p) as image:
            hashes.append(perceptual_hash(image.convert("RGB")))
    all_clusters, pairs = clusters(paths, hashes, 20)
    assert pairs == found["pairs"] == info["pairs"] and len(all_clusters) == info["clusters"]
    cluster_of = {p: k for k, c in enumerate(all_clusters) for p in c}

    recall = {}
    for kind in (*CAUGHT, "cropped"):
        planted_pairs = [(orig, copy) for copy, (orig, k) in copies.items() if k == kind]
        hits = sum(1 for orig, copy in planted_pairs if cluster_of.get(orig, -1) == cluster_of.get(copy, -2))
        recall[kind] = hits / len(planted_pairs)
    family = {copy: orig for copy, (orig, _) in copies.items()}
    same = total = 0
    for c in all_clusters:
        for a, b in combinations(c, 2):
            total += 1
            same += family.get(a, a) == family.get(b, b)
    precision = same / total
    print(f"near-duplicates at 20 bits: recall {recall}, pairwise precision {precision:.3f} over {total} pairs")
    assert all(recall[k] >= 0.95 for k in ("resized", "colour")), recall
    assert recall["jpeg"] >= 0.9, recall
    assert recall["cropped"] < 0.5, recall  # documented as not caught
    assert precision >= 0.9, precision

    # group: every cluster inside one split; report: the same split as without detection leaks some families
    rows = _rows(tmp_path / "ds")
    assert all(len({rows[p] for p in c}) == 1 for c in all_clusters)
    plain = ingest(str(src), str(tmp_path / "plain"), IngestConfig(near_duplicates="off"), summary=False)
    assert "near_duplicates" not in plain
    plain_rows = _rows(tmp_path / "plain")
    leaking = [c for c in all_clusters if len({plain_rows[p] for p in c}) > 1]
    assert leaking and found["spanning_splits"] == len(leaking)
    assert plain_rows == _rows(tmp_path / "report")  # report mode moves nothing
    # images outside clusters keep the split they get without detection
    assert all(rows[p] == plain_rows[p] for p in rows if p not in cluster_of)
    assert {tuple(c["paths"]) for c in found["notable"]} == {tuple(c) for c in leaking}
    assert all(c["splits"] == sorted({plain_rows[p] for p in c["paths"]}) for c in found["notable"])


def test_drop_keeps_one_image_per_cluster_and_class(planted, tmp_path):
    src = planted["src"]
    manifest = ingest(str(src), str(tmp_path / "ds"), IngestConfig(near_duplicates="drop"), summary=False)
    info = manifest["near_duplicates"]
    rows = _rows(tmp_path / "ds")
    assert info["dropped"] and not set(info["dropped"]) & set(rows)
    assert manifest["counts"]["near_duplicates_dropped"] == len(info["dropped"])
    counts = manifest["counts"]
    assert len(rows) == counts["kept"] == counts["valid"] - counts["duplicates_dropped"] - len(info["dropped"])
    assert counts["files"] == counts["kept"] + counts["duplicates_dropped"] + len(info["dropped"]) + counts["skipped"]
    copies = planted["copies"]
    dropped_copies = [p for p in info["dropped"] if p in copies]
    assert len(dropped_copies) >= 0.9 * len(copies) * len(CAUGHT) / 4  # the caught copies are gone
    # the originals stay (they sort first in their folder's cluster)
    assert all(copies[p][0] in rows for p in dropped_copies)
    json.dumps(manifest)  # the manifest stays plain JSON


def test_user_groups_joined_by_a_near_duplicate_end_in_one_split(planted, tmp_path):
    src = tmp_path / "src"
    originals = sorted(p for p in planted["src"].rglob("*.png") if "_" not in p.stem)
    for k, path in enumerate(originals):  # 30 "sessions" of 20 images across classes
        out = src / path.parent.name / f"s{k % 30:02d}_{path.name}"
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out)
    # a resized copy of a session-0 image filed under session 7: sessions 0 and 7 must end in one split
    first = sorted(src.rglob("s00_*.png"))[0]
    with Image.open(first) as image:
        _variant(image, "resized").save(first.parent / "s07_copy.png")
    cfg = IngestConfig(group_by=r"/(s\d\d)_")
    manifest = ingest(str(src), str(tmp_path / "ds"), cfg, summary=False)
    rows = _rows(tmp_path / "ds")
    sessions = {}
    for path, split in rows.items():
        sessions.setdefault(path.split("/")[1][:3], set()).add(split)
    assert all(len(s) == 1 for s in sessions.values())
    assert sessions["s00"] == sessions["s07"]
    assert manifest["split"]["groups"]["num_groups"] <= 29  # 30 sessions, two of them joined
    # the Parquet group column keeps the user's groups
    for split in SPLITS:
        for shard in (tmp_path / "ds" / split).glob("*.parquet"):
            table = pq.read_table(shard, columns=["path", "group"]).to_pylist()
            assert all(r["group"] == r["path"].split("/")[1][:3] for r in table)


def test_bad_near_duplicate_settings_are_named():
    with pytest.raises(ConfigError, match="ingest.near_duplicate_threshold: must be in"):
        IngestConfig(near_duplicate_threshold=100)
    from cls_ray.config import load_config

    with pytest.raises(ConfigError, match="ingest.near_duplicates"):
        load_config(None, ["ingest.near_duplicates=sometimes"])
