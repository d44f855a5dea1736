"""Training pieces without Ray: the train step (frozen backbone, gradient accumulation), checkpoint state round
trip, metrics (including their sync across two real gloo processes), losses, balanced sampling, decoding and the
RandAugment guard."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import PILLOW_IMAGES, free_port
from safetensors.torch import load_file

from cls_ray.config import ConfigError, load_config
from cls_ray.data.decode import decode_stored_image
from cls_ray.data.images import ImageDecodeError, decode_image
from cls_ray.data.pipeline import BalancedResample
from cls_ray.data.transforms import (
    RandomResizedCropUint8,
    create_eval_transform,
    create_image_transform,
    create_train_transform,
    pillow_safe_auto_augment,
)
from cls_ray.metrics import ClassificationMetrics
from cls_ray.models import create_model, data_config_for, save_weights_file
from cls_ray.train.components import SoftmaxFocalLoss, class_weights
from cls_ray.train.spec import RunSpec
from cls_ray.train.state import Progress, capture_rng_state, load_train_state, save_train_state
from cls_ray.train.step import build_worker, train_one_epoch, train_step

CLASSES = [f"c{i}" for i in range(4)]


def _cfg(*overrides: str):
    base = [
        "model.name=resnet10t",
        "model.image_size=32",
        "data.batch_size=8",
        "data.re_prob=0",
        "optim.warmup_epochs=0",
        "train.epochs=2",
    ]
    return load_config(None, base + list(overrides))


def _spec(cfg) -> RunSpec:
    return RunSpec(
        classes=CLASSES,
        class_counts=[10, 10, 10, 10],
        data_config=data_config_for(cfg.model),
        run_uri="",
        updates_per_epoch=4,
    )


def _batches(n: int, size: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=g),
            "label": torch.randint(0, len(CLASSES), (size,), generator=g),
        }
        for _ in range(n)
    ]


def _head_names(model: torch.nn.Module) -> set[str]:
    head = model.get_classifier()
    return {f"{name}.{p}" for name, mod in model.named_modules() if mod is head for p, _ in mod.named_parameters()}


def test_pretrained_file_replaces_head_and_frozen_backbone_gets_no_updates(tmp_path):
    source = timm.create_model("resnet10t", num_classes=7)  # another head: it must be replaced, not loaded
    weights = str(tmp_path / "backbone.safetensors")
    save_weights_file(source, weights)
    cfg = _cfg(f"model.pretrained={weights}", "model.mode=frozen", "optim.lr=0.05")
    w = build_worker(cfg, _spec(cfg), torch.device("cpu"))
    model = w.objs.model
    file_state = load_file(weights)
    heads = _head_names(model)
    assert model.get_classifier().out_features == len(CLASSES)
    for name, tensor in model.state_dict().items():
        if name not in heads:
            assert torch.equal(tensor, file_state[name]), name
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_one_epoch(w, _batches(3), Progress())
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == heads  # weights, BatchNorm statistics and counters of the backbone untouched


def test_finetune_from_state_dict_pt_loads_every_backbone_tensor(tmp_path):
    source = timm.create_model("resnet10t", num_classes=3)
    path = str(tmp_path / "weights.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model = create_model(
        load_config(None, ["model.name=resnet10t", f"model.pretrained={path}", "model.mode=finetune"]).model,
        num_classes=5,
    )
    heads = _head_names(model)
    for name, tensor in model.state_dict().items():
        if name not in heads:
            assert torch.equal(tensor, source.state_dict()[name]), name
    assert all(p.requires_grad for p in model.parameters())


def test_gradient_accumulation_matches_one_large_batch():
    # test_vit has only LayerNorm (no batch statistics), so two half batches must give the same update.
    base = [
        "model.name=test_vit",
        "model.image_size=32",
        "optim.optimizer=sgd",
        "optim.lr=0.1",
        "optim.sched=none",
        "optim.weight_decay=0",
        "data.label_smoothing=0",
        "model.channels_last=false",
    ]
    torch.manual_seed(0)
    big = build_worker(_cfg(*base, "data.batch_size=16"), _spec(_cfg(*base)), torch.device("cpu"))
    small = build_worker(
        _cfg(*base, "data.batch_size=8", "optim.grad_accum_steps=2"), _spec(_cfg(*base)), torch.device("cpu")
    )
    small.objs.model.load_state_dict(big.objs.model.state_dict())
    (batch,) = _batches(1, size=16)
    train_step(big, batch, update=True, progress=Progress())
    progress = Progress()
    halves = [{k: v[:8] for k, v in batch.items()}, {k: v[8:] for k, v in batch.items()}]
    train_step(small, halves[0], update=False, progress=progress)
    assert progress.num_updates == 0
    train_step(small, halves[1], update=True, progress=progress)
    assert progress.num_updates == 1
    for (name, a), b in zip(big.objs.model.state_dict().items(), small.objs.model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name


def test_train_state_round_trip_restores_optimizer_schedule_ema_and_rng(tmp_path):
    cfg = _cfg("train.ema=true", "optim.sched_on_updates=true")
    w = build_worker(cfg, _spec(cfg), torch.device("cpu"))
    progress = Progress()
    train_one_epoch(w, _batches(3), progress)
    progress.epoch = 1
    random.seed(5)
    rng = capture_rng_state()
    save_train_state(str(tmp_path), w.objs, progress, [rng])
    expected = (random.random(), np.random.rand(), torch.rand(3))

    fresh = build_worker(cfg, _spec(cfg), torch.device("cpu"))
    restored = load_train_state(str(tmp_path), fresh.objs, rank=0, world_size=1)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])
    assert restored.epoch == 1 and restored.num_updates == 3
    for a, b in zip(w.objs.model.state_dict().values(), fresh.objs.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(w.objs.ema.module.state_dict().values(), fresh.objs.ema.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert fresh.objs.optimizer.state_dict()["state"][0]["step"] == 3
    assert fresh.objs.optimizer.param_groups[0]["lr"] == w.objs.optimizer.param_groups[0]["lr"]
    assert fresh.objs.scheduler.state_dict() == w.objs.scheduler.state_dict()


def _metrics_worker(rank: int, world: int, port: int, logits: torch.Tensor, target: torch.Tensor, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # Uneven shards: rank 0 gets 7 rows, rank 1 the other 13.
    part = slice(0, 7) if rank == 0 else slice(7, None)
    metrics = ClassificationMetrics(5)
    metrics.update(logits[part], target[part])
    scalars, details = metrics.compute()
    out[rank] = (scalars, details)
    dist.destroy_process_group()


def test_metrics_sync_across_ranks_equal_single_process():
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(20, 5, generator=g), torch.randint(0, 5, (20,), generator=g)
    single = ClassificationMetrics(5)
    single.update(logits, target)
    expected, expected_details = single.compute()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_metrics_worker, args=(2, free_port(), logits, target, out), nprocs=2, join=True)
        results = dict(out)
    for rank in (0, 1):
        scalars, details = results[rank]
        assert scalars == pytest.approx(expected, abs=1e-6)
        assert details["confusion_matrix"] == expected_details["confusion_matrix"]
    assert expected["num_samples"] == 20
    assert expected["top1"] == pytest.approx(float((logits.argmax(1) == target).float().mean()))


def test_metrics_match_scikit_learn():
    from sklearn.metrics import f1_score, precision_score, recall_score

    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(64, 6, generator=g), torch.randint(0, 6, (64,), generator=g)
    metrics = ClassificationMetrics(6)
    metrics.update(logits[:30], target[:30])
    metrics.update(logits[30:], target[30:])
    scalars, details = metrics.compute()
    pred = logits.argmax(1).numpy()
    for avg in ("macro", "weighted"):
        assert scalars[f"f1_{avg}"] == pytest.approx(f1_score(target, pred, average=avg, zero_division=0), abs=1e-6)
        assert scalars[f"precision_{avg}"] == pytest.approx(
            precision_score(target, pred, average=avg, zero_division=0), abs=1e-6
        )
        assert scalars[f"recall_{avg}"] == pytest.approx(
            recall_score(target, pred, average=avg, zero_division=0), abs=1e-6
        )
    assert scalars["loss"] == pytest.approx(float(F.cross_entropy(logits, target)), abs=1e-6)
    top5 = logits.topk(5, dim=1).indices.eq(target[:, None]).any(1).float().mean()
    assert scalars["top5"] == pytest.approx(float(top5))
    assert [r["support"] for r in details["per_class"]] == np.bincount(target.numpy(), minlength=6).tolist()


def test_focal_loss_reduces_to_weighted_cross_entropy_at_gamma_zero():
    g = torch.Generator().manual_seed(2)
    logits, target = torch.randn(16, 4, generator=g), torch.randint(0, 4, (16,), generator=g)
    weight = class_weights([30, 10, 5, 5])
    assert weight.tolist() == pytest.approx([50 / 120, 50 / 40, 50 / 20, 50 / 20])
    ce = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)
    soft = F.one_hot(target, 4).float() * 0.9 + 0.1 / 4
    focal = SoftmaxFocalLoss(gamma=0.0, weight=weight, label_smoothing=0.1)
    # torch's weighted CE averages by the sum of weights for hard labels, by N for soft targets.
    assert float(focal(logits, target)) == pytest.approx(float(torch.nn.CrossEntropyLoss(weight=weight)(logits, soft)))
    assert float(focal(logits, soft)) == pytest.approx(float(focal(logits, target)))
    assert float(SoftmaxFocalLoss(gamma=2.0)(logits, target)) < float(ce(logits, target))


def test_balanced_resample_equalises_classes():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    resample = BalancedResample([900, 90, 10])
    counts = np.zeros(3)
    for _ in range(50):
        out = resample({"label": labels, "image": np.arange(1000)})
        assert (out["label"] == labels[out["image"]]).all()  # rows stay intact
        counts += np.bincount(out["label"], minlength=3)
    shares = counts / counts.sum()
    assert shares == pytest.approx([1 / 3] * 3, abs=0.02)
    assert counts.sum() / 50 == pytest.approx(1000, rel=0.05)  # an epoch keeps about the split's size


def test_fast_decode_is_pixel_identical_to_the_hardened_decoder():
    checked = tensors = 0
    for path in sorted(p for p in PILLOW_IMAGES.rglob("*") if p.is_file()):
        data = path.read_bytes()
        try:
            reference = np.asarray(decode_image(data, 64_000_000)[0])
        except ValueError:
            continue
        assert np.array_equal(np.asarray(decode_stored_image(data, 64_000_000)), reference), path.name
        decoded = decode_stored_image(data, 64_000_000, as_tensor=True)
        if isinstance(decoded, torch.Tensor):  # the short path: torchvision.io decodes
            assert decoded.dtype == torch.uint8 and decoded.shape == (3, *reference.shape[:2]), path.name
            assert np.array_equal(decoded.permute(1, 2, 0).numpy(), reference), path.name
            tensors += 1
        checked += 1
    assert checked > 300
    assert tensors > 50


def _jpeg_variants() -> dict[str, bytes]:
    import io

    import cv2
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.arange(131), np.arange(97))[..., None] * np.array([1, 2, 3])
    pixels = np.clip(ramp % 256 + rng.integers(-30, 30, (131, 97, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")

    def save(img, **kwargs) -> bytes:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85, **kwargs)
        return buf.getvalue()

    variants = {
        f"{sub}{' progressive' if prog else ''}": save(image, subsampling=sub, progressive=prog)
        for sub in ("4:4:4", "4:2:2", "4:2:0")
        for prog in (False, True)
    }
    variants["4:4:0"] = cv2.imencode(
        ".jpg", pixels, [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_440]
    )[1].tobytes()
    variants["restart markers"] = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_RST_INTERVAL, 2])[1].tobytes()
    variants["grayscale"] = save(image.convert("L"))
    for orientation in (1, 6):
        exif = Image.Exif()
        exif[0x0112] = orientation
        variants[f"exif orientation {orientation}"] = save(image, exif=exif)
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="8"/></rdf:RDF></x:xmpmeta>'
    )
    variants["xmp orientation 8"] = save(image, xmp=xmp)
    variants["cmyk"] = save(image.convert("CMYK"))
    return variants


def test_plain_jpegs_decode_without_pillow_to_pillows_pixels(monkeypatch):
    # Every chroma subsampling, progressive and restart-marker JPEGs and grayscale go straight to libjpeg-turbo;
    # rotated (EXIF or XMP) and CMYK ones to the hardened decoder. Both give decode_image's pixels exactly.
    import cls_ray.data.decode as decode

    variants = _jpeg_variants()
    references = {name: np.asarray(decode_image(data, 64_000_000)[0]) for name, data in variants.items()}
    assert references["exif orientation 6"].shape == references["xmp orientation 8"].shape == (97, 131, 3)
    for name, data in variants.items():
        decoded = decode_stored_image(data, 64_000_000, as_tensor=True)
        got = decoded.permute(1, 2, 0).numpy() if isinstance(decoded, torch.Tensor) else np.asarray(decoded)
        assert np.array_equal(got, references[name]), name
        assert np.array_equal(np.asarray(decode_stored_image(data, 64_000_000)), references[name]), name

    def no_pillow(*args, **kwargs):
        raise AssertionError("Image.open called")

    monkeypatch.setattr(decode.Image, "open", no_pillow)
    plain = [name for name in variants if name.startswith(("4:", "restart", "grayscale"))]
    assert len(plain) == 9
    for name in plain:
        decoded = decode_stored_image(variants[name], 64_000_000, as_tensor=True)
        assert decoded.shape == (3, 131, 97), name
        assert np.array_equal(decoded.permute(1, 2, 0).numpy(), references[name]), name
    with pytest.raises(AssertionError, match="Image.open called"):  # a pixel count over the limit is not plain
        decode_stored_image(variants["4:2:0"], 131 * 97 - 1)
    monkeypatch.undo()
    # A truncated file (libjpeg-turbo's warnings are errors in simplejpeg; torchvision.io raises a RuntimeError) is
    # refused by the hardened decoder, with its reason.
    for as_tensor in (True, False):
        with pytest.raises(ImageDecodeError) as refused:
            decode_stored_image(variants["4:2:0"][:-100], 64_000_000, as_tensor=as_tensor)
        assert refused.value.reason == "corrupt"


def test_randaugment_guard_keeps_posterize_valid():
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28, 3), dtype=np.uint8))
    data_config = {
        "input_size": [3, 32, 32],
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    raw = timm.data.create_transform(32, is_training=True, use_prefetcher=True, auto_augment="rand-m10-n4-inc1")
    random.seed(0)
    with pytest.raises(ValueError, match="bits"):  # unguarded timm + Pillow >= 11: posterize(bits=0)
        for _ in range(3000):
            raw(image)
    guarded = create_train_transform(data_config, load_config(None, ["data.auto_augment=rand-m10-n4-inc1"]).data)
    for _ in range(3000):
        assert guarded(image).shape == (3, 32, 32)
    assert pillow_safe_auto_augment("rand-m9-mstd0.5-inc1") == "rand-m9-mstd0.5-inc1-mmax9"
    assert pillow_safe_auto_augment("rand-m9-inc1-mmax7") == "rand-m9-inc1-mmax7"
    assert pillow_safe_auto_augment(None) is None


def test_config_checks_name_the_key():
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(None, ["data.mixup=0.2", "data.batch_size=7"])
    with pytest.raises(ConfigError, match="model.crop_pct"):
        load_config(None, ["model.crop_pct=1.5"])


@pytest.mark.parametrize(
    "mode,scores,expected", [("max", [0.8, 0.9, 0.9], 3), ("min", [0.3, 0.2, 0.2], 3), ("max", [0.9, 0.8, 0.7], 1)]
)
def test_best_epoch_and_packaged_checkpoint_agree_on_ties(tmp_path, mode, scores, expected):
    """The leaderboard's best epoch and the checkpoint a run packages are the same one, ties included: the latest
    of equally scored epochs, the one Ray's checkpoint manager keeps."""
    import pandas as pd
    import ray.train
    import ray.tune

    from cls_ray.train.trainer import _best_checkpoint
    from cls_ray.tune.leaderboard import trial_row

    metric = "val_top1" if mode == "max" else "val_loss"
    rows = [{"epoch": e, metric: s, "time_this_iter_s": 1.0, "done": e == 3} for e, s in enumerate(scores, 1)]
    row = trial_row(
        ray.tune.Result(
            metrics=rows[-1],
            checkpoint=None,
            error=None,
            path=str(tmp_path / "trial_0001"),
            metrics_dataframe=pd.DataFrame(rows),
        ),
        metric,
        mode,
        max_epochs=3,
    )
    assert row.best_epoch == expected and row.best_metric == pytest.approx(scores[expected - 1])

    checkpoints = [(ray.train.Checkpoint(str(tmp_path / f"epoch-{r['epoch']}")), r) for r in rows]
    result = ray.train.Result(
        metrics=rows[-1], checkpoint=checkpoints[-1][0], error=None, path=str(tmp_path), best_checkpoints=checkpoints
    )
    cfg = load_config(None, [f"train.metric={metric}", f"train.metric_mode={mode}"])
    assert _best_checkpoint(result, cfg).path.endswith(f"epoch-{expected}")


