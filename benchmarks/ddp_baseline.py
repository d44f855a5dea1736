"""The plain PyTorch DDP baseline for ``benchmarks/train_overhead.py``: no Ray, no data loader, nothing in the way.

Each rank holds a few synthetic uint8 batches in memory and runs the same step cls-ray's loop runs (move the uint8
batch to the device, normalise there, forward, loss, backward, optimizer step); the time of the steady-state steps
after a warmup is measured between two barriers. Rank 0 prints one JSON line.

Run alone with::

    .venv/bin/torchrun --standalone --nproc_per_node=2 benchmarks/ddp_baseline.py --steps 40
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import timm
import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from torch import nn
from torch.nn.parallel import DistributedDataParallel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--steps", type=int, default=40, help="timed steady-state steps")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", default="none", choices=["none", "bf16"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--data-on-device",
        action="store_true",
        help="keep the batches on the device (no host-to-device copy per step): a pure compute bound",
    )
    return p.parse_args(argv)


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes; gloo on CPU, NCCL on GPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world)
    return rank, world, dev


def make_batches(args: argparse.Namespace, rank: int, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A few uint8 NCHW batches and labels held in host memory (what a preloaded loader would hand over)."""
    g = torch.Generator().manual_seed(rank)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    return [
        (
            torch.randint(0, 256, shape, dtype=torch.uint8, generator=g),
            torch.randint(0, args.num_classes, (args.batch_size,), generator=g),
        )
        for _ in range(n)
    ]


def build(args: argparse.Namespace, dev: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = timm.create_model(args.model, num_classes=args.num_classes).to(dev)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # As Ray Train's prepare_model: a single process trains the bare model (DDP only with more than one rank).
    world = dist.get_world_size()
    ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None) if world > 1 else model
    # timm's factory, as cls-ray uses: AdamW without weight decay on norms and biases.
    opt = create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=args.weight_decay)
    return ddp, opt


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world, dev = setup_distributed(args.device)
    torch.manual_seed(0)
    model, opt = build(args, dev)
    model.train()
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    mean = torch.tensor([m * 255 for m in IMAGENET_MEAN], device=dev).view(1, -1, 1, 1)
    std = torch.tensor([s * 255 for s in IMAGENET_STD], device=dev).view(1, -1, 1, 1)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if args.amp == "bf16" else contextlib.nullcontext()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    batches = make_batches(args, rank)
    if args.data_on_device:
        batches = [(x.to(dev), y.to(dev)) for x, y in batches]

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        x = x.to(dev, non_blocking=True)
        y = y.to(dev, non_blocking=True)
        x = ((x.float() - mean) / std).contiguous(memory_format=memory_format)
        with autocast:
            loss = criterion(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(args.warmup_steps):
        step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(args.steps):
        step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    elapsed = time.perf_counter() - start
    # CPU seconds of all ranks together (every thread of each process): robust to other load on the machine.
    cpu = torch.tensor([time.process_time() - cpu_start], dtype=torch.float64, device=dev)  # NCCL: on the GPU
    dist.all_reduce(cpu)
    if rank == 0:
        print(
            json.dumps(
                {
                    "baseline": "torchrun-ddp",
                    "steps_per_s": args.steps / elapsed,
                    "cpu_s_per_step": cpu.item() / args.steps,
                    "images_per_s": args.steps * args.batch_size * world / elapsed,
                    "world_size": world,
                    "threads_per_rank": torch.get_num_threads(),
                    "steps": args.steps,
                }
            ),
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
