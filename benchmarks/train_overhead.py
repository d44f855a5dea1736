"""Training-loop overhead: steps/s of cls-ray's Ray Train loop against a plain ``torchrun`` DDP script.

Both train the same timm model with the same batch size, optimizer (timm AdamW), loss (cross-entropy with label
smoothing), worker count, threads per worker and cores, on data already in memory, so the only difference is what
cls-ray puts around the step: Ray Train's worker group and controller, Ray Data's iterator, ``ray.train.report``
every epoch, metrics and history bookkeeping.

* baseline: ``torchrun --nproc_per_node=WORKERS benchmarks/ddp_baseline.py`` (synthetic uint8 batches in memory),
  run before and after the candidate; the ratio uses their mean.
* baseline_jemalloc (not run by default): the same, under the allocator cls-ray gives its CPU workers
  (``train.cpu_allocator``: Ray's jemalloc, preloaded, no purging), so the ratio against it is Ray's and cls-ray's
  overhead alone, without what the allocator gains.
* cls_ray: :func:`cls_ray.train.trainer.build_trainer` + ``fit()``, with the train split replaced by a Ray Dataset of
  synthetic uint8 images materialised in the object store before training (so no decoding happens), iterated by
  cls-ray's own loop. Steps/s comes from the loop's own ``epoch_time_s`` of the epochs after the warm-up one (from
  the first batch request to the last step: data waits and the iterator's per-epoch start included). Beside it,
  steps/s between the reports closing the warm-up and the last timed epoch, as the driver sees them (reports and
  history writes included; the controller collects reports every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by
  default, so this view is exact to a few seconds; polling more often costs the workers time). A last, untimed
  epoch runs the validation and checkpoint.

CPU seconds per step are measured too (baseline: all ranks' process time; cls-ray: the whole Ray process tree),
which stay meaningful when other jobs share the machine and wall-clock steps/s do not.

    .venv/bin/python benchmarks/train_overhead.py                          # CPU, 2 workers, resnet10t at 64 px
    .venv/bin/python benchmarks/train_overhead.py --device cuda            # 1 GPU: resnet50 at 224 px, bf16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _data  # noqa: E402

logger = logging.getLogger("benchmarks.train_overhead")
HERE = Path(__file__).resolve().parent
CPU_DEFAULTS = {"model": "resnet10t", "image_size": 64, "batch_size": 32, "amp": "none"}
CUDA_DEFAULTS = {"model": "resnet50", "image_size": 224, "batch_size": 128, "amp": "bf16"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", help="timm architecture (cpu: resnet10t, cuda: resnet50)")
    p.add_argument("--image-size", type=int, help="cpu: 64, cuda: 224")
    p.add_argument("--batch-size", type=int, help="per worker (cpu: 32, cuda: 128)")
    p.add_argument("--amp", choices=["none", "bf16"], help="cpu: none, cuda: bf16")
    p.add_argument("--workers", type=int, help="DDP ranks (cpu: 2, cuda: one per GPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (OMP_NUM_THREADS), both runs")
    p.add_argument("--steps-per-epoch", type=int, default=40)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs, after one warm-up epoch")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="CPUs of the Ray instance")
    p.add_argument(
        "--runs",
        default="baseline,cls_ray,baseline",
        help="comma-separated order of runs: baseline, baseline_jemalloc, cls_ray",
    )
    p.add_argument(
        "--cpu-allocator",
        default="jemalloc",
        choices=["jemalloc", "system"],
        help="cls-ray's train.cpu_allocator (system: as before it preloaded jemalloc)",
    )
    p.add_argument("--workdir", type=Path, default=_data.DEFAULT_WORKDIR)
    args = p.parse_args(argv)
    for key, value in (CUDA_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.workers is None:
        args.workers = _gpu_count() if args.device == "cuda" else 2
    return args


def _gpu_count() -> int:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    return torch.cuda.device_count()


def run_baseline(args: argparse.Namespace, jemalloc: bool = False) -> dict[str, Any]:
    """The plain DDP script under torchrun (``jemalloc``: with the allocator of cls-ray's CPU workers); returns its
    JSON result line."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.workers}",
        str(HERE / "ddp_baseline.py"),
        "--model",
        args.model,
        "--image-size",
        str(args.image_size),
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
        "--amp",
        args.amp,
        "--warmup-steps",
        str(args.steps_per_epoch),
        "--steps",
        str(args.steps_per_epoch * args.epochs),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if jemalloc:
        from cls_ray.train.trainer import jemalloc_env

        if args.device == "cuda":
            raise SystemExit("--runs baseline_jemalloc: cls-ray preloads jemalloc into CPU workers only")
        allocator = jemalloc_env()
        if not allocator:
            raise SystemExit("--runs baseline_jemalloc: this Ray installation ships no libjemalloc.so")
        env.update(allocator)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"ddp_baseline.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def make_config(args: argparse.Namespace, storage_path: str):
    """The cls-ray config of the candidate run: the same model, batch, optimizer and loss as the baseline."""
    from cls_ray.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig

    total_epochs = args.epochs + 2  # warm-up, timed epochs, a final epoch with the validation and checkpoint
    # Ray's CPU resources are bookkeeping here (threads are pinned by OMP_NUM_THREADS): the trainer refuses a worker
    # group that leaves no CPU for decoding, so on a small machine the workers declare a fraction of a CPU each.
    cpus_per_worker = min(1.0, max(0.1, (args.cores - 1) / args.workers))
    return Config(
        model=ModelConfig(name=args.model, image_size=args.image_size, channels_last=True),
        data=DataConfig(
            batch_size=args.batch_size,
            eval_batch_size=args.batch_size,
            auto_augment=None,
            color_jitter=0.0,
            re_prob=0.0,
            label_smoothing=0.1,
        ),
        optim=OptimConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05, sched="none"),
        train=TrainConfig(
            epochs=total_epochs,
            num_workers=args.workers,
            use_gpu=args.device == "cuda",
            cpu_allocator=args.cpu_allocator,
            cpus_per_worker=cpus_per_worker,
            amp=args.amp,
            eval_every=total_epochs,
            storage_path=storage_path,
            run_name="overhead",
            max_failures=0,
        ),
    )