def _pillow_photos(min_side: int = 64) -> list:
    """Real photographs of several sizes from Pillow's test images, decoded to RGB."""
    photos = []
    for path in sorted(PILLOW_IMAGES.rglob("*.jpg")):
        try:
            image = decode_image(path.read_bytes(), 64_000_000)[0]
        except ValueError:
            continue
        if min(image.size) >= min_side:
            photos.append(image)
    assert len(photos) >= 10
    return photos


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_eval_transform_on_tensors_matches_timm_on_pil(interpolation):
    """Resize + center crop through torchvision's v2 kernels agree with timm's PIL pipeline to a level or two,
    shrinking large photos and enlarging small ones alike."""
    from torchvision.transforms.functional import pil_to_tensor

    data_config = {
        "input_size": [3, 96, 96],
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "interpolation": interpolation,
        "crop_pct": 0.875,
        "crop_mode": "center",
    }
    transform = create_image_transform(data_config)
    assert transform.takes_tensors
    pil = create_eval_transform(data_config)
    sizes = set()
    for photo in _pillow_photos():
        expected = pil(photo).numpy().astype(np.int16)
        for given in (photo, pil_to_tensor(photo)):
            out = transform(given)
            assert out.dtype == np.uint8 and out.shape == (3, 96, 96) and out.flags.c_contiguous
            diff = np.abs(out.astype(np.int16) - expected)
            assert diff.max() <= 2 and diff.mean() < 0.1
        sizes.add(min(photo.size) > 110)
    assert sizes == {True, False}  # both shrunk and enlarged


