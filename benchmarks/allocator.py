"""CPU train step under glibc's malloc against Ray's jemalloc as cls-ray preloads it (``train.cpu_allocator``).

One process per run, one torch thread, the train step of ``benchmarks/ddp_baseline.py`` (uint8 batch normalised,
forward, label-smoothed cross-entropy, backward, timm AdamW) on batches held in memory, no Ray and no DDP: the only
difference between the runs is the allocator the process starts with (``LD_PRELOAD`` + ``MALLOC_CONF`` from
:func:`cls_ray.train.trainer.jemalloc_env`). Reports steps/s, minor page faults and kernel CPU seconds per
step (``getrusage``) after a warm-up, for each image size; runs alternate system, jemalloc, system, jemalloc...

    .venv/bin/python benchmarks/allocator.py                          # resnet10t, 64 and 224 px, batch 32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--sizes", default="64,224", help="comma-separated image sizes")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds per run (after a warm-up)")
    p.add_argument("--repeats", type=int, default=2, help="runs per allocator and size, interleaved")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """The measured process: time train steps for about ``--seconds`` and print one JSON line."""
    import timm
    import torch
    from timm.optim import create_optimizer_v2

    torch.set_num_threads(1)
    model = timm.create_model(args.model, num_classes=10).to(memory_format=torch.channels_last)
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.size, args.size)
    batches = [
        (
            torch.randint(0, 256, shape, dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (args.batch_size,), generator=g),
        )
        for _ in range(4)
    ]
    mean = torch.tensor([0.485 * 255, 0.456 * 255, 0.406 * 255]).view(1, -1, 1, 1)
    std = torch.tensor([0.229 * 255, 0.224 * 255, 0.225 * 255]).view(1, -1, 1, 1)

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        x = ((x.float() - mean) / std).contiguous(memory_format=torch.channels_last)
        loss = criterion(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    start = time.perf_counter()
    warmup = 0
    while warmup < 3 or time.perf_counter() - start < args.seconds / 4:
        step(warmup)
        warmup += 1
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    steps = 0
    while steps < 3 or time.perf_counter() - start < args.seconds:
        step(steps)
        steps += 1
    elapsed, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {
        "steps_per_s": steps / elapsed,
        "steps": steps,
        "faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
        "kernel_s_per_step": (after.ru_stime - before.ru_stime) / steps,
        "jemalloc": "libjemalloc" in open("/proc/self/maps").read(),
    }


def run(args: argparse.Namespace, size: int, env: dict[str, str]) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--size",
        str(size),
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--seconds",
        str(args.seconds),
    ]
    proc = subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return {}
    from cls_ray.train.trainer import jemalloc_env

    env = jemalloc_env()
    if not env:
        raise SystemExit("this Ray installation ships no libjemalloc.so")
    record: dict[str, Any] = {"benchmark": "allocator", "args": vars(args), "env": env, "sizes": {}}
    for size in (int(s) for s in args.sizes.split(",")):
        runs: dict[str, list[dict[str, Any]]] = {"system": [], "jemalloc": []}
        for _ in range(args.repeats):
            runs["system"].append(run(args, size, {}))
            runs["jemalloc"].append(run(args, size, env))
        assert not any(r["jemalloc"] for r in runs["system"]) and all(r["jemalloc"] for r in runs["jemalloc"])
        mean = {k: sum(r["steps_per_s"] for r in v) / len(v) for k, v in runs.items()}
        record["sizes"][size] = {**runs, "ratio_steps_per_s": mean["jemalloc"] / mean["system"]}
        for name, rs in runs.items():
            print(
                f"{args.model} {size} px, {name:8s}: "
                + ", ".join(
                    f"{r['steps_per_s']:.3f} steps/s ({r['faults_per_step']:.0f} faults, "
                    f"{r['kernel_s_per_step'] * 1e3:.1f} ms kernel per step)"
                    for r in rs
                )
            )
        print(f"{args.model} {size} px: jemalloc / system steps/s = {record['sizes'][size]['ratio_steps_per_s']:.3f}")
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
