"""The training benchmarks run end to end at tiny sizes and account for every image and step they time.

Real runs: real Fashion-MNIST JPEGs ingested to Parquet, real Ray instances started by the benchmarks themselves
(``address="local"``), a real ``torchrun`` DDP baseline and real Ray Train runs of cls-ray's trainer. No timing is
asserted (the numbers of a shared 2-core machine mean nothing); what is asserted is that every run measured what it
claims to: the images each epoch delivers, the steps each run timed, and finite positive rates and ratios.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench")


def _positive(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_input_pipeline_counts_every_image_in_every_run(workdir):
    import input_pipeline

    n, batch, epochs = 60, 8, 1
    record = input_pipeline.main(
        [
            "--num-images",
            str(n),
            "--side",
            "64",
            "--image-size",
            "32",
            "--batch-size",
            str(batch),
            "--epochs",
            str(epochs),
            "--warmup-epochs",
            "1",
            "--cores",
            "2",
            "--workdir",
            str(workdir),
            "--object-store-mb",
            "200",
            "--runs",
            "bare,imagefolder,cls_ray,ffcv",
        ]
    )
    results = record["results"]
    assert results["bare"]["timed_images"] == epochs * n
    assert results["imagefolder"]["timed_images"] == epochs * n
    # cls-ray's train iterator drops the last partial batch (equal steps on every DDP rank).
    assert results["cls_ray"]["timed_images"] == epochs * (n // batch) * batch
    assert results["ffcv"]["timed_images"] == epochs * (n // batch) * batch  # FFCV drops it too
    assert results["bare"]["cores"] == 1 and results["cls_ray"]["cores"] == results["ffcv"]["cores"] == 2
    for key in (
        "cls_ray_per_core_vs_bare",
        "cls_ray_per_cpu_s_vs_bare",
        "cls_ray_vs_imagefolder",
        "ffcv_per_core_vs_bare",
        "ffcv_vs_imagefolder",
    ):
        assert _positive(record[key]), key


def test_train_overhead_times_the_same_steps_in_both_runs(workdir, monkeypatch):
    import train_overhead

    # Epochs of a fraction of a second: the controller must collect each report apart from the next.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    steps, epochs = 3, 1
    record = train_overhead.main(
        [
            "--image-size",
            "32",
            "--batch-size",
            "4",
            "--steps-per-epoch",
            str(steps),
            "--epochs",
            str(epochs),
            "--runs",
            "baseline,baseline_jemalloc,cls_ray",
            "--cores",
            "2",
            "--workdir",
            str(workdir),
        ]
    )
    (baseline,), (with_jemalloc,) = record["baseline"], record["baseline_jemalloc"]
    candidate = record["cls_ray"]
    assert baseline["steps"] == with_jemalloc["steps"] == candidate["steps"] == steps * epochs
    assert baseline["world_size"] == 2 and baseline["threads_per_rank"] == 1
    # Warm-up epoch, timed epochs and the final validation epoch all ran through cls-ray's loop.
    assert len(candidate["epoch_time_s"]) == epochs + 2
    for suffix in ("", "_vs_jemalloc_baseline"):
        for key in ("ratio_steps_per_s", "ratio_between_reports_steps_per_s", "ratio_cpu_s_per_step"):
            assert _positive(record[key + suffix]), key + suffix


def test_allocator_runs_each_allocator_it_names():
    import allocator

    record = allocator.main(["--sizes", "32", "--batch-size", "4", "--seconds", "0.5", "--repeats", "1"])
    runs = record["sizes"][32]
    assert [r["jemalloc"] for r in runs["system"]] == [False] and [r["jemalloc"] for r in runs["jemalloc"]] == [True]
    assert all(r["steps"] >= 3 for r in runs["system"] + runs["jemalloc"])
    assert _positive(runs["ratio_steps_per_s"])


def test_gpu_resnet50_runs_end_to_end_on_cpu(workdir):
    import gpu_resnet50

    n, batch, epochs = 200, 8, 1  # the dataset of the train_overhead test (cached)
    record = gpu_resnet50.main(
        [
            "--device",
            "cpu",
            "--model",
            "resnet10t",
            "--image-size",
            "32",
            "--batch-size",
            str(batch),
            "--amp",
            "none",
            "--num-images",
            str(n),
            "--side",
            "64",
            "--epochs",
            str(epochs),
            "--val-fraction",
            "0.2",
            "--synthetic-steps",
            "2",
            "--shuffle",
            "local",
            "--cores",
            "2",
            "--workdir",
            str(workdir),
        ]
    )
    assert _positive(record["synthetic"]["images_per_s"])
    run = record["cls_ray"]["local"]
    from cls_ray.data.manifest import read_manifest

    dataset = workdir / f"fmnist-{n}-64px-val0.2" / "dataset"
    train_rows = read_manifest(str(dataset))["splits"]["train"]["num_rows"]
    assert run["timed_images"] == epochs * (train_rows // batch) * batch
    assert _positive(run["ratio_vs_synthetic"])


def test_predict_scores_every_file_in_both_runs(workdir):
    import predict

    record = predict.main(
        [
            "--images",
            "120",
            "--side",
            "48",
            "--image-size",
            "32",
            "--batch-size",
            "16",
            "--cores",
            "2",
            "--workdir",
            str(workdir),
        ]
    )
    assert record["images"] == record["scored"] == 120
    for key in ("baseline_images_per_s", "cls_ray_images_per_s", "speedup", "per_core_vs_baseline"):
        assert _positive(record[key]), key