def test_train_transform_on_tensors_keeps_timm_parameters():
    from torchvision.transforms import v2
    from torchvision.transforms.functional import pil_to_tensor

    data_config = {
        "input_size": [3, 64, 64],
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "interpolation": "bicubic",
        "crop_pct": 1.0,
    }
    cfg = load_config(
        None, ["data.auto_augment=null", "data.color_jitter=0.3", "data.hflip=0.25", "data.scale=[0.3,0.9]"]
    ).data
    transform = create_image_transform(data_config, cfg)
    ops = {type(op): op for op in transform.tensor_transform.transforms}
    crop = ops[RandomResizedCropUint8]
    timm_crop = create_train_transform(data_config, cfg).transforms[0]
    assert (crop.size, crop.scale, crop.ratio, crop.interpolation, crop.antialias) == (
        timm_crop.size,
        timm_crop.scale,
        timm_crop.ratio,
        timm_crop.interpolation,
        True,
    )
    assert ops[v2.RandomHorizontalFlip].p == 0.25
    jitter = ops[v2.ColorJitter]
    assert jitter.brightness == jitter.contrast == jitter.saturation == pytest.approx((0.7, 1.3))
    # The crop is random: every output has the configured size, and crops differ between calls.
    photo = pil_to_tensor(_pillow_photos()[0])
    torch.manual_seed(0)
    outs = [transform(photo) for _ in range(4)]
    assert all(o.shape == (3, 64, 64) and o.dtype == np.uint8 for o in outs)
    assert not np.array_equal(outs[0], outs[1])
    # Without randomness left (whole image, no flip, no jitter) it is timm's PIL output to a level or two.
    fixed = load_config(
        None, ["data.auto_augment=null", "data.color_jitter=0", "data.hflip=0", "data.scale=[1,1]"]
    ).data  # a whole square image: every sampled crop is it
    square = _pillow_photos()[0].crop((0, 0, 64 * 2, 64 * 2))
    diff = np.abs(
        create_image_transform(data_config, fixed)(square).astype(np.int16)
        - create_train_transform(data_config, fixed)(square).numpy()
    )
    assert diff.max() <= 2 and diff.mean() < 0.1


