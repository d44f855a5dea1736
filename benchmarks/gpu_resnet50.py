"""ResNet-50 training throughput on one GPU, end to end from Parquet through cls-ray, beside a synthetic upper bound.

* synthetic: ``benchmarks/ddp_baseline.py`` under ``torchrun --nproc_per_node=1`` with uint8 batches already on the
  GPU (no input pipeline at all): the fastest the same step (normalise, bf16 autocast, channels_last, timm AdamW)
  can run on this GPU.
* cls_ray: :func:`cls_ray.train.trainer.build_trainer` + ``fit()`` on a dataset generated locally (Fashion-MNIST
  upscaled to ``--side`` px colour JPEGs, ingested to Parquet): Ray Data reads the shards and decodes + augments
  (RandomResizedCrop + flip by default) in CPU tasks on the other cores; one Ray Train GPU worker trains. Images/s
  from the loop's own ``epoch_time_s`` of the epochs after the warm-up one (data waits and the pipeline's per-epoch
  start included), with its data-wait share; beside it, images/s between the reports closing the warm-up and the
  last timed epoch as the driver sees them. Runs once per ``--shuffle`` mode (global: a full shuffle each epoch,
  local: block order + a per-worker buffer).

Everything is generated locally (no internet); prints one JSON line. On a 16-core single-GPU box::

    .venv/bin/python benchmarks/gpu_resnet50.py
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _data  # noqa: E402
import train_overhead  # noqa: E402

logger = logging.getLogger("benchmarks.gpu_resnet50")
HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu only for a smoke run")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--amp", default="bf16", choices=["bf16", "none"])
    p.add_argument("--num-images", type=int, default=20000)
    p.add_argument("--side", type=int, default=256, help="side of the generated source JPEGs")
    p.add_argument("--val-fraction", type=float, default=0.02, help="validated once, in the final epoch")
    p.add_argument(
        "--augment",
        default="basic",
        choices=["basic", "randaugment"],
        help="basic: RandomResizedCrop + flip; randaugment: cls-ray's default train augmentation",
    )
    p.add_argument("--shuffle", default="global,local", help="cls-ray data.shuffle modes to run, comma-separated")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs, after one warm-up epoch")
    p.add_argument("--synthetic-steps", type=int, default=60)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workdir", type=Path, default=_data.DEFAULT_WORKDIR)
    args = p.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device visible (pass --device cpu for a smoke run)")
    return args


def run_synthetic(args: argparse.Namespace) -> dict[str, Any]:
    """The same train step on batches already on the device, one process: the compute upper bound."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
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
        "--data-on-device",
        "--warmup-steps",
        str(max(5, args.synthetic_steps // 4)),
        "--steps",
        str(args.synthetic_steps),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"synthetic run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def make_config(args: argparse.Namespace, shuffle: str, storage_path: str):
    """cls-ray's config for the end-to-end run: one GPU worker, bf16, channels_last, decode on the other cores."""
    from cls_ray.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig

    total_epochs = args.epochs + 2  # warm-up, timed epochs, a final epoch with the validation and checkpoint
    augment = {} if args.augment == "randaugment" else {"auto_augment": None, "color_jitter": 0.0, "re_prob": 0.0}
    return Config(
        model=ModelConfig(name=args.model, image_size=args.image_size, channels_last=True),
        data=DataConfig(batch_size=args.batch_size, eval_batch_size=args.batch_size, shuffle=shuffle, **augment),
        optim=OptimConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05, sched="none"),
        train=TrainConfig(
            epochs=total_epochs,
            num_workers=1,
            use_gpu=args.device == "cuda",
            cpus_per_worker=1.0,
            amp=args.amp,
            eval_every=total_epochs,
            storage_path=storage_path,
            run_name=f"resnet50-{shuffle}",
            max_failures=0,
        ),
    )


def run_cls_ray(args: argparse.Namespace, data_uri: str, shuffle: str) -> dict[str, Any]:
    """One end-to-end cls-ray run; images/s between the reports closing the warm-up and the last timed epoch."""
    import ray

    from cls_ray import storage
    from cls_ray.train.history import read_history
    from cls_ray.train.trainer import build_trainer

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # report timestamps to within 0.5 s
    ray.init(
        address="local",
        num_cpus=args.cores,
        num_gpus=1 if args.device == "cuda" else 0,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="cls-ray-resnet50-") as tmp:
            cfg = make_config(args, shuffle, tmp)
            clock_path = os.path.join(tmp, "clock.jsonl")
            trainer = build_trainer(
                data_uri,
                cfg,
                storage_path=tmp,
                run_name=cfg.train.run_name,
                callbacks=[train_overhead._user_callback(clock_path)],
            )
            trainer.fit()
            history = read_history(storage.join(tmp, cfg.train.run_name))
            clock = [json.loads(line) for line in Path(clock_path).read_text().splitlines()]
    finally:
        ray.shutdown()
    timed = history[1 : 1 + args.epochs]
    images = sum(h["img_per_s"] * h["epoch_time_s"] for h in timed)
    loop_seconds = sum(h["epoch_time_s"] for h in timed)
    wall = clock[args.epochs]["t"] - clock[0]["t"]
    return {
        "images_per_s": images / loop_seconds,
        "between_reports_images_per_s": images / wall,
        "data_wait_frac": sum(h["data_wait_frac"] * h["epoch_time_s"] for h in timed) / loop_seconds,
        "timed_images": round(images),
        "epoch_time_s": [round(h["epoch_time_s"], 2) for h in history],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    _, data_uri = _data.prepare_dataset(args.num_images, args.side, args.workdir, val_fraction=args.val_fraction)
    record: dict[str, Any] = {"benchmark": "gpu_resnet50", "args": {k: str(v) for k, v in vars(args).items()}}
    logger.info("synthetic upper bound")
    record["synthetic"] = run_synthetic(args)
    bound = record["synthetic"]["images_per_s"]
    record["cls_ray"] = {}
    for shuffle in [s.strip() for s in args.shuffle.split(",") if s.strip()]:
        logger.info("cls-ray end to end, data.shuffle=%s", shuffle)
        result = run_cls_ray(args, data_uri, shuffle)
        result["ratio_vs_synthetic"] = result["images_per_s"] / bound
        record["cls_ray"][shuffle] = result
    record["machine"] = _data.machine_description()
    print(f"synthetic (data on GPU): {bound:.1f} img/s")
    for shuffle, r in record["cls_ray"].items():
        print(
            f"cls-ray from Parquet, shuffle={shuffle}: {r['images_per_s']:.1f} img/s "
            f"({r['ratio_vs_synthetic']:.3f} of synthetic; between reports "
            f"{r['between_reports_images_per_s']:.1f} img/s, "
            f"data wait {r['data_wait_frac']:.1%})"
        )
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
