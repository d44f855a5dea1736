"""The metrics history and checkpoints stay small: at 1,000 classes over many epochs, a checkpoint does not grow with
the epochs and the bytes a run writes grow linearly with them (no per-epoch rewrite of the whole history, no
confusion matrices in the history). A resumed run rewrites only the epochs after its checkpoint. No Ray needed."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cls_ray.config import load_config
from cls_ray.metrics import ClassificationMetrics
from cls_ray.models import data_config_for
from cls_ray.train.history import HISTORY_DIR, drop_records_after, read_history
from cls_ray.train.loop import end_epoch
from cls_ray.train.spec import RunSpec
from cls_ray.train.state import META_FILE, Progress, capture_rng_state, read_evaluation, read_progress, save_train_state
from cls_ray.train.step import build_worker

NUM_CLASSES = 1000
EPOCHS = 150


def _evaluation(seed: int) -> tuple[dict[str, float], dict]:
    """A real validation pass's output at 1,000 classes (2,000 samples of random logits)."""
    g = torch.Generator().manual_seed(seed)
    metrics = ClassificationMetrics(NUM_CLASSES)
    metrics.update(torch.randn(2000, NUM_CLASSES, generator=g), torch.randint(0, NUM_CLASSES, (2000,), generator=g))
    scalars, details = metrics.compute()
    return {f"val_{k}": v for k, v in scalars.items()}, details


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_checkpoints_stay_constant_and_history_bytes_grow_linearly_at_1000_classes(tmp_path):
    cfg = load_config(
        None, ["model.name=resnet10t", "model.image_size=32", "optim.warmup_epochs=0", f"train.epochs={EPOCHS}"]
    )
    classes = [f"c{i}" for i in range(NUM_CLASSES)]
    spec = RunSpec(
        classes=classes,
        class_counts=[1] * NUM_CLASSES,
        data_config=data_config_for(cfg.model),
        run_uri=str(tmp_path / "run"),
        updates_per_epoch=1,
    )
    w = build_worker(cfg, spec, torch.device("cpu"))
    scalars, details = _evaluation(0)
    progress = Progress()
    record_sizes: list[int] = []
    checkpoint_sizes: dict[int, tuple[int, int]] = {}
    for epoch in range(1, EPOCHS + 1):
        progress.epoch, progress.num_updates, progress.last_eval = epoch, epoch, scalars
        metrics = {
            "epoch": epoch,
            "train_loss": 1.0 / epoch,
            "img_per_s": 100.0,
            "data_wait_frac": 0.1,
            "epoch_time_s": 1.0,
            "lr": 1e-3,
            **scalars,
        }
        evaluated = epoch % 2 == 0
        before = _dir_bytes(Path(spec.run_uri)) if Path(spec.run_uri).exists() else 0
        end_epoch(spec.run_uri, progress, metrics, details if evaluated else None)
        record_sizes.append(_dir_bytes(Path(spec.run_uri)) - before)
        if evaluated and epoch in (2, EPOCHS // 2, EPOCHS):  # three real checkpoints, early, middle and last
            directory = tmp_path / f"checkpoint-{epoch}"
            save_train_state(str(directory), w.objs, progress, [capture_rng_state()], details)
            checkpoint_sizes[epoch] = (_dir_bytes(directory), os.path.getsize(directory / META_FILE))

    # A checkpoint holds this epoch's state only: the same size at the last epoch as at the first evaluation
    # (to within the digits of the counters), metadata of a few hundred bytes.
    first, *_, last = checkpoint_sizes.values()
    assert abs(last[0] - first[0]) < 64, checkpoint_sizes
    assert last[1] < 2_000, checkpoint_sizes
    saved = tmp_path / f"checkpoint-{EPOCHS}"
    assert read_progress(str(saved)).epoch == EPOCHS
    assert len(read_evaluation(str(saved))["confusion_matrix"]) == NUM_CLASSES

    # Each epoch writes one record of a size that does not grow with the epoch (an evaluation epoch's per-class
    # table is O(classes), ~100 kB at 1,000 classes; no confusion matrix), so bytes written are linear in epochs.
    evaluated_sizes, plain_sizes = record_sizes[1::2], record_sizes[0::2]
    assert max(evaluated_sizes) - min(evaluated_sizes) < 64 and max(plain_sizes) - min(plain_sizes) < 64
    assert max(evaluated_sizes) < 150_000
    assert sum(record_sizes) <= EPOCHS * max(record_sizes)
    history = read_history(spec.run_uri)
    assert [r["epoch"] for r in history] == list(range(1, EPOCHS + 1))
    assert all("confusion_matrix" not in r for r in history)
    assert len(history[1]["per_class"]) == NUM_CLASSES and "per_class" not in history[0]


def test_a_resumed_run_replaces_only_the_epochs_after_its_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    first_attempt = Progress()
    for epoch in range(1, 6):  # ran to epoch 5, last checkpoint at epoch 3
        first_attempt.epoch = epoch
        end_epoch(run, first_attempt, {"epoch": epoch, "train_loss": 2.0}, None)
    kept = {p.name: p.read_bytes() for p in (tmp_path / "run" / HISTORY_DIR).iterdir() if p.name < "epoch-000004"}

    assert drop_records_after(run, 3) == [4, 5]
    resumed = Progress(epoch=3, resumed_from=3)
    for epoch in range(4, 7):
        resumed.epoch = epoch
        end_epoch(run, resumed, {"epoch": epoch, "train_loss": 1.0}, None)

    history = read_history(run)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5, 6]
    assert [r["resumed_from"] for r in history] == [None, None, None, 3, 3, 3]
    assert {
        p.name: p.read_bytes() for p in (tmp_path / "run" / HISTORY_DIR).iterdir() if p.name < "epoch-000004"
    } == kept  # records before the checkpoint were never rewritten