def test_random_resized_crop_enlarges_in_opencv_like_timm_on_pil():
    """Crops that only enlarge go through cv2.resize, the others through torchvision's antialiased kernel; both give
    timm's PIL result for the same crop (crop, then bilinear resize) to within a level, and write NHWC rows."""
    from unittest import mock

    import cv2
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    from cls_ray.data import transforms as transforms_mod

    cfg = load_config(None, ["data.auto_augment=null", "data.color_jitter=0", "data.hflip=0"]).data
    photos = _pillow_photos()
    counts = {}
    random.seed(0)  # the crop boxes are timm's draws, from Python's random
    for side in (160, 48):  # most crops of the photos are enlarged to 160 px, shrunk to 48 px
        data_config = {
            "input_size": [3, side, side],
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "interpolation": "bilinear",
            "crop_pct": 1.0,
        }
        transform = create_image_transform(data_config, cfg)
        crop = transform.tensor_transform.transforms[0]
        assert type(crop) is RandomResizedCropUint8
        enlarged = 0
        with mock.patch.object(transforms_mod.cv2, "resize", wraps=cv2.resize) as cv_resize:
            for photo in photos:
                tensor = pil_to_tensor(photo)
                for _ in range(3):
                    params = crop.make_params([tensor])
                    out = crop.transform(tensor, params).numpy()
                    top, left, h, w = params["top"], params["left"], params["height"], params["width"]
                    expected = np.asarray(
                        photo.crop((left, top, left + w, top + h)).resize((side, side), Image.Resampling.BILINEAR)
                    ).transpose(2, 0, 1)
                    diff = np.abs(out.astype(np.int16) - expected)
                    assert out.shape == (3, side, side)
                    if h <= side and w <= side:
                        enlarged += 1
                        # OpenCV's 11-bit fixed-point weights round some pixels (a sixth on average, at most ~40%
                        # of a crop in 7,000 sampled) the other way, by one level.
                        assert diff.max() <= 1 and diff.mean() < 0.5
                    else:  # torchvision's antialiased uint8 kernel: a level or two
                        assert diff.max() <= 2 and diff.mean() < 0.3
        assert cv_resize.call_count == enlarged
        counts[side] = (enlarged, 3 * len(photos) - enlarged)
        # A batch row written through a CHW view of an NHWC array holds the same pixels, channels last.
        row = np.zeros((side, side, 3), dtype=np.uint8)
        random.seed(1)
        via_out = transform(photos[0], out=row.transpose(2, 0, 1))
        random.seed(1)
        assert np.array_equal(row, transform(photos[0]).transpose(1, 2, 0)) and via_out.base is row
    assert counts[160][0] > counts[160][1] and counts[48][1] > counts[48][0]  # both paths, many times each


