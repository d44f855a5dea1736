"""Search efficiency: ASHA + TPE (``cls-ray tune``) against the same configurations trained to completion.

Task: scikit-learn digits (1797 real 8x8 handwritten digits, as class folders of PNGs, ingested by cls-ray) at a
small input size, or (``--task fashion-mnist``) a per-class subset of the real Fashion-MNIST training set at 28 px.
Search space: two tiny CNNs x a wide learning-rate range (a bad learning rate is what early stopping
should cut short). Arm 1 runs the real search: seeded Optuna TPE proposes ``--samples`` configurations, ASHA stops
the weak ones early (grace ``--grace`` epochs, reduction factor ``--rf``). Arm 2, the exhaustive baseline, trains
exactly the configurations arm 1 tried, each to ``--max-epochs``, with no early stopping. Every trial in both arms
is a real Ray Train run through the same trainable (``cls_ray.tune.tuner.run_trial``), seeded identically, so a
configuration's first epochs match in both arms.

Reported: best validation top-1 (best epoch of any trial), trial-epochs spent, wall time; target: ASHA + TPE within
1 point of the exhaustive best at <= 30% of its trial-epochs. Re-running with the same ``--workdir`` after an
interruption resumes both arms (finished trials are kept; wall times then cover the resumed invocation only).

    .venv/bin/python benchmarks/search.py [--samples 8 --max-epochs 12 --grace 1 --rf 4 --image-size 16]
    .venv/bin/python benchmarks/search.py --samples 32 --num-cpus 16 --concurrency 8   # a 16-core node
    .venv/bin/python benchmarks/search.py --task fashion-mnist --samples 20   # 3,000 Fashion-MNIST images, 28 px
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SPACE = """
version: 1
fixed:
  model.mode: scratch
params:
  optim.lr: {loguniform: [1.0e-4, 3.0e-1]}
families:
  resnet: {architectures: [resnet10t]}
  mobilenet: {architectures: [mobilenetv3_small_050]}
"""

# Light augmentation and no warm-up: digits learn in a few epochs, and epoch 1 already ranks learning rates.
BASE = [
    "model.crop_pct=1.0",
    "data.auto_augment=null",
    "data.color_jitter=0.0",
    "data.hflip=0.0",
    "data.re_prob=0.0",
    "data.scale=[0.6, 1.0]",
    "data.label_smoothing=0.0",
    "data.batch_size=64",
    "optim.warmup_epochs=0",
    "train.num_workers=1",
    "train.max_failures=0",
    "train.keep_checkpoints=1",
]


def write_digits(root: Path, size: int = 32) -> Path:
    """All of scikit-learn's digits as class folders of PNGs, upscaled to ``size``."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (img, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        out = root / f"digit_{int(label)}"
        out.mkdir(parents=True, exist_ok=True)
        arr = (img / 16.0 * 255).astype(np.uint8)
        Image.fromarray(arr, mode="L").resize((size, size), Image.BICUBIC).save(out / f"{i:05d}.png")
    return root


def write_fashion_mnist_subset(root: Path, per_class: int) -> Path:
    """The first ``per_class`` images of each class of the real Fashion-MNIST training set (Debian's
    ``dataset-fashion-mnist``) as class folders of 28 px PNGs: a task where configurations do not all saturate."""
    import numpy as np
    from PIL import Image

    from cls_ray.data.fashion_mnist import CLASSES, DEFAULT_SOURCE, load_split

    images, labels = load_split(DEFAULT_SOURCE, "train")
    for label, name in enumerate(CLASSES):
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == label)[:per_class]:
            Image.fromarray(images[i], mode="L").save(out / f"{int(i):05d}.png")
    return root


def _exhaustive_trial(config: dict[str, Any], data_uri: str, base: Any, shared: Any = None) -> None:
    from cls_ray.tune.tuner import run_trial

    run_trial({k: v for k, v in config["values"].items() if k != "_index"}, data_uri, base, shared)


def _exhaustive_name(trial: Any) -> str:
    return f"full_{trial.config['values']['_index']:04d}_{trial.config['values']['model.name']}"


