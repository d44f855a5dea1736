"""``cls-ray predict`` on a real Ray instance: a nested tree with Pillow's odd and hostile test images gets exactly
one row per file (refused ones with a reason), the probabilities are those of the serving path (``Predictor``), a
re-run skips what is written, and the same works from and to the S3 server."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import ray
from conftest import PILLOW_IMAGES

from cls_ray import predict as predict_mod
from cls_ray import storage
from cls_ray.cli import main as cli_main
from cls_ray.config import PredictConfig
from cls_ray.predict import SUMMARY_FILE, Predictor, predict, read_predictions

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    ray.init(address="local", num_cpus=2, object_store_memory=300 * 1024**2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory, trained_package) -> Path:
    """Digits two folders deep, every Pillow test image (odd, broken, hostile), a hidden file and a text file."""
    root = tmp_path_factory.mktemp("predict-src")
    for class_dir in sorted(trained_package["folders"].iterdir()):
        dest = root / "new" / "batch-1" / class_dir.name
        dest.mkdir(parents=True)
        for path in sorted(class_dir.glob("*.png"))[:6]:
            shutil.copy(path, dest / path.name)
    shutil.copytree(PILLOW_IMAGES, root / "pillow")
    (root / ".DS_Store").write_bytes(b"hidden")
    (root / "new" / "notes.txt").write_text("not an image")
    return root


def _files(root: Path) -> list[str]:
    return sorted(
        str(p)
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def test_every_file_gets_one_row_with_the_serving_probabilities(
    ray_cluster, trained_package, image_tree, tmp_path, monkeypatch
):
    package = str(trained_package["package"])
    missing = str(image_tree / "new" / "deleted-after-listing.png")  # listed, then gone before it is read
    listed = predict_mod.list_inputs
    monkeypatch.setattr(predict_mod, "list_inputs", lambda src, ext=None: sorted(listed(src, ext) + [missing]))
    dest = tmp_path / "out"
    cfg = PredictConfig(files_per_output=150, top_k=3)
    summary = predict(package, str(image_tree), str(dest), cfg)

    table = read_predictions(str(dest))
    expected = sorted(_files(image_tree) + [missing])
    assert table["path"].to_pylist() == expected  # one row per file, in order; the hidden file is not an input
    assert summary["files"] == len(expected) == summary["scored"] + summary["refused"]
    rows = {r["path"]: r for r in table.to_pylist()}
    assert rows[missing]["error"].startswith("unreadable:") and missing in rows[missing]["error"]
    assert rows[str(image_tree / "new" / "notes.txt")]["error"].startswith("not_an_image")
    refused = [r for r in rows.values() if r["error"] is not None]
    assert len(refused) == summary["refused"] >= 20  # Pillow's broken files, each with its reason
    assert all(r["top_k_classes"] is None and r["top_1"] is None for r in refused)
    assert {r["model_name"] for r in rows.values()} == {"digits"}

    # The same images through the serving path give the same probabilities.
    predictor = Predictor.from_uri(package)
    digits = [p for p in expected if "/new/batch-1/" in p]
    probs = predictor.predict_batch([predictor.preprocess(Path(p).read_bytes()) for p in digits])
    for path, row in zip(digits, probs, strict=True):
        best = np.argsort(-row)[:3]
        assert rows[path]["top_k_classes"] == [predictor.classes[i] for i in best]
        assert np.allclose(rows[path]["top_k_probabilities"], row[best], atol=1e-5)
    truth = [Path(p).parent.name for p in digits]
    assert np.mean([rows[p]["top_1"] == t for p, t in zip(digits, truth, strict=True)]) >= 0.8

    # A re-run skips every output file already written; a lost one is written again, and only that one.
    parts = sorted(p for p in dest.iterdir() if p.name.startswith("part-"))
    assert len(parts) == -(-len(expected) // 150)
    stamps = {p.name: p.stat().st_mtime_ns for p in parts}
    parts[1].unlink()
    again = predict(package, str(image_tree), str(dest), cfg)
    assert {k: v for k, v in again.items() if k != "timing"} == {k: v for k, v in summary.items() if k != "timing"}
    for p in parts:
        assert p.exists() and (p == parts[1] or p.stat().st_mtime_ns == stamps[p.name])
    rerun = read_predictions(str(dest))
    assert rerun.drop_columns(["top_k_probabilities", "top_1_probability"]).equals(
        table.drop_columns(["top_k_probabilities", "top_1_probability"])
    )
    assert np.allclose(
        rerun["top_1_probability"].to_numpy(zero_copy_only=False).astype(float),
        table["top_1_probability"].to_numpy(zero_copy_only=False).astype(float),
        atol=1e-5,
        equal_nan=True,
    )  # float rounding differs with the batch a file was scored in


def test_cli_writes_csv_and_a_changed_model_rescores(ray_cluster, trained_package, image_tree, tmp_path, capsys):
    dest = tmp_path / "csv"
    code = cli_main(
        [
            "predict",
            str(trained_package["package"]),
            str(image_tree / "new"),
            str(dest),
            "--set",
            "predict.format=csv",
            "--set",
            "predict.top_k=2",
            "--show",
            "3",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "scored 60 of 61 files" in out and "not_an_image 1" in out
    (part,) = [p for p in dest.iterdir() if p.name.startswith("part-")]
    header, *lines = part.read_text().splitlines()
    assert header.split(",")[:5] == ['"path"', '"top_k_classes"', '"top_k_probabilities"', '"error"', '"top_1"']
    assert len(lines) == 61 and all(len(line.split(",")[1].split(";")) in (1, 2) for line in lines)
    # Settings that change the answers (here top-k) name new output files; the old ones are removed.
    assert (
        cli_main(
            [
                "predict",
                str(trained_package["package"]),
                str(image_tree / "new"),
                str(dest),
                "--set",
                "predict.format=csv",
                "--set",
                "predict.top_k=3",
            ]
        )
        == 0
    )
    (new_part,) = [p for p in dest.iterdir() if p.name.startswith("part-")]
    assert new_part.name != part.name


def test_from_and_to_s3(ray_cluster, trained_package, image_tree, s3_bucket):
    src = f"{s3_bucket}/incoming"
    for path in sorted((image_tree / "new").rglob("*.png"))[:20]:
        storage.write_bytes(f"{src}/{path.relative_to(image_tree / 'new')}", path.read_bytes())
    storage.write_bytes(f"{src}/broken.jpg", b"\xff\xd8\xff\xe0 truncated")
    dest = f"{s3_bucket}/predictions"
    summary = predict(str(trained_package["package"]), src, dest, PredictConfig(files_per_output=8))

    assert summary["files"] == 21 and summary["refused"] == 1 and len(summary["outputs"]) == 3
    assert storage.exists(storage.join(dest, SUMMARY_FILE))
    table = read_predictions(dest)
    assert table.num_rows == 21 and all(p.startswith(f"{src}/") for p in table["path"].to_pylist())
    predictor = Predictor.from_uri(str(trained_package["package"]))
    for row in table.to_pylist():
        if row["error"] is None:
            probs = predictor.predict_batch([predictor.preprocess(storage.read_bytes(row["path"]))])[0]
            assert row["top_1"] == predictor.classes[int(np.argmax(probs))]
        else:
            assert row["path"] == f"{src}/broken.jpg"
