"""The train step on a CUDA device: bf16 / fp16 autocast (GradScaler only for fp16), channels_last, torch.compile,
mixup + EMA + random erasing on device, and validation metrics on the device. Selected only with ``-m gpu``."""

from __future__ import annotations

import pytest
import torch

from cls_ray.config import load_config
from cls_ray.models import data_config_for
from cls_ray.train.spec import RunSpec
from cls_ray.train.state import Progress
from cls_ray.train.step import build_worker, train_one_epoch, validate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _batches(n: int, device: torch.device, size: int = 32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=g).to(device),
            "label": torch.randint(0, 10, (size,), generator=g).to(device),
        }
        for _ in range(n)
    ]


@pytest.mark.parametrize("amp, compile_model", [("bf16", False), ("fp16", False), ("bf16", True), ("none", False)])
def test_train_step_on_cuda(amp, compile_model):
    device = torch.device("cuda")
    cfg = load_config(
        None,
        [
            "model.name=resnet10t",
            "model.image_size=32",
            "data.batch_size=32",
            "data.mixup=0.2",
            "data.cutmix=1.0",
            "data.re_prob=0.5",
            "train.ema=true",
            f"train.amp={amp}",
            f"model.compile={str(compile_model).lower()}",
            "optim.grad_accum_steps=2",
            "optim.grad_clip=1.0",
        ],
    )
    spec = RunSpec(
        classes=[str(i) for i in range(10)],
        class_counts=[10] * 10,
        data_config=data_config_for(cfg.model),
        run_uri="",
        updates_per_epoch=4,
    )
    w = build_worker(cfg, spec, device)
    assert w.precision.scaler.is_enabled() == (amp == "fp16")
    assert w.precision.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    before = [p.detach().clone() for p in w.objs.model.parameters()]
    progress = Progress()
    stats = train_one_epoch(w, _batches(5, device), progress)
    assert progress.num_updates == 3  # 5 micro-batches, accumulation 2: the last one completes an update
    assert torch.isfinite(torch.tensor(stats["train_loss"])) and stats["img_per_s"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, w.objs.model.parameters(), strict=True))
    conv = next(p for p in w.objs.model.parameters() if p.ndim == 4)
    assert conv.is_cuda and conv.is_contiguous(memory_format=torch.channels_last)
    scalars, details = validate(w, _batches(2, device))
    assert scalars["val_num_samples"] == 64 and 0 <= scalars["val_top1"] <= 1
    assert len(details["confusion_matrix"]) == 10