def run_exhaustive(data_uri: str, cfg: Any, configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Train every configuration to ``tune.max_epochs`` (FIFO, no early stopping); one row per configuration."""
    from ray import tune as ray_tune

    from cls_ray import storage
    from cls_ray.tune.leaderboard import result_config
    from cls_ray.tune.tuner import experiment_uri, make_trainable, read_trial_splits, trial_base_config

    exp = experiment_uri(cfg)
    base = trial_base_config(cfg, exp)
    values = [{**c, "_index": i + 1} for i, c in enumerate(configs)]
    fs, path = storage.resolve(exp)
    _, root = storage.resolve(cfg.tune.storage_path)
    # The splits read once for every trial, as the search arm's trials get them (cls_ray.tune.tuner.build_tuner).
    shared = read_trial_splits(data_uri, base, configs[0])
    trainable = make_trainable(data_uri, base, _exhaustive_trial, shared=shared)
    if ray_tune.Tuner.can_restore(path, storage_filesystem=fs):  # an interrupted run: finished trials are kept
        tuner = ray_tune.Tuner.restore(path, trainable, resume_unfinished=True, storage_filesystem=fs)
    else:
        tuner = _new_exhaustive_tuner(trainable, values, cfg, root, fs)
    rows = []
    for result in tuner.fit():
        df = result.metrics_dataframe
        has = df is not None and len(df) and cfg.train.metric in df
        rows.append(
            {
                "config": {k: v for k, v in result_config(result)["values"].items() if k != "_index"},
                "epochs": int(df["epoch"].max()) if has else 0,
                "best": float(df[cfg.train.metric].max()) if has else float("nan"),
                "error": repr(result.error) if result.error else None,
            }
        )
    return rows


def _new_exhaustive_tuner(trainable: Any, values: list[dict[str, Any]], cfg: Any, root: str, fs: Any) -> Any:
    from ray import tune as ray_tune

    return ray_tune.Tuner(
        trainable,
        param_space={"values": ray_tune.grid_search(values)},
        tune_config=ray_tune.TuneConfig(
            max_concurrent_trials=cfg.tune.max_concurrent_trials,
            trial_name_creator=_exhaustive_name,
            trial_dirname_creator=_exhaustive_name,
        ),
        run_config=ray_tune.RunConfig(name=cfg.tune.experiment_name, storage_path=root, storage_filesystem=fs),
    )


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["model.name"] == b["model.name"] and abs(a["optim.lr"] - b["optim.lr"]) <= 1e-12 * max(1.0, a["optim.lr"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-epochs", type=int, default=12)
    parser.add_argument("--grace", type=int, default=1)
    parser.add_argument("--rf", type=int, default=4)
    parser.add_argument(
        "--task",
        choices=("digits", "fashion-mnist"),
        default="digits",
        help="digits: all 1,797 images (saturates near 99%%); fashion-mnist: --per-class images per "
        "class of the real training set at 28 px (harder: configurations separate)",
    )
    parser.add_argument("--per-class", type=int, default=300, help="fashion-mnist: images per class")
    parser.add_argument("--image-size", type=int, default=None, help="default: 16 (digits), 28 (fashion-mnist)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="trials at a time in both arms (each needs 2 CPUs: a 1-CPU worker + 1 decode CPU)",
    )
    parser.add_argument(
        "--reuse-completed",
        action="store_true",
        help="exhaustive arm: take the search's own result for configurations ASHA already ran to "
        "--max-epochs (same trainable, same seed) instead of training them again; their epochs still "
        "count in the exhaustive arm's trial-epochs",
    )
    parser.add_argument("--workdir", default=None, help="keep everything here (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import ray

    from cls_ray.config import load_config
    from cls_ray.data.ingest import ingest
    from cls_ray.tune.tuner import tune

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cls-ray-search-bench-"))
    data_uri = str(workdir / "dataset")
    if args.image_size is None:
        args.image_size = 16 if args.task == "digits" else 28
    if not (workdir / "dataset" / "manifest.json").exists():
        if args.task == "digits":
            folders = write_digits(workdir / "folders")
        else:
            folders = write_fashion_mnist_subset(workdir / "folders", args.per_class)
        ingest(str(folders), data_uri, load_config(None).ingest, summary=False)
    (workdir / "space.yaml").write_text(SPACE)
    cluster = _start_ray(args.num_cpus)
    common = BASE + [
        f"model.image_size={args.image_size}",
        f"tune.space={workdir / 'space.yaml'}",
        f"tune.storage_path={workdir}",
        f"tune.num_samples={args.samples}",
        f"tune.max_epochs={args.max_epochs}",
        f"tune.seed={args.seed}",
        "tune.evaluate_test=false",
        f"tune.max_concurrent_trials={args.concurrency}",
    ]

    resumed = [arm for arm in ("asha_tpe", "exhaustive") if (workdir / arm).is_dir()]
    start = time.monotonic()
    asha_cfg = load_config(
        None,
        common
        + ["tune.experiment_name=asha_tpe", f"tune.grace_period={args.grace}", f"tune.reduction_factor={args.rf}"],
    )
    search = tune(data_uri, asha_cfg)
    asha_wall = time.monotonic() - start
    board = _read_leaderboard(workdir / "asha_tpe")
    keys = ("model.name", "optim.lr", "model.mode")
    completed = [r for r in board if args.reuse_completed and r["epochs"] == args.max_epochs and not r["error"]]
    reused = [
        {"config": {k: r[k] for k in keys}, "epochs": r["epochs"], "best": r["val_top1"], "error": None, "reused": True}
        for r in completed
    ]
    configs = [{k: r[k] for k in keys} for r in board if r not in completed]

    start = time.monotonic()
    full_cfg = load_config(None, common + ["tune.experiment_name=exhaustive"])
    full = (run_exhaustive(data_uri, full_cfg, configs) if configs else []) + reused
    full_wall = time.monotonic() - start
    ray.shutdown()
    cluster.shutdown()
    report = _report(args, board, full, search, asha_wall, full_wall, resumed)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _start_ray(num_cpus: int) -> Any:
    """A local Ray node with the dashboard, and RAY_ADDRESS in its workers' environment: Ray Train frees the workers
    of trials ASHA stops through the dashboard's state API, which must find this cluster even when other Ray
    instances run on the machine."""
    import socket

    import ray
    from ray.cluster_utils import Cluster

    # Ray's memory monitor compares the whole machine's memory with its threshold (0.95): on a shared machine other
    # users' processes get our trials' workers killed. Only this benchmark's node sees the higher threshold.
    os.environ.setdefault("RAY_memory_usage_threshold", "0.99")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": num_cpus,
            "object_store_memory": 500 * 1024**2,
            "include_dashboard": True,
            "dashboard_port": port,
        },
    )
    # Cluster records its address in ray_current_cluster, where every `ray.init()` on this machine would find and
    # join it (a cls-ray command or a test run beside the benchmark): this process connects by address instead.
    from ray._common.utils import reset_ray_address

    reset_ray_address()
    ray.init(address=cluster.address, runtime_env={"env_vars": {"RAY_ADDRESS": cluster.address}})
    return cluster


def _read_leaderboard(exp: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(exp / "leaderboard.parquet").to_pylist()


def _report(
    args: Any,
    board: list[dict],
    full: list[dict],
    search: Any,
    asha_wall: float,
    full_wall: float,
    resumed: list[str],
) -> dict:
    from rich.console import Console
    from rich.table import Table

    from cls_ray.tune.leaderboard import ERRORED, STOPPED_ASHA

    asha_epochs = sum(r["epochs"] for r in board)
    full_epochs = sum(r["epochs"] for r in full)
    full_best = max(r["best"] for r in full if r["best"] == r["best"])  # NaN: an errored run
    picked = next(r for r in full if _same(r["config"], search.best_config))
    table = Table(
        title=f"Search efficiency on {args.task} ({args.samples} configurations, up to {args.max_epochs} epochs, "
        f"{args.image_size} px; ASHA grace {args.grace}, reduction factor {args.rf})"
    )
    for col in ("arm", "trial-epochs", "vs exhaustive", "best val top-1", "wall (s)", "stopped early"):
        table.add_column(col)
    stopped = sum(r["status"] == STOPPED_ASHA for r in board)
    errored = [r["trial"] for r in board if r["status"] == ERRORED] + [r["config"] for r in full if r["error"]]
    table.add_row(
        "exhaustive: same configurations to completion",
        str(full_epochs),
        "1.00x",
        f"{full_best:.4f}",
        f"{full_wall:.0f}" + (" (resumed run)" if "exhaustive" in resumed else ""),
        "0",
    )
    table.add_row(
        "ASHA + TPE (cls-ray tune)",
        str(asha_epochs),
        f"{asha_epochs / full_epochs:.2f}x",
        f"{search.best_metric:.4f}",
        f"{asha_wall:.0f}" + (" (resumed run)" if "asha_tpe" in resumed else ""),
        str(stopped),
    )
    console = Console(width=160)
    console.print(table)
    gap = (full_best - search.best_metric) * 100
    met = gap <= 1.0 and asha_epochs <= 0.30 * full_epochs
    console.print(
        f"gap to the exhaustive best: {gap:.2f} points; trial-epochs: {asha_epochs}/{full_epochs} = "
        f"{asha_epochs / full_epochs:.0%}; the configuration ASHA picked reaches {picked['best']:.4f} "
        f"when fully trained; target (<= 1 point at <= 30%): {'met' if met else 'NOT met'}"
    )
    if errored:
        console.print(f"errored trials (their epochs until the error count): {errored}")
    for row in sorted(full, key=lambda r: -r["best"]):
        asha_row = next(r for r in board if _same(r, row["config"]))
        console.print(
            f"  {row['config']['model.name']:<22} lr {row['config']['optim.lr']:.2e}: full {row['best']:.4f}"
            f" ({row['epochs']} ep{', the search run' if row.get('reused') else ''}) | ASHA "
            f"{asha_row['val_top1'] or 0:.4f} ({asha_row['epochs']} ep, {asha_row['status']})"
        )
    return {
        "args": vars(args),
        "asha_trial_epochs": asha_epochs,
        "exhaustive_trial_epochs": full_epochs,
        "asha_best": search.best_metric,
        "exhaustive_best": full_best,
        "gap_points": gap,
        "target_met": met,
        "asha_wall_s": asha_wall,
        "exhaustive_wall_s": full_wall,
        "resumed_arms": resumed,  # their wall times cover the resumed invocation only
        "asha": board,
        "exhaustive": full,
    }


if __name__ == "__main__":
    sys.exit(main())
