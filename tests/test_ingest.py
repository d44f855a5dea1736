"""Ingest: real class folders (scikit-learn digits, Fashion-MNIST, Pillow's hostile test images) to Parquet shards on
local disk and on the real S3 server (SeaweedFS), read back through pyarrow."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import PILLOW_IMAGES, free_port, write_digits_folders
from PIL import Image

from cls_ray import storage
from cls_ray.config import IngestConfig
from cls_ray.data.fashion_mnist import CLASSES as FASHION_CLASSES
from cls_ray.data.fashion_mnist import DatasetSourceError, write_fashion_mnist
from cls_ray.data.images import decode_image
from cls_ray.data.ingest import IngestError, ingest
from cls_ray.data.manifest import ManifestError, read_manifest, split_shard_uris
from cls_ray.data.validate import EncodeOptions, validate_file, validate_files

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")


def _cfg(**kw) -> IngestConfig:
    return IngestConfig(**{"num_workers": 2, **kw})


def _read_split(dataset: str, manifest: dict, split: str):
    uris = split_shard_uris(dataset, manifest, split)
    tables = []
    for uri in uris:
        fs, path = storage.resolve(uri)
        tables.append(pq.read_table(path, filesystem=fs))
    return [row for t in tables for row in t.to_pylist()]


def _rows_by_split(dataset: str, manifest: dict) -> dict[str, list[dict]]:
    return {s: _read_split(dataset, manifest, s) for s in SPLITS}


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory) -> Path:
    """200 real digits (20 per class), 16 px PNGs. Read-only."""
    return write_digits_folders(tmp_path_factory.mktemp("small_digits"), per_class=20, size=16)


@pytest.fixture(scope="module")
def digits_dataset(digits_folders, tmp_path_factory) -> tuple[str, dict]:
    dest = str(tmp_path_factory.mktemp("digits_ds") / "ds")
    return dest, ingest(str(digits_folders), dest, _cfg(), summary=False)


# --------------------------------------------------------------------------------------------------------------
# Contents


def test_digits_counts_stratification_and_labels(digits_folders, digits_dataset):
    dest, manifest = digits_dataset
    assert manifest == read_manifest(dest)
    assert manifest["classes"] == [f"digit_{i}" for i in range(10)]
    rows = _rows_by_split(dest, manifest)
    total = sum(len(r) for r in rows.values())
    assert total == len(list(digits_folders.rglob("*.png"))) == 1797
    for split in SPLITS:
        entry = manifest["splits"][split]
        assert len(rows[split]) == entry["num_rows"] == sum(s["num_rows"] for s in entry["shards"])
        counts = Counter(r["label"] for r in rows[split])
        assert [counts[i] for i in range(10)] == entry["class_counts"]
        assert all(n > 0 for n in entry["class_counts"]), f"a class is missing from {split}"
        assert abs(len(rows[split]) / total - {"train": 0.7, "val": 0.15, "test": 0.15}[split]) < 0.01
    seen_paths = set()
    for split_rows in rows.values():
        for row in split_rows[::7]:
            folder = row["path"].split("/")[0]
            assert manifest["classes"][row["label"]] == folder
            img, fmt = decode_image(row["image"], 10**6)
            assert img.size == (row["width"], row["height"]) == (32, 32) and fmt == "PNG"
            assert row["image"] == (digits_folders / row["path"]).read_bytes()  # kept byte for byte
        seen_paths |= {r["path"] for r in split_rows}
    assert len(seen_paths) == total  # no image in two splits
    assert manifest["encoding"]["kept_original"] == 1797 and manifest["skipped"] == []
    assert manifest["split"] == {
        "seed": 0,
        "fractions": {"train": 0.7, "val": 0.15, "test": 0.15},
        "presplit": False,
        "presplit_given": [],
        "carved": [],
    }


def test_same_seed_same_bytes_other_seed_other_split(small_digits, tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    ingest(str(small_digits), a, _cfg(), summary=False)
    ingest(str(small_digits), b, _cfg(num_workers=1), summary=False)
    ingest(str(small_digits), c, _cfg(seed=1), summary=False)
    assert Path(a, "manifest.json").read_bytes() == Path(b, "manifest.json").read_bytes()
    for split in SPLITS:
        assert Path(a, split, "part-00000.parquet").read_bytes() == Path(b, split, "part-00000.parquet").read_bytes()
    ma, mc = read_manifest(a), read_manifest(c)
    paths_a = {r["path"] for r in _read_split(a, ma, "test")}
    paths_c = {r["path"] for r in _read_split(c, mc, "test")}
    assert paths_a != paths_c and len(paths_a) == len(paths_c) == 30  # 3 per class either way


def test_s3_source_and_dest_match_local(small_digits, s3_bucket, tmp_path):
    fs, bucket = storage.resolve(s3_bucket)
    pafs.copy_files(str(small_digits), f"{bucket}/src", destination_filesystem=fs)
    remote = ingest(f"{s3_bucket}/src", f"{s3_bucket}/ds", _cfg(), summary=False)
    local = ingest(str(small_digits), str(tmp_path / "ds"), _cfg(), summary=False)
    assert remote["source"] == f"{s3_bucket}/src"
    assert {**remote, "source": None} == {**local, "source": None}
    rows = _rows_by_split(f"{s3_bucket}/ds", remote)
    assert sum(map(len, rows.values())) == 200
    assert all(r["image"] == (small_digits / r["path"]).read_bytes() for r in rows["val"])
    assert read_manifest(f"{s3_bucket}/ds") == remote
    # local source -> S3 dataset
    assert ingest(str(small_digits), f"{s3_bucket}/ds2", _cfg(), summary=False)["splits"] == local["splits"]


def test_presplit_tree_keeps_split_and_carves_val(small_digits, tmp_path):
    src = tmp_path / "src"
    for path in small_digits.rglob("*.png"):
        split = "test" if int(path.stem) % 4 == 0 else "train"
        (src / split / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, src / split / path.parent.name / path.name)
    n_test = len(list((src / "test").rglob("*.png")))
    manifest = ingest(str(src), str(tmp_path / "ds"), _cfg(), summary=False)
    assert manifest["split"]["presplit"] and manifest["split"]["carved"] == ["val"]
    rows = _rows_by_split(str(tmp_path / "ds"), manifest)
    given_test = {f"test/{p.parent.name}/{p.name}" for p in (src / "test").rglob("*.png")}
    assert {r["path"] for r in rows["test"]} == given_test
    assert len(rows["test"]) == n_test
    assert all(r["path"].startswith("train/") for r in rows["train"] + rows["val"])
    assert all(n >= 1 for n in manifest["splits"]["val"]["class_counts"])
    assert manifest["classes"] == [f"digit_{i}" for i in range(10)]
    assert all(manifest["classes"][r["label"]] == r["path"].split("/")[1] for r in rows["val"])
    # all three splits given: nothing carved, nothing moved
    shutil.copytree(src / "test", src / "val")
    for p in (src / "val").rglob("*.png"):
        p.write_bytes(p.read_bytes() + b"\0")  # distinct files, not duplicates of test/
    full = ingest(str(src), str(tmp_path / "ds3"), _cfg(), summary=False)
    assert full["split"]["carved"] == [] and full["splits"]["val"]["num_rows"] == n_test


# --------------------------------------------------------------------------------------------------------------
# Hostile input


_NOT_READ = ("symlink_outside_source", "symlink_dir", "not_a_regular_file", "bad_filename")


def test_pillow_images_and_odd_files(small_digits, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(PILLOW_IMAGES, src / "odd", symlinks=True)
    shutil.copytree(small_digits / "digit_1", src / "digit_1")
    (src / "digit_1" / "empty.png").write_bytes(b"")
    (src / "digit_1" / ".hidden.png").write_bytes((small_digits / "digit_2").iterdir().__next__().read_bytes())
    (src / ".cache").mkdir()
    (src / ".cache" / "x.png").write_bytes(b"junk")
    outside = tmp_path / "outside.png"
    shutil.copy(next((small_digits / "digit_3").iterdir()), outside)
    (src / "digit_1" / "link_out.png").symlink_to(outside)
    (src / "digit_1" / "linked_out_dir").symlink_to(small_digits / "digit_4")
    (src / "digit_1" / "linked_in_dir").symlink_to(src / "odd" / "bmp")
    os.mkfifo(src / "digit_1" / "pipe.png")  # reading it would block forever
    bad_name = os.path.join(os.fsencode(src / "digit_1"), b"bad\xff.png")
    with open(bad_name, "wb") as f:
        f.write((src / "digit_1" / "empty.png").read_bytes())
    n_files = sum(1 for p in PILLOW_IMAGES.rglob("*") if p.is_file() and not p.is_symlink()) + 21  # digits, empty.png
    manifest = ingest(str(src), str(tmp_path / "ds"), _cfg(file_timeout_s=60), summary=False)
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert reasons["odd/decompression_bomb.gif"] == "too_many_pixels"
    assert reasons["odd/truncated_jpeg.jpg"] == "corrupt"
    assert reasons["odd/truncated_image.png"] == "corrupt"
    assert reasons["odd/LICENSE"] == "not_an_image"
    assert reasons["digit_1/empty.png"] == "empty"
    assert reasons["digit_1/link_out.png"] == "symlink_outside_source"
    assert reasons["digit_1/linked_out_dir"] == "symlink_outside_source"
    assert reasons["digit_1/linked_in_dir"] == "symlink_dir"
    assert reasons["digit_1/pipe.png"] == "not_a_regular_file"
    assert reasons["digit_1/bad\\xff.png"] == "bad_filename"
    assert not any(".hidden" in p or ".cache" in p for p in reasons)
    rows = _rows_by_split(str(tmp_path / "ds"), manifest)
    kept = [r for split_rows in rows.values() for r in split_rows]
    assert all(".hidden" not in r["path"] and "link_out" not in r["path"] for r in kept)
    assert len(kept) > 500  # the decodable majority of Pillow's files is kept
    assert manifest["counts"]["files"] == n_files
    assert manifest["counts"]["files"] == len(kept) + manifest["counts"]["duplicates_dropped"] + sum(
        1 for s in manifest["skipped"] if s["reason"] not in _NOT_READ
    )
    by_path = {r["path"]: r for r in kept}
    for name in ("hopper_orientation_6.jpg", "16bit.cropped.tif", "hopper_gray.jpg", "rgba.png", "cmyk.jpg"):
        matches = [p for p in by_path if p.endswith("/" + name)]
        for p in matches:  # every stored image decodes to RGB with its recorded size
            img = Image.open(io.BytesIO(by_path[p]["image"]))
            assert img.convert("RGB").size == (by_path[p]["width"], by_path[p]["height"])
    assert manifest["encoding"]["reencoded"] > 0 and manifest["encoding"]["kept_original"] > 0


def test_exif_rotation_and_alpha_are_baked_in(tmp_path):
    src = tmp_path / "src"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    img.save(src / "a" / "rot.jpg", exif=exif)
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(src / "b" / "clear.png")
    Image.new("RGB", (900, 300), (0, 90, 0)).save(src / "b" / "big.png")
    Image.new("CMYK", (12, 12), (0, 255, 255, 0)).save(src / "a" / "cmyk.jpg")
    opts = EncodeOptions(max_pixels=10**7, max_side=512, jpeg_quality=90)
    rot = validate_file(str(src / "a" / "rot.jpg"), opts)
    assert rot["encoding"] == "jpeg" and (rot["width"], rot["height"]) == (20, 40)
    clear = validate_file(str(src / "b" / "clear.png"), opts)
    assert clear["encoding"] == "png" and Image.open(io.BytesIO(clear["image"])).convert("RGB").getpixel((5, 5)) == (
        255,
        255,
        255,
    )
    big = validate_file(str(src / "b" / "big.png"), opts)
    assert big["resized"] and (big["width"], big["height"]) == (512, 171) and big["encoding"] == "png"
    cmyk = validate_file(str(src / "a" / "cmyk.jpg"), opts)
    assert cmyk["encoding"] == "jpeg" and Image.open(io.BytesIO(cmyk["image"])).mode == "RGB"


def test_oversized_file_refused_unread(tmp_path):
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(17 * 1024 * 1024)  # sparse: never read
    result = validate_file(str(big), EncodeOptions(max_pixels=1000, max_side=512, jpeg_quality=90))
    assert result["reason"] == "file_too_large" and "ingest.max_pixels=1000" in result["detail"]


def crash_or_hang(uri: str, opts: EncodeOptions) -> dict:
    """Worker function for the pool test: a real segfault and a real hang on two named files."""
    if uri.endswith("crash.png"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if uri.endswith("hang.png"):
        time.sleep(3600)
    return validate_file(uri, opts)


@pytest.mark.parametrize("files_per_task", [1, 8])
def test_crashed_or_hung_worker_refuses_only_that_file(small_digits, files_per_task):
    """One file per task, and 8 files per task (the default batching): a task that crashes or hangs is run again a
    file at a time, so only the crashing and the hanging file are refused and every other file is validated."""
    files = sorted(str(p) for p in small_digits.rglob("*.png"))
    uris = files[:50] + ["/x/crash.png"] + files[50:120] + ["/x/hang.png"] + files[120:]
    opts = EncodeOptions(10**7, 512, 90)
    started = time.monotonic()
    yielded = list(validate_files(uris, opts, 2, timeout_s=5.0, validate=crash_or_hang, files_per_task=files_per_task))
    assert time.monotonic() - started < 60
    assert sorted(i for i, _ in yielded) == list(range(len(uris)))  # every file exactly once
    results = dict(yielded)
    assert results[50]["reason"] == "decoder_crash" and results[121]["reason"] == "timeout"
    assert all("sha256" in results[i] for i in range(len(uris)) if i not in (50, 121))
    assert results[0] == validate_file(uris[0], opts)


def test_kept_jpegs_are_checked_by_their_luma_plane_as_strictly_as_by_a_full_decode(tmp_path):
    """Every JPEG among Pillow's test images (truncated, corrupt, odd markers, EXIF, CMYK, grayscale, MPO), through
    the pool both ways: the luma-only decode of files kept as they are refuses exactly what a full RGB decode
    refuses, records the same facts, and gives nearly the same perceptual hash (tiny and blank images aside)."""
    jpegs = sorted(str(p) for p in PILLOW_IMAGES.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".mpo"))
    assert len(jpegs) > 50
    luma = dict(validate_files(jpegs, EncodeOptions(10**8, 4096, 90, phash=True), 2, timeout_s=60.0))
    full = dict(validate_files(jpegs, EncodeOptions(10**8, 4096, 90, phash=True, luma_jpeg=False), 2, timeout_s=60))
    compared = 0
    for i, uri in enumerate(jpegs):
        a, b = luma[i], full[i]
        assert a.get("reason") == b.get("reason"), uri
        if "reason" in a:
            continue
        assert {k: v for k, v in a.items() if k != "phash"} == {k: v for k, v in b.items() if k != "phash"}, uri
        with Image.open(uri) as image:
            blank = np.asarray(image.convert("L")).std() < 16  # an almost constant image's hash is noise
        if a["encoding"] == "original" and min(a["width"], a["height"]) >= 32 and not blank:
            # libjpeg's DCT-scaled luma against a box reduction of the full decode, by the same power of two
            distance = sum(bin(x ^ y).count("1") for x, y in zip(a["phash"], b["phash"], strict=True))
            assert distance <= 8, (uri, distance)
            compared += 1
    assert compared >= 20 and sum("reason" in r for r in luma.values()) >= 2  # both kinds really seen

    from cls_ray.data.images import inspect_image

    data = (PILLOW_IMAGES / "flower.jpg").read_bytes()
    checked = inspect_image(data, 10**8, keep_jpeg_side=4096)
    assert checked.luma_only and checked.image.mode == "L" and checked.size == (480, 360)
    assert checked.image.size == (120, 90)  # DCT-scaled by 1/4: the smallest scale with a short side >= 64 px
    assert not inspect_image(data, 10**8, keep_jpeg_side=400).luma_only  # too large to keep: fully decoded
    assert not inspect_image(data, 10**8).luma_only


def test_duplicates_and_label_conflicts(small_digits, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(small_digits, src)
    same = sorted((src / "digit_0").iterdir())[0]
    shutil.copy(same, src / "digit_0" / "zz_copy.png")
    conflict = sorted((src / "digit_1").iterdir())[0]
    shutil.copy(conflict, src / "digit_2" / "conflict.png")
    manifest = ingest(str(src), str(tmp_path / "ds"), _cfg(), summary=False)
    dups = {tuple(d["paths"]): d for d in manifest["duplicates"]}
    plain = dups[(f"digit_0/{same.name}", "digit_0/zz_copy.png")]
    assert plain["label_conflict"] is False and plain["kept"] == f"digit_0/{same.name}"
    clash = dups[(f"digit_1/{conflict.name}", "digit_2/conflict.png")]
    assert clash["label_conflict"] is True and clash["kept"] is None and clash["classes"] == ["digit_1", "digit_2"]
    paths = {r["path"] for rows in _rows_by_split(str(tmp_path / "ds"), manifest).values() for r in rows}
    assert "digit_0/zz_copy.png" not in paths and f"digit_0/{same.name}" in paths
    assert f"digit_1/{conflict.name}" not in paths and "digit_2/conflict.png" not in paths
    assert manifest["counts"]["duplicates_dropped"] == 3 and len(paths) == 200 - 1


# --------------------------------------------------------------------------------------------------------------
# Bad input: a clear error, and no manifest.json


def _only_classes(tmp_path: Path, small_digits: Path, *names: str) -> Path:
    src = tmp_path / "src"
    for name in names:
        shutil.copytree(small_digits / name, src / name)
    return src


@pytest.mark.parametrize(
    "case", ["missing", "empty", "single_class", "class_without_valid_image", "dest_not_writable", "dest_foreign"]
)
def test_bad_local_input(case, small_digits, tmp_path):
    src, dest = tmp_path / "src", tmp_path / "ds"
    if case == "missing":
        message = "does not exist"
    elif case == "empty":
        src.mkdir()
        message = "holds no class folders"
    elif case == "single_class":
        src = _only_classes(tmp_path, small_digits, "digit_0")
        message = "at least 2"
    elif case == "class_without_valid_image":
        src = _only_classes(tmp_path, small_digits, "digit_0", "digit_1")
        (src / "broken").mkdir()
        shutil.copy(PILLOW_IMAGES / "truncated_jpeg.jpg", src / "broken" / "a.jpg")
        (src / "hollow").mkdir()
        message = "broken (0), hollow (0)"
    elif case == "dest_not_writable":
        src = _only_classes(tmp_path, small_digits, "digit_0", "digit_1")
        (tmp_path / "file").write_text("not a directory")
        dest = tmp_path / "file" / "ds"
        message = "not writable"
    else:
        src = _only_classes(tmp_path, small_digits, "digit_0", "digit_1")
        dest.mkdir()
        (dest / "notes.txt").write_text("mine")
        message = "not empty and not a cls-ray dataset"
    with pytest.raises(IngestError, match="SRC|DEST") as info:
        ingest(str(src), str(dest), _cfg(), summary=False)
    assert message in str(info.value)
    assert not (dest / "manifest.json").exists() if dest.parent.is_dir() else True
    if case == "dest_foreign":
        assert (dest / "notes.txt").read_text() == "mine"


def test_s3_unreachable_endpoint_fails_fast(small_digits, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    started = time.monotonic()
    with pytest.raises(IngestError, match="is the S3 endpoint reachable"):
        ingest(str(small_digits), "s3://nowhere/ds", _cfg(), summary=False)
    with pytest.raises(IngestError, match="is the S3 endpoint reachable"):
        ingest("s3://nowhere/src", str(tmp_path / "ds"), _cfg(), summary=False)
    assert time.monotonic() - started < 30
    assert not (tmp_path / "ds").exists()


def test_s3_missing_bucket(small_digits, s3_server):
    with pytest.raises(IngestError, match="DEST is not writable.*bucket"):
        ingest(str(small_digits), "s3://no-such-bucket-cls-ray/ds", _cfg(), summary=False)


def test_s3_wrong_credentials(small_digits, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")  # the real server checks every request's SigV4 signature
    with pytest.raises(IngestError, match="check the AWS credentials"):
        ingest(str(small_digits), f"{s3_bucket}/ds", _cfg(), summary=False)


def test_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match=r"is not a cls-ray dataset: no manifest.json \(run `cls-ray ingest`"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99, "classes": [], "splits": {}}))
    with pytest.raises(ManifestError, match="unknown manifest format_version 99"):
        read_manifest(str(tmp_path))


# --------------------------------------------------------------------------------------------------------------
# Re-runs and the CLI


def test_rerun_is_noop_overwrite_rewrites_incomplete_is_cleaned(small_digits, tmp_path):
    dest = tmp_path / "ds"
    first = ingest(str(small_digits), str(dest), _cfg(), summary=False)
    shard = dest / "train" / "part-00000.parquet"
    original = shard.read_bytes()
    shard.write_bytes(original + b"tampered")
    assert ingest(str(small_digits), str(dest), _cfg(), summary=False) == first
    assert shard.read_bytes() == original + b"tampered"  # untouched: a no-op
    assert ingest(str(small_digits), str(dest), _cfg(overwrite=True), summary=False) == first
    assert shard.read_bytes() == original  # rewritten
    # a shard deleted behind our back: the manifest no longer stands, the dataset is rewritten
    (dest / "val" / "part-00000.parquet").unlink()
    assert ingest(str(small_digits), str(dest), _cfg(), summary=False) == first
    assert (dest / "val" / "part-00000.parquet").exists()
    # an interrupted earlier run: shards (one stale) but no manifest
    (dest / "manifest.json").unlink()
    shutil.copy(shard, dest / "train" / "part-00099.parquet")
    assert ingest(str(small_digits), str(dest), _cfg(), summary=False) == first
    assert not (dest / "train" / "part-00099.parquet").exists()


def test_cli_ingest_success_and_error(small_digits, tmp_path):
    cli = (
        [str(REPO / ".venv" / "bin" / "cls-ray")]
        if (REPO / ".venv" / "bin" / "cls-ray").exists()
        else [sys.executable, "-m", "cls_ray.cli"]
    )
    ok = subprocess.run(
        [*cli, "ingest", str(small_digits), str(tmp_path / "ds"), "--set", "ingest.seed=3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "dataset: 10 classes" in ok.stdout and "imbalance ratio" in ok.stdout
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["split"]["seed"] == 3
    bad = subprocess.run(
        [*cli, "ingest", str(tmp_path / "nope"), str(tmp_path / "ds2")], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 1
    assert "does not exist" in bad.stderr and str(tmp_path / "nope") in bad.stderr
    assert not (tmp_path / "ds2" / "manifest.json").exists()


# --------------------------------------------------------------------------------------------------------------
# Fashion-MNIST


def test_fashion_mnist_subset_written_and_ingested(tmp_path):
    dest = tmp_path / "fm"
    info = write_fashion_mnist(str(dest), limit_per_class=12)
    assert info["counts"] == {"train": 120, "test": 120}
    assert sorted(p.name for p in (dest / "train").iterdir()) == sorted(FASHION_CLASSES)
    img = Image.open(next((dest / "test" / "Trouser").iterdir()))
    assert img.size == (28, 28) and img.mode == "L"
    mtime = (dest / "train" / "Bag").stat().st_mtime_ns
    assert write_fashion_mnist(str(dest), limit_per_class=12) == info  # complete: skipped
    assert (dest / "train" / "Bag").stat().st_mtime_ns == mtime
    manifest = ingest(str(dest), str(tmp_path / "ds"), _cfg(), summary=False)
    assert manifest["classes"] == sorted(FASHION_CLASSES)
    assert manifest["splits"]["test"]["class_counts"] == [12] * 10
    assert manifest["splits"]["val"]["class_counts"] == [2] * 10  # 15% of 12 train images, rounded
    assert manifest["split"]["carved"] == ["val"]


def test_fashion_mnist_missing_source_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetSourceError, match="apt-get install dataset-fashion-mnist") as info:
        write_fashion_mnist(str(tmp_path / "fm"), source_dir=str(tmp_path))
    assert "train-images-idx3-ubyte.gz" in str(info.value) and "--source" in str(info.value)