def preloaded_datasets(args: argparse.Namespace, num_classes: int) -> tuple[Any, Any]:
    """Train and val Ray Datasets of synthetic uint8 images (NHWC rows, as decoded ones), materialised up front."""
    import numpy as np
    import ray.data

    side, classes = args.image_size, num_classes

    def synth(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(int(batch["id"][0]))
        n = len(batch["id"])
        return {
            "image": rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8),  # NHWC, as DecodeBatch
            "label": rng.integers(0, classes, n).astype(np.int64),
        }

    rows = args.steps_per_epoch * args.batch_size * args.workers
    train = ray.data.range(rows, override_num_blocks=max(1, rows // 256)).map_batches(synth).materialize()
    val = ray.data.range(args.batch_size * args.workers).map_batches(synth).materialize()
    return train, val


class ReportClock:
    """Ray Train callback (runs on the controller): appends the wall time and the CPU seconds used so far by the
    whole Ray process tree (driver, raylet, GCS, controller, workers) to a JSON-lines file at every report."""

    def __init__(self, path: str, driver_pid: int):
        self.path = path
        self.driver_pid = driver_pid

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        import time

        line = {"epoch": metrics[0].get("epoch"), "t": time.time(), "cpu": _data.tree_cpu_seconds(self.driver_pid)}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


def _user_callback(path: str) -> Any:
    import ray.cloudpickle
    import ray.train

    # The controller cannot import the benchmark modules: ship them by value.
    for module in (sys.modules[__name__], _data):
        if module.__name__ != "__main__":
            ray.cloudpickle.register_pickle_by_value(module)
    callback_cls = type("ReportClockCallback", (ReportClock, ray.train.UserCallback), {})
    return callback_cls(path, os.getpid())


def run_cls_ray(args: argparse.Namespace, data_uri: str) -> dict[str, Any]:
    """cls-ray's trainer and loop on preloaded data, timed between the reports that close the warm-up epoch and
    the last timed epoch (a final, untimed epoch runs the validation and checkpoint)."""
    import ray

    from cls_ray import storage
    from cls_ray.data.manifest import read_manifest
    from cls_ray.train import trainer as trainer_mod
    from cls_ray.train.history import read_history

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("RAY_worker_niceness", "0")  # as the torchrun processes: compete on equal terms
    ray.init(
        address="local",
        num_cpus=args.cores,
        num_gpus=args.workers if args.device == "cuda" else 0,
        object_store_memory=max(
            500 * 2**20, 3 * args.steps_per_epoch * args.batch_size * args.workers * 3 * args.image_size**2
        ),
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        train_ds, val_ds = preloaded_datasets(args, len(read_manifest(data_uri)["classes"]))
        with tempfile.TemporaryDirectory(prefix="cls-ray-overhead-") as tmp:
            cfg = make_config(args, tmp)
            clock_path = os.path.join(tmp, "clock.jsonl")
            with (
                mock.patch.object(trainer_mod, "build_train_dataset", lambda *a, **k: train_ds),
                mock.patch.object(trainer_mod, "build_eval_dataset", lambda *a, **k: val_ds),
            ):
                trainer = trainer_mod.build_trainer(
                    data_uri, cfg, storage_path=tmp, run_name="overhead", callbacks=[_user_callback(clock_path)]
                )
            trainer.fit()
            history = read_history(storage.join(tmp, "overhead"))
            clock = [json.loads(line) for line in Path(clock_path).read_text().splitlines()]
    finally:
        ray.shutdown()
    return summarise_candidate(args, history, clock)


def summarise_candidate(
    args: argparse.Namespace, history: list[dict[str, Any]], clock: list[dict[str, Any]]
) -> dict[str, Any]:
    """Steps/s inside the loop (its own ``epoch_time_s``: first batch request to last step, data waits and the
    iterator's per-epoch start included) and between reports (the driver's view, everything between two epochs'
    ends), and CPU seconds per step, over the timed epochs."""
    steps = args.steps_per_epoch * args.epochs
    first, last = clock[0], clock[args.epochs]  # reports closing epoch 1 (warm-up) and epoch 1 + epochs
    timed = history[1 : 1 + args.epochs]
    loop_seconds = sum(h["epoch_time_s"] for h in timed)
    return {
        "candidate": "cls-ray",
        "steps_per_s": steps / loop_seconds,
        "between_reports_steps_per_s": steps / (last["t"] - first["t"]),
        "cpu_s_per_step": (last["cpu"] - first["cpu"]) / steps,
        "images_per_s": steps * args.batch_size * args.workers / loop_seconds,
        "steps": steps,
        "data_wait_frac": sum(h["data_wait_frac"] * h["epoch_time_s"] for h in timed) / loop_seconds,
        "epoch_time_s": [round(h["epoch_time_s"], 3) for h in history],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not set(runs) <= {"baseline", "baseline_jemalloc", "cls_ray"}:
        raise SystemExit(f"--runs: choose from baseline, baseline_jemalloc, cls_ray (got {args.runs})")
    # The trainer validates a real dataset (manifest, classes, a val split) before it starts; a small one will do.
    _, data_uri = _data.prepare_dataset(200, 64, args.workdir, val_fraction=0.2)
    baselines: dict[str, list[dict[str, Any]]] = {"baseline": [], "baseline_jemalloc": []}
    candidate: dict[str, Any] | None = None
    for name in runs:
        logger.info("running %s", name)
        if name == "cls_ray":
            candidate = run_cls_ray(args, data_uri)
        else:
            baselines[name].append(run_baseline(args, jemalloc=name == "baseline_jemalloc"))
    record: dict[str, Any] = {
        "benchmark": "train_overhead",
        "args": {k: str(v) for k, v in vars(args).items()},
        **baselines,
        "cls_ray": candidate,
        "machine": _data.machine_description(),
    }
    for name, suffix in (("baseline", ""), ("baseline_jemalloc", "_vs_jemalloc_baseline")):
        if baselines[name] and candidate:
            base = sum(b["steps_per_s"] for b in baselines[name]) / len(baselines[name])
            cpu = sum(b["cpu_s_per_step"] for b in baselines[name]) / len(baselines[name])
            record[f"ratio_steps_per_s{suffix}"] = candidate["steps_per_s"] / base
            record[f"ratio_between_reports_steps_per_s{suffix}"] = candidate["between_reports_steps_per_s"] / base
            record[f"ratio_cpu_s_per_step{suffix}"] = candidate["cpu_s_per_step"] / cpu
    print_report(record)
    print(json.dumps(record), flush=True)
    return record


def print_report(record: dict[str, Any]) -> None:
    """The human-readable lines (this is a benchmark script: printing is its output)."""
    for name in ("baseline", "baseline_jemalloc"):
        for b in record[name]:
            print(
                f"{name} torchrun DDP: {b['steps_per_s']:.3f} steps/s ({b['images_per_s']:.1f} img/s, "
                f"{b['cpu_s_per_step']:.3f} CPU-s/step, {b['threads_per_rank']} thread(s) per rank)"
            )
    if record["cls_ray"]:
        c = record["cls_ray"]
        print(
            f"cls-ray Ray Train:     {c['steps_per_s']:.3f} steps/s ({c['images_per_s']:.1f} img/s, "
            f"{c['cpu_s_per_step']:.3f} CPU-s/step, between reports {c['between_reports_steps_per_s']:.3f} steps/s, "
            f"data wait {c['data_wait_frac']:.1%})"
        )
    for name, suffix in (("baseline", ""), ("baseline_jemalloc", "_vs_jemalloc_baseline")):
        if f"ratio_steps_per_s{suffix}" in record:
            print(
                f"ratio cls-ray / {name} steps/s: {record[f'ratio_steps_per_s{suffix}']:.3f} (between reports "
                f"{record[f'ratio_between_reports_steps_per_s{suffix}']:.3f}); CPU-s per step cls-ray / {name}: "
                f"{record[f'ratio_cpu_s_per_step{suffix}']:.3f}"
            )


if __name__ == "__main__":
    main()