@pytest.mark.parametrize("side", [160, 48])
def test_crop_and_flip_run_directly_with_timms_draws_and_the_composed_pixels(side):
    """The default train ops (random resized crop + horizontal flip) skip v2.Compose's dispatch and write into the
    output row: the crop boxes are timm's own draws, and the pixels are those of the composed v2 ops given the same
    draws, flipped or not, through ``out=`` (NHWC rows, written in place) or returned."""
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision.transforms.functional import pil_to_tensor

    data_config = {
        "input_size": [3, side, side],
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    photos = [pil_to_tensor(photo) for photo in _pillow_photos()[:4]]
    asymmetric = 0
    for hflip in (0.0, 1.0):
        cfg = load_config(None, ["data.auto_augment=null", "data.color_jitter=0", f"data.hflip={hflip}"]).data
        transform = create_image_transform(data_config, cfg)
        crop = transform.tensor_transform.transforms[0]
        for seed, photo in enumerate(photos):
            random.seed(seed)
            box = RandomResizedCropAndInterpolation.get_params(photo, crop.scale, crop.ratio)
            random.seed(seed)
            assert tuple(crop.make_params([photo]).values()) == box  # top, left, height, width: timm's draw
            random.seed(seed)
            composed = transform.tensor_transform(photo).numpy()  # v2.Compose: the crop, then the flip (torch RNG)
            rows = np.zeros((2, side, side, 3), dtype=np.uint8)
            random.seed(seed)
            written = transform(photo, out=rows[1].transpose(2, 0, 1))
            random.seed(seed)
            returned = transform(photo)
            assert returned.flags.c_contiguous and returned.shape == (3, side, side)
            assert np.array_equal(returned, composed) and np.array_equal(written, composed)
            assert np.array_equal(rows[1].transpose(2, 0, 1), composed) and not rows[0].any()
            if hflip:  # the flip really happened: the unflipped crop is the mirror image
                random.seed(seed)
                unflipped = transform.tensor_transform.transforms[0](photo).numpy()
                assert np.array_equal(returned, unflipped[:, :, ::-1])
                asymmetric += not np.array_equal(unflipped, unflipped[:, :, ::-1])
    assert asymmetric >= 2  # so the flips above were seen
    # A flip probability of 0.5 flips about half of the images.
    cfg = load_config(
        None, ["data.auto_augment=null", "data.color_jitter=0", "data.hflip=0.5", "data.scale=[1,1]"]
    ).data  # a square image: every crop is the whole of it
    transform = create_image_transform(data_config, cfg)
    square = pil_to_tensor(_pillow_photos()[0].crop((0, 0, side, side)))
    random.seed(0)
    flipped = sum(not np.array_equal(transform(square), square.numpy()) for _ in range(200))
    assert 70 < flipped < 130


def test_randaugment_keeps_timms_pil_pipeline():
    from torchvision.transforms.functional import pil_to_tensor

    data_config = {
        "input_size": [3, 32, 32],
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    transform = create_image_transform(data_config, load_config(None, ["data.auto_augment=rand-m9-n2"]).data)
    assert not transform.takes_tensors  # RandAugment and random interpolation exist only for PIL in timm
    photo = _pillow_photos()[0]
    for given in (photo, pil_to_tensor(photo)):
        out = transform(given)
        assert out.shape == (3, 32, 32) and out.dtype == np.uint8
