"""Which tiny timm CNN clears 90% Fashion-MNIST test accuracy in the demo's 4 epochs, and at what CPU cost.

One process, no Ray and no data pipeline (the IDX arrays in memory), with the demo's recipe from
``configs/demo.yaml`` through cls-ray's own timm factories (``create_optimizer_and_scheduler``: AdamW, 1 warm-up
epoch then cosine per update), the demo's global batch (2 workers x 128), label smoothing, horizontal flips and
channels_last; test accuracy on the official 10,000 test images after every epoch. The demo's search may pick any
of ``search_spaces/quick.yaml``'s architectures: which of them can reach the demo's target in its time budget?

    .venv/bin/python benchmarks/demo_architectures.py resnet10t:28:0.003 mobilenetv3_small_050:56:0.006
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F

from cls_ray.config import load_config
from cls_ray.data.fashion_mnist import DEFAULT_SOURCE, load_split
from cls_ray.pipeline import DEMO_CONFIG
from cls_ray.train.components import create_optimizer_and_scheduler

MEAN, STD = 0.286, 0.353  # Fashion-MNIST's pixel statistics


def run(name: str, size: int, lr: float, epochs: int, threads: int, seed: int) -> list[float]:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    xtr, ytr = (torch.from_numpy(np.ascontiguousarray(a)) for a in load_split(DEFAULT_SOURCE, "train"))
    xte, yte = (torch.from_numpy(np.ascontiguousarray(a)) for a in load_split(DEFAULT_SOURCE, "test"))
    ytr, yte = ytr.long(), yte.long()
    cfg = load_config(str(DEMO_CONFIG), [f"model.name={name}", f"optim.lr={lr}", f"train.epochs={epochs}"])
    model = timm.create_model(name, num_classes=10).to(memory_format=torch.channels_last)
    batch = cfg.data.batch_size * cfg.train.num_workers
    per_epoch = len(xtr) // batch
    opt, sched = create_optimizer_and_scheduler(model, cfg, per_epoch)

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = x[:, None].float().div(255).sub(MEAN).div(STD).expand(-1, 3, -1, -1)
        if size != x.shape[-1]:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x.contiguous(memory_format=torch.channels_last)

    accs = []
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr))
        for i in range(per_epoch):
            idx = perm[i * batch : (i + 1) * batch]
            x = prep(xtr[idx])
            flip = torch.rand(len(idx)) < cfg.data.hflip
            x[flip] = x[flip].flip(-1)
            loss = F.cross_entropy(model(x), ytr[idx], label_smoothing=cfg.data.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step_update(num_updates=epoch * per_epoch + i + 1)
        model.eval()
        with torch.no_grad():
            correct = sum(
                (model(prep(xte[i : i + 1000])).argmax(1) == yte[i : i + 1000]).sum().item()
                for i in range(0, len(xte), 1000)
            )
        accs.append(correct / len(xte))
        print(
            f"{name} {size} px lr {lr:g}: epoch {epoch + 1} test top-1 {accs[-1]:.4f} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    return accs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="ARCH:SIZE:LR, e.g. resnet10t:28:0.003")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = {}
    for spec in args.runs:
        name, size, lr = spec.split(":")
        results[spec] = run(name, int(size), float(lr), args.epochs, args.threads, args.seed)
    for spec, accs in results.items():
        print(f"{spec:40s} final test top-1 {accs[-1]:.4f}")


if __name__ == "__main__":
    main()
