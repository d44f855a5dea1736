"""Typed configuration: nested dataclasses loaded from YAML, with ``--set section.key=value`` overrides.

Each stage reads its own section. A key the dataclass does not have, or a value of the wrong type, raises
:class:`ConfigError` naming the key and the file it came from. Each section validates its own values in
``__post_init__`` (torchtitan's pattern) and names the key to change.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from cls_ray import storage

#: Model package names (``train.package_name``; :mod:`cls_ray.package` checks the same): they are part of URLs.
PACKAGE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message names the key, the source and what to do."""


class RunFailed(RuntimeError):
    """A distributed run (a Ray Train run) failed after it started; the message names the run, the cause and what
    a re-run does. The CLI prints it as one line, like :class:`ConfigError`."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
"""A ``model.pretrained`` ending in one of these names a weights file, not a hub tag."""
PretrainedSource = Literal["timm", "hf-hub", "file"]


def pretrained_source(pretrained: str | None) -> PretrainedSource | None:
    """Where the weights ``model.pretrained`` names come from; None when it names none.

    ``hf-hub``: an ``hf-hub:ORG/NAME`` Hugging Face Hub repository, which timm downloads (config and weights);
    ``file``: a local path, ``file://`` or ``s3://`` URI, or a name with a suffix of :data:`WEIGHT_SUFFIXES`;
    ``timm``: a timm hub tag (``resnet50.a1_in1k``, or a bare architecture for its default weights).
    """
    if not pretrained:
        return None
    from timm.models import parse_model_name

    try:
        source, _ = parse_model_name(pretrained)
    except ValueError:  # timm refuses paths and URIs as model names: they are files here
        source = None
    if source == "hf-hub":
        return "hf-hub"
    if (
        storage.is_remote(pretrained)
        or pretrained.startswith("file://")
        or "/" in pretrained
        or os.sep in pretrained
        or pretrained.endswith(WEIGHT_SUFFIXES)
    ):
        return "file"
    return "timm"


@dataclass
class IngestConfig:
    """How class folders become dataset shards."""

    val_fraction: float = 0.15
    """Fraction of each class put in the validation split (ignored for an already split tree)."""
    test_fraction: float = 0.15
    """Fraction of each class put in the test split."""
    seed: int = 0
    """Seed of the stratified split; the same input and seed give a byte-identical manifest."""
    max_pixels: int = 64_000_000
    """Images with more pixels are refused as possible decompression bombs."""
    max_side: int = 512
    """JPEG/PNG files up to this side are kept byte for byte; larger or other formats are resized and re-encoded."""
    jpeg_quality: int = 90
    """Quality of re-encoded JPEGs."""
    shard_size_mb: int = 128
    """Target size of one Parquet shard."""
    num_workers: int = 0
    """Parallel decode workers; 0 means one per CPU core."""
    min_images_per_class: int = 1
    """A class with fewer valid images is an error."""
    overwrite: bool = False
    """Replace a DEST that already holds a complete dataset."""
    file_timeout_s: float = 60.0
    """A file whose validation takes longer is refused (guards against decoder hangs)."""
    ffcv: bool = False
    """Also write each split as an FFCV ``.beton`` file (``SPLIT/data.beton``) beside its Parquet shards, for
    ``data.format=ffcv`` (needs the ``ffcv`` extra: ``pip install 'cls-ray[ffcv]'``)."""
    ffcv_write_mode: Literal["raw", "jpg", "smart"] = "smart"
    """How the .beton stores pixels: ``raw`` uint8 (no decoding when training, 3 bytes per pixel), ``jpg``
    (``ingest.jpeg_quality``), or ``smart``: raw up to ``ffcv_smart_threshold`` bytes per image, JPEG above."""
    ffcv_smart_threshold: int = 3 * 96 * 96
    """``smart`` mode: images whose raw pixels take more bytes than this are stored as JPEG."""
    ffcv_max_resolution: int | None = None
    """Longest side in the .beton (larger images are downscaled); None keeps the stored images' size."""
    group_by: str | None = None
    """Images that belong together (one patient, session, device) stay in one split: a regular expression searched
    in each file's path relative to SRC (``/`` separators, class folder first; a pre-split tree's split folder
    before it) whose first capture group, or whole match without one, names the file's group. Examples:
    ``^[^/]+/([^/]+)/`` (the first folder below the class), ``(patient\\d+)_`` (a filename prefix). Every file must
    match. The split stays stratified by class as closely as the groups allow; Parquet rows carry the group."""
    group_file: str | None = None
    """Instead of ``group_by``: a CSV (header ``path,group``) or JSON (``{"path": "group"}``) file, local or
    s3://, giving every file's group by its path relative to SRC."""
    near_duplicates: Literal["off", "report", "group", "drop"] = "group"
    """Near-identical images (resized, re-encoded, colour-shifted copies; a perceptual hash taken during
    validation): ``report`` lists clusters that span splits or classes in the manifest; ``group`` (default) also
    keeps each cluster inside one split, so copies cannot leak from train to test; ``drop`` keeps one image per
    cluster and class. Clusters that a pre-split tree puts in two given splits are reported, not moved."""
    near_duplicate_threshold: int = 20
    """Largest Hamming distance, of the 256-bit hash, between two near-duplicates (precision and recall per
    threshold in docs/design.md, "Near-duplicates")."""
    group_tolerance: float = 0.05
    """Under a group split, the largest acceptable gap between a split's share of the images and its fraction; a
    larger one is reported (log and manifest ``split.groups``), since a few large groups cannot be cut finely."""
    engine: Literal["auto", "pool", "ray"] = "auto"
    """Where the work runs: ``pool``, worker processes on this machine; ``ray``, listing, validation and shard
    writing as tasks over the Ray cluster this command joins (``RAY_ADDRESS``, as under ``ray job submit``, else a
    local instance), the same dataset byte for byte, resumable; ``auto`` takes ``ray`` when a cluster of more than
    one node is reachable, SRC and DEST are on object storage and there are at least 20,000 files, else ``pool``,
    and says which it chose and why."""
    chunk_files: int = 1024
    """``engine=ray``: files per validation task (the unit of work, of retry after a lost node and of resume)."""
    task_cpus: int = 4
    """``engine=ray``: CPUs each validation task reserves and validates with (its worker processes); at most the
    largest node's CPUs."""
    shared_filesystem: bool = False
    """``engine=ray`` with a local SRC or DEST: every node mounts it at the same path (NFS, a cluster filesystem),
    so the tasks may run anywhere; off, they stay on this node."""

    def __post_init__(self) -> None:
        _check(
            not (self.group_by and self.group_file),
            "ingest.group_by and ingest.group_file",
            "set one of them, not both",
        )
        if self.group_by:
            try:
                re.compile(self.group_by)
            except re.error as exc:
                raise ConfigError(
                    f"ingest.group_by: {self.group_by!r} is not a valid regular expression ({exc})"
                ) from None
        _check(0 < self.group_tolerance < 1, "ingest.group_tolerance", "must be in (0, 1)")
        _check(self.chunk_files >= 1, "ingest.chunk_files", "must be at least 1")
        _check(self.task_cpus >= 1, "ingest.task_cpus", "must be at least 1")
        _check(
            0 <= self.near_duplicate_threshold <= 64,
            "ingest.near_duplicate_threshold",
            "must be in [0, 64] bits (of 256; above ~32 distinct images start to merge)",
        )
        _check(0 <= self.val_fraction < 1, "ingest.val_fraction", "must be in [0, 1)")
        _check(0 <= self.test_fraction < 1, "ingest.test_fraction", "must be in [0, 1)")
        _check(
            self.val_fraction + self.test_fraction < 1,
            "ingest.val_fraction + ingest.test_fraction",
            "must leave some images for training (sum < 1)",
        )
        _check(self.max_pixels > 0, "ingest.max_pixels", "must be positive")
        _check(self.max_side >= 8, "ingest.max_side", "must be at least 8")
        _check(1 <= self.jpeg_quality <= 100, "ingest.jpeg_quality", "must be in [1, 100]")
        _check(self.shard_size_mb >= 1, "ingest.shard_size_mb", "must be at least 1")
        _check(self.num_workers >= 0, "ingest.num_workers", "must be >= 0 (0 = one per core)")
        _check(self.min_images_per_class >= 1, "ingest.min_images_per_class", "must be at least 1")
        _check(self.ffcv_smart_threshold >= 1, "ingest.ffcv_smart_threshold", "must be at least 1")
        _check(
            self.ffcv_max_resolution is None or self.ffcv_max_resolution >= 8,
            "ingest.ffcv_max_resolution",
            "must be at least 8, or null",
        )


@dataclass
class ModelConfig:
    """Which timm model to train and how it starts."""

    name: str = "resnet10t"
    """timm architecture name (``timm.list_models()``)."""
    pretrained: str | None = None
    """None (random init), a timm hub tag of ``name``'s architecture such as ``resnet50.a1_in1k``, a Hugging Face
    Hub repository ``hf-hub:ORG/NAME`` holding a timm model of that architecture (both need internet), or a local
    path or s3:// URI of a weights file (.safetensors or a state-dict .pt/.pth). See :func:`pretrained_source`."""
    mode: Literal["scratch", "finetune", "frozen"] = "scratch"
    """``scratch``: random init (``pretrained`` is not loaded); ``finetune``: all weights train; ``frozen``: only the
    new head trains. ``finetune`` and ``frozen`` need ``pretrained``."""
    image_size: int | None = None
    """Input side in pixels; None uses the model's default."""
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    channels_last: bool = True
    compile: bool = False
    """Wrap the model in ``torch.compile``."""
    crop_pct: float | None = None
    """Eval crop fraction (resize to ``image_size / crop_pct``, center crop); None uses the model's default.
    1.0 keeps the whole image (small images such as 28 px Fashion-MNIST)."""

    def __post_init__(self) -> None:
        _check(self.image_size is None or self.image_size >= 8, "model.image_size", "must be at least 8")
        _check(0 <= self.drop_rate < 1, "model.drop_rate", "must be in [0, 1)")
        _check(0 <= self.drop_path_rate < 1, "model.drop_path_rate", "must be in [0, 1)")
        _check(self.crop_pct is None or 0 < self.crop_pct <= 1, "model.crop_pct", "must be in (0, 1] or null")
        # Without weights, finetune would silently train from scratch and frozen would train a head on noise.
        _check(
            self.mode == "scratch" or bool(self.pretrained),
            "model.mode",
            f"{self.mode!r} needs model.pretrained (weights to start from: a timm hub tag such as "
            f"resnet50.a1_in1k, hf-hub:ORG/NAME, or a weights file); set model.pretrained, or use "
            f"model.mode=scratch",
        )
        self._check_hub_tag()

    def _check_hub_tag(self) -> None:
        """A timm hub tag holds the weights of one architecture, and that must be ``name``'s: timm builds the tag's
        architecture, while the model package records ``name``."""
        if pretrained_source(self.pretrained) != "timm":
            return
        import timm
        from timm.models import split_model_name_tag

        tag_arch, tag = split_model_name_tag(self.pretrained)
        arch = split_model_name_tag(self.name)[0]
        _check(
            timm.is_model(tag_arch),
            "model.pretrained",
            f"{self.pretrained!r} is neither a weights file (a path, file:// or s3:// URI, or a name ending in "
            f"{', '.join(WEIGHT_SUFFIXES)}) nor a timm hub tag (ARCHITECTURE.TAG, e.g. resnet50.a1_in1k) nor "
            f"hf-hub:ORG/NAME",
        )
        _check(
            tag_arch == arch,
            "model.pretrained",
            f"hub tag {self.pretrained!r} holds weights of {tag_arch!r}, not of model.name {self.name!r}; set "
            f"model.pretrained to a tag of {arch!r} ({', '.join(timm.list_pretrained(f'{arch}.*')[:4]) or 'none'}"
            f"), or model.name={tag_arch}",
        )
        known = timm.list_pretrained(f"{arch}.*")
        _check(
            self.pretrained in known if tag else bool(known),
            "model.pretrained",
            f"timm has no pretrained weights {self.pretrained!r}; tags of {arch!r}: {', '.join(known[:8]) or 'none'}",
        )


@dataclass
class DataConfig:
    """Train-time input pipeline and augmentation (timm's transform factory)."""

    batch_size: int = 128
    """Per-worker batch size."""
    eval_batch_size: int = 256
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    """timm auto-augment string (RandAugment by default); None disables it."""
    color_jitter: float = 0.4
    hflip: float = 0.5
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """RandomResizedCrop area range."""
    re_prob: float = 0.25
    """Random erasing probability."""
    mixup: float = 0.0
    """timm Mixup alpha; 0 disables mixup."""
    cutmix: float = 0.0
    """timm CutMix alpha; 0 disables cutmix."""
    mixup_prob: float = 1.0
    """Probability of applying mixup or cutmix to a batch."""
    mixup_switch_prob: float = 0.5
    """Probability of cutmix instead of mixup when both are enabled."""
    label_smoothing: float = 0.1
    balanced_sampling: bool = False
    """Resample the train split every epoch so each class is seen equally often (rare classes oversampled, common
    ones undersampled; the epoch keeps about the split's size)."""
    shuffle: Literal["global", "local"] = "global"
    """``global``: a full Ray Data shuffle of the encoded rows every epoch (exact; memory ~ the split's encoded size).
    ``local``: shuffle the block order plus a per-worker buffer of ``local_shuffle_buffer`` decoded rows (for splits
    much larger than the cluster's object store)."""
    local_shuffle_buffer: int = 4096
    cache: Literal["auto", "always", "never"] = "auto"
    """Keep the encoded ``image``/``label`` rows of the train and val splits in Ray's object store after the first
    read, so later epochs skip listing and reading the shards (Ray Data otherwise re-reads them every epoch).
    ``auto``: cache a split when its shards take at most a fifth of the cluster's object store."""
    decode_concurrency: int | None = None
    """Ray Data CPU tasks decoding in parallel; None lets Ray Data decide."""
    decode_cpus: float = 1.0
    """CPUs one decode task reserves."""
    prefetch_batches: int = 2
    """Batches each training worker keeps ready ahead of the one it trains on."""
    format: Literal["parquet", "ffcv"] = "parquet"
    """Where the train split comes from: ``parquet`` streams the Parquet shards through Ray Data decode tasks (every
    timm augmentation); ``ffcv`` has each worker read the split's ``.beton`` file (``ingest.ffcv``) with FFCV's
    JIT-compiled loader in its own process: RandomResizedCrop + flip fused into decoding, random erasing and mixup on
    the device, no colour jitter or RandAugment. Validation always runs through the Parquet pipeline, so it matches
    ``cls-ray evaluate`` exactly."""
    ffcv_workers: int | None = None
    """FFCV loader threads in each training worker; None uses ``train.cpus_per_worker`` (at least 1)."""
    progress_bars: bool = False
    """Ray Data's per-operator progress bars for the train/val pipelines (one set per epoch; the per-epoch training
    line reports throughput and data wait either way)."""
    idle_backoff: bool = True
    """Let Ray Data's scheduling loop sleep (1-50 ms) after steps that moved nothing, instead of spinning at
    thousands of steps a second while the consumer (the training workers) is the bottleneck. It reads Ray internals:
    where a Ray upgrade changed them it turns itself off with one warning (:mod:`cls_ray.data.backoff`)."""

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "data.batch_size", "must be at least 1")
        _check(self.eval_batch_size >= 1, "data.eval_batch_size", "must be at least 1")
        _check(
            len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1,
            "data.scale",
            "must be [min, max] with 0 < min <= max <= 1",
        )
        for key in ("hflip", "re_prob"):
            _check(0 <= getattr(self, key) <= 1, f"data.{key}", "must be in [0, 1]")
        _check(0 <= self.label_smoothing < 1, "data.label_smoothing", "must be in [0, 1)")
        _check(self.mixup >= 0 and self.cutmix >= 0, "data.mixup / data.cutmix", "must be >= 0")
        _check(
            self.mixup + self.cutmix == 0 or self.batch_size % 2 == 0,
            "data.batch_size",
            "must be even when data.mixup or data.cutmix is on (timm Mixup pairs samples)",
        )
        _check(self.local_shuffle_buffer >= 1, "data.local_shuffle_buffer", "must be at least 1")
        _check(self.decode_cpus > 0, "data.decode_cpus", "must be positive")
        _check(self.prefetch_batches >= 0, "data.prefetch_batches", "must be >= 0")
        _check(self.ffcv_workers is None or self.ffcv_workers >= 1, "data.ffcv_workers", "must be at least 1, or null")
        if self.format == "ffcv":
            # FFCV's pipeline fuses RandomResizedCrop + flip into decoding; PIL-based ops have no place in it.
            pil_ops = (("auto_augment", self.auto_augment, "null"), ("color_jitter", self.color_jitter, "0"))
            pil_only = {key: (value, off) for key, value, off in pil_ops if value}
            _check(
                not pil_only,
                "data.format",
                f"'ffcv' applies RandomResizedCrop, flip, random erasing and mixup/cutmix, not colour jitter or "
                f"RandAugment; set {' '.join(f'data.{k}={off}' for k, (_, off) in pil_only.items())} (now "
                f"{', '.join(f'data.{k}={v}' for k, (v, _) in pil_only.items())}), or use data.format=parquet",
            )
            _check(
                not self.balanced_sampling,
                "data.balanced_sampling",
                "is not available with data.format=ffcv; use train.class_weighted_loss, or data.format=parquet",
            )


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (timm's factories)."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    sched: Literal["cosine", "step", "none"] = "cosine"
    warmup_epochs: int = 1
    decay_epochs: int = 30
    """Step schedule: epochs between decays."""
    decay_rate: float = 0.1
    min_lr: float = 1e-6
    warmup_lr: float = 1e-5
    """Learning rate at the start of the warmup."""
    sched_on_updates: bool = False
    """Step the schedule after every optimizer update instead of once per epoch (smoother for short runs)."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value; None disables clipping."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer update (effective batch = batch_size * num_workers * grad_accum_steps)."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "must be positive")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(self.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
        _check(self.grad_accum_steps >= 1, "optim.grad_accum_steps", "must be at least 1")
        _check(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip", "must be positive or null")


@dataclass
class TrainConfig:
    """The distributed run: workers, precision, evaluation, checkpoints and retries."""

    epochs: int = 10
    num_workers: int = 2
    """Ray Train workers (DDP ranks)."""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources each worker reserves besides CPU/GPU, e.g. ``{"trainer": 1}`` to keep workers on nodes
    started with that custom resource."""
    amp: Literal["none", "bf16", "fp16"] = "none"
    """Mixed precision on GPU; ``fp16`` adds a GradScaler. Ignored on CPU."""
    cpu_allocator: Literal["jemalloc", "system"] = "jemalloc"
    """Host memory allocator of CPU workers (``use_gpu: false``). ``jemalloc``: the ``libjemalloc.so`` Ray ships,
    preloaded into the worker processes with purging off, so each step reuses the pages the last one freed; glibc
    (``system``) maps and unmaps every large activation afresh and takes a page fault per 4 KiB of it, every step
    (docs/benchmarks.md). Where Ray ships no jemalloc (e.g. macOS) the system allocator is used."""
    eval_every: int = 1
    """Evaluate on the validation split every N epochs (and after the last)."""
    dist_bn: Literal["reduce", "broadcast"] = "reduce"
    """Before each evaluation, make the ranks' BatchNorm running statistics equal (timm's ``--dist-bn``): average
    them (``reduce``) or copy rank 0's (``broadcast``). Every rank then validates the model rank 0 checkpoints."""
    metric: str = "val_top1"
    """Metric that selects the best checkpoint and drives early stopping."""
    metric_mode: Literal["max", "min"] = "max"
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without improvement; None disables it."""
    loss: Literal["ce", "focal"] = "ce"
    """``ce``: cross-entropy (soft targets under mixup); ``focal``: softmax focal loss (for imbalanced classes)."""
    focal_gamma: float = 2.0
    class_weighted_loss: bool = False
    """Weight the loss of class c by N / (C * count_c) from the train split's counts."""
    ema: bool = False
    """Keep an EMA of the weights (timm ModelEmaV3); validation, checkpoint selection and the package use it."""
    ema_decay: float = 0.9998
    keep_checkpoints: int = 2
    storage_path: str = "runs"
    """Local path or s3:// URI holding runs."""
    run_name: str = "train"
    """Re-running with the same name resumes from its latest checkpoint."""
    package_name: str | None = None
    """Name of the model package the run ends with (the model name serve, predict and the report show); None: the
    dataset's name (its class-folder root). Letters, digits, ``.``, ``_`` and ``-``. The package's version is its
    weights' digest (docs/design.md, "Model package")."""
    max_failures: int = 2
    """Worker-group restarts allowed after a failure (each resumes from the latest checkpoint)."""
    seed: int = 0
    tracking: list[Literal["mlflow", "tensorboard"]] = field(default_factory=list)
    """Experiment tracking of the run: ``mlflow`` (one MLflow run per training run: params, per-epoch metrics, tags
    naming dataset and config digest, the model package as artefacts; server and experiment in ``tracking``) and
    ``tensorboard`` (event files under ``RUN/tensorboard``). Tune trials are tracked by ``tune.tracking``."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", "must be at least 1")
        _check(len(set(self.tracking)) == len(self.tracking), "train.tracking", "names a tracker twice")
        _check(self.num_workers >= 1, "train.num_workers", "must be at least 1")
        _check(self.cpus_per_worker > 0, "train.cpus_per_worker", "must be positive")
        for name, amount in self.worker_resources.items():
            _check(
                name not in ("CPU", "GPU") and isinstance(amount, (int, float)) and amount > 0,
                f"train.worker_resources.{name}",
                "must be a positive amount of a custom resource (CPU and GPU have their own keys)",
            )
        _check(self.eval_every >= 1, "train.eval_every", "must be at least 1")
        _check(self.focal_gamma >= 0, "train.focal_gamma", "must be >= 0")
        _check(0 < self.ema_decay < 1, "train.ema_decay", "must be in (0, 1)")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be at least 1")
        _check(self.max_failures >= -1, "train.max_failures", "must be >= -1 (-1 retries forever)")
        _check(
            self.early_stopping_patience is None or self.early_stopping_patience >= 1,
            "train.early_stopping_patience",
            "must be at least 1 or null",
        )
        _check(
            self.run_name != "" and "/" not in self.run_name, "train.run_name", "must be a non-empty name without '/'"
        )
        _check(
            self.package_name is None or PACKAGE_NAME_PATTERN.fullmatch(self.package_name) is not None,
            "train.package_name",
            "must be letters, digits, '.', '_' or '-' (it is part of URLs), starting with "
            "a letter or digit, at most 128 characters",
        )


@dataclass
class TuneConfig:
    """Ray Tune + Optuna (TPE) + ASHA search."""

    space: str = "search_spaces/quick.yaml"
    num_samples: int = 8
    max_concurrent_trials: int | None = None
    """None derives it from the cluster's resources and the workers per trial."""
    max_epochs: int = 6
    grace_period: int = 1
    """ASHA: epochs every trial runs before it can be stopped."""
    reduction_factor: int = 2
    seed: int = 0
    experiment_name: str = "tune"
    storage_path: str = "runs"
    evaluate_test: bool = True
    """Re-evaluate the promoted model on the test split."""
    startup_trials: int | None = None
    """Random trials before TPE models the results; None: a third of num_samples, at least 2, at most 10."""
    each_architecture_first: bool = True
    """The first trials take each of the space's architectures once, in the space's order (their other values
    sampled), so a small search cannot leave an architecture untried; only when num_samples covers them all."""
    resume: bool = True
    """Continue an existing experiment of the same name (finished trials are kept, unfinished ones resume from
    their last checkpoint); false refuses to touch an existing experiment."""
    resume_errored: bool = False
    """On resume, also re-run errored trials from their last checkpoint (false keeps them recorded as errored)."""
    tracking: list[Literal["mlflow", "tensorboard"]] = field(default_factory=list)
    """Experiment tracking of the search: ``mlflow`` logs every trial as an MLflow run (Ray's
    ``MLflowLoggerCallback``: its config, per-epoch results) and the promoted package to the best trial's run;
    ``tensorboard``: every trial writes TensorBoard events in its directory (always on)."""

    def __post_init__(self) -> None:
        _check(self.num_samples >= 1, "tune.num_samples", "must be at least 1")
        _check(len(set(self.tracking)) == len(self.tracking), "tune.tracking", "names a tracker twice")
        _check(
            self.startup_trials is None or self.startup_trials >= 1, "tune.startup_trials", "must be at least 1 or null"
        )
        _check(
            self.experiment_name != "" and "/" not in self.experiment_name,
            "tune.experiment_name",
            "must be a non-empty name without '/'",
        )
        _check(self.max_epochs >= 1, "tune.max_epochs", "must be at least 1")
        _check(1 <= self.grace_period <= self.max_epochs, "tune.grace_period", "must be in [1, tune.max_epochs]")
        _check(self.reduction_factor >= 2, "tune.reduction_factor", "must be at least 2")
        _check(
            self.max_concurrent_trials is None or self.max_concurrent_trials >= 1,
            "tune.max_concurrent_trials",
            "must be at least 1 or null",
        )


@dataclass
class ServeConfig:
    """Ray Serve deployment of a model package."""

    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "cls-ray"
    route_prefix: str = "/"
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.01
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_request_bytes: int = 20 * 1024 * 1024
    max_images: int = 64
    max_pixels: int = 64_000_000
    default_top_k: int = 5
    api_key_env: str | None = None
    """Name of an environment variable holding the API key; when set, inference routes need ``X-API-Key``."""
    max_ongoing_requests: int = 64
    """Images in flight per model replica; at least ``max_batch_size``, or batches never fill."""
    upscale_delay_s: float = 30.0
    """Autoscaling: how long load must stay above target before a replica is added."""
    downscale_delay_s: float = 600.0
    """Autoscaling: how long load must stay below target before a replica is removed."""
    amp: Literal["none", "bf16", "fp16"] = "bf16"
    """Autocast dtype of GPU replicas (CPU replicas always run float32)."""
    backend: Literal["torch", "onnx"] = "torch"
    """Model runtime of the replicas: the PyTorch package, or its recorded ONNX export (``cls-ray export``) on ONNX
    Runtime (CPU execution provider; CUDA provider on GPU replicas where onnxruntime-gpu is installed)."""
    onnx_precision: Literal["fp32", "int8"] = "fp32"
    """Which recorded ONNX export the onnx backend runs: fp32, or int8 (``cls-ray export --int8``)."""
    topology: Literal["split", "single"] = "split"
    """``split``: an HTTP ingress deployment (decoding) in front of the model deployment (batched forward passes),
    scaling apart, the forward pass possibly on GPUs; ``single``: one deployment whose replicas decode and run the
    batched model themselves (one Ray hop less: less CPU and latency per request at low traffic on CPU, fewer
    requests/s under load, docs/benchmarks.md "Serving"; it scales and sizes by the model's settings, ``num_cpus``
    plus ``ingress_num_cpus`` per replica)."""
    ingress_min_replicas: int = 1
    ingress_max_replicas: int = 2
    """The HTTP ingress (parsing, decoding, resizing on CPU) autoscales apart from the model replicas."""
    ingress_num_cpus: float = 1.0
    ingress_max_ongoing_requests: int = 256
    ingress_target_ongoing_requests: float = 32.0
    request_timeout_s: float = 60.0
    """A request still unanswered after this long gets an error instead of hanging."""

    def __post_init__(self) -> None:
        _check(1 <= self.port <= 65535, "serve.port", "must be a TCP port")
        _check(self.max_batch_size >= 1, "serve.max_batch_size", "must be at least 1")
        _check(self.batch_wait_timeout_s >= 0, "serve.batch_wait_timeout_s", "must be >= 0")
        _check(
            1 <= self.min_replicas <= self.max_replicas,
            "serve.min_replicas",
            "must be at least 1 and at most serve.max_replicas",
        )
        _check(self.target_ongoing_requests > 0, "serve.target_ongoing_requests", "must be positive")
        _check(self.max_images >= 1, "serve.max_images", "must be at least 1")
        _check(self.route_prefix.startswith("/"), "serve.route_prefix", "must start with '/'")
        _check(self.max_request_bytes >= 1024, "serve.max_request_bytes", "must be at least 1024")
        _check(self.max_pixels > 0, "serve.max_pixels", "must be positive")
        _check(self.default_top_k >= 1, "serve.default_top_k", "must be at least 1")
        _check(
            self.max_ongoing_requests >= self.max_batch_size,
            "serve.max_ongoing_requests",
            "must be at least serve.max_batch_size (a replica never holds more images than this at once)",
        )
        _check(
            self.upscale_delay_s >= 0 and self.downscale_delay_s >= 0,
            "serve.upscale_delay_s",
            "autoscaling delays must be >= 0",
        )
        _check(
            1 <= self.ingress_min_replicas <= self.ingress_max_replicas,
            "serve.ingress_min_replicas",
            "must be at least 1 and at most serve.ingress_max_replicas",
        )
        _check(
            self.num_cpus >= 0 and self.ingress_num_cpus >= 0 and self.num_gpus >= 0,
            "serve.num_cpus",
            "CPU and GPU amounts must be >= 0",
        )
        _check(self.ingress_max_ongoing_requests >= 1, "serve.ingress_max_ongoing_requests", "must be at least 1")
        _check(self.ingress_target_ongoing_requests > 0, "serve.ingress_target_ongoing_requests", "must be positive")
        _check(self.request_timeout_s > 0, "serve.request_timeout_s", "must be positive")


@dataclass
class PredictConfig:
    """``cls-ray predict``: batch scoring of a folder or bucket on Ray Data."""

    top_k: int = 5
    """Classes (with probabilities) written per image."""
    format: Literal["parquet", "csv"] = "parquet"
    """Output files: Parquet, or CSV with the top-k lists as ``;``-joined strings."""
    backend: Literal["torch", "onnx"] = "torch"
    """Model runtime of the replicas: the PyTorch package, or its recorded ONNX export (``cls-ray export``)."""
    batch_size: int = 64
    """Images per forward pass of a model replica."""
    files_per_output: int = 1000
    """Input files per output file. An output file is written whole when all its files are scored; a re-run with
    the same DEST skips the output files already written."""
    min_replicas: int = 1
    max_replicas: int | None = None
    """Model replicas (a Ray Data actor pool that grows from ``min_replicas`` while there is work); None: as many
    as the cluster's CPUs (or GPUs) allow next to the decode tasks."""
    replica_cpus: float = 1.0
    use_gpu: bool = False
    """One GPU per model replica."""
    decode_cpus: float = 1.0
    """CPUs each decode task reserves (reading and preprocessing, exactly as serving preprocesses)."""
    max_pixels: int = 64_000_000
    """Images with more pixels are refused (a row with the error), as by serving."""
    extensions: list[str] | None = None
    """Score only files with these extensions (e.g. ``[.jpg, .png]``); None scores every file that is not hidden
    (a file that is not an image gets a row naming why)."""

    def __post_init__(self) -> None:
        _check(self.top_k >= 1, "predict.top_k", "must be at least 1")
        _check(self.batch_size >= 1, "predict.batch_size", "must be at least 1")
        _check(self.files_per_output >= 1, "predict.files_per_output", "must be at least 1")
        _check(self.min_replicas >= 1, "predict.min_replicas", "must be at least 1")
        _check(
            self.max_replicas is None or self.max_replicas >= self.min_replicas,
            "predict.max_replicas",
            "must be at least predict.min_replicas, or null",
        )
        _check(
            self.replica_cpus > 0 and self.decode_cpus > 0,
            "predict.replica_cpus",
            "predict.replica_cpus and predict.decode_cpus must be positive",
        )
        _check(self.max_pixels > 0, "predict.max_pixels", "must be positive")
        _check(
            self.extensions is None or all(e.startswith(".") for e in self.extensions),
            "predict.extensions",
            "must be a list of extensions starting with '.', e.g. [.jpg, .png], or null",
        )


@dataclass
class ExportConfig:
    """``cls-ray export``: ONNX / TorchScript / int8 exports of a model package and the parity check they pass."""

    opset: int = 18
    """ONNX opset of the export (18: read by ONNX Runtime >= 1.14, TensorRT >= 8.6 and current mobile runtimes)."""
    max_images: int = 512
    """Images of the validation split (or ``--calibration-data``) the parity check and int8 calibration use."""
    batch_size: int = 32
    """Images per forward pass in the parity check (its first batch is a single image: both sizes are checked)."""
    fp32_max_abs_diff: float = 1e-4
    """An fp32 export is refused when any class probability differs from the package's by more than this."""
    int8_max_accuracy_drop: float = 0.02
    """An int8 export is refused when its top-1 accuracy is lower than the package's by more than this (without
    labels: when more than this share of images change their top-1 class)."""
    int8_per_channel: bool = True
    """Per-channel weight scales (ResNet-style convolutions lose much accuracy with one scale per tensor)."""
    int8_reduce_range: bool = True
    """7-bit weights: without VNNI (most AVX2 CPUs) 8-bit u8 x s8 products saturate in ONNX Runtime's kernels and
    accuracy collapses (measured: 0.92 -> 0.77 top-1 for ResNet-10-T on digits); 7 bits lose nothing there."""
    latency_runs: int = 20
    """Timed forward passes per model and batch size (batch 1 and ``batch_size``) in the int8-vs-fp32 comparison."""
    max_pixels: int = 64_000_000
    """Images with more pixels are skipped, as serving refuses them."""

    def __post_init__(self) -> None:
        _check(13 <= self.opset <= 23, "export.opset", "must be in [13, 23] (int8 QDQ needs at least 13)")
        _check(self.max_images >= 1, "export.max_images", "must be at least 1")
        _check(self.batch_size >= 1, "export.batch_size", "must be at least 1")
        _check(self.fp32_max_abs_diff > 0, "export.fp32_max_abs_diff", "must be positive")
        _check(0 <= self.int8_max_accuracy_drop <= 1, "export.int8_max_accuracy_drop", "must be in [0, 1]")
        _check(self.latency_runs >= 1, "export.latency_runs", "must be at least 1")
        _check(self.max_pixels > 0, "export.max_pixels", "must be positive")


def _check_scoring(section: Any, name: str) -> None:
    """The batch-inference settings the report and the audit share (``batch_size``, ``max_replicas``)."""
    _check(section.batch_size >= 1, f"{name}.batch_size", "must be at least 1")
    _check(section.max_replicas is None or section.max_replicas >= 1, f"{name}.max_replicas", "must be >= 1 or null")


@dataclass
class ReportConfig:
    """``cls-ray report``: the model report (metrics with intervals, curves, top losses, Grad-CAM, robustness,
    calibration, slices) and the package's model card."""

    corruptions: list[str] = field(
        default_factory=lambda: [
            "gaussian_noise",
            "gaussian_blur",
            "jpeg",
            "low_light",
            "contrast",
            "grayscale",
            "shift",
        ]
    )
    """Corruptions of the robustness section (see :mod:`cls_ray.report.corruptions`); an empty list skips it."""
    severities: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Severities of each corruption (0 is the clean image; 1-3 get stronger)."""
    robustness_max_images: int | None = 2000
    """Images (a seeded sample, stratified by class) of the split the corrupted passes score; None scores all."""
    top_losses: int = 24
    """Misclassified images with the highest loss shown (and explained with Grad-CAM)."""
    label_issues: int = 24
    """Likely label errors (cleanlab's ``find_label_issues`` on the split's out-of-sample probabilities) shown as
    thumbnails with the suggested class; 0 leaves the section out. ``cls-ray audit`` writes the full list."""
    gallery_per_class: int = 4
    """Correct and wrong examples shown per class (each)."""
    gradcam_per_class: int = 1
    """Grad-CAM overlays of correctly classified images per class, besides those of the top losses."""
    gradcam_max_images: int = 64
    """At most this many Grad-CAM overlays in all."""
    bootstrap_resamples: int = 1000
    """Bootstrap resamples of the 95% intervals of the summary metrics."""
    calibration_bins: int = 15
    """Equal-width confidence bins of the expected calibration error and the reliability diagram."""
    slice_min_images: int = 10
    """Groups with fewer images are listed but never flagged."""
    slice_flag_drop: float = 0.1
    """A group is flagged when its top-1 is more than this below the split's."""
    batch_size: int = 128
    """Images per forward pass of a model replica."""
    use_gpu: bool = False
    """One GPU per model replica (and for Grad-CAM)."""
    max_replicas: int | None = None
    """Model replicas of the Ray Data actor pool; None: one per GPU, or the CPUs less one for decoding."""
    thumbnail_size: int = 96
    """Side in pixels of the thumbnails on the page."""
    seed: int = 0
    """Seeds the robustness sample, the noise and the bootstrap: two reports of one split give the same numbers."""

    def __post_init__(self) -> None:
        from cls_ray.report.corruptions import CORRUPTIONS

        for name in self.corruptions:
            _check(
                name in CORRUPTIONS,
                "report.corruptions",
                f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}",
            )
        _check(all(0 <= s <= 3 for s in self.severities), "report.severities", "each must be 0, 1, 2 or 3")
        _check(
            self.robustness_max_images is None or self.robustness_max_images >= 1,
            "report.robustness_max_images",
            "must be at least 1, or null for the whole split",
        )
        for key in (
            "top_losses",
            "label_issues",
            "gallery_per_class",
            "gradcam_per_class",
            "gradcam_max_images",
            "slice_min_images",
        ):
            _check(getattr(self, key) >= 0, f"report.{key}", "must not be negative")
        _check(self.bootstrap_resamples >= 10, "report.bootstrap_resamples", "must be at least 10")
        _check(self.calibration_bins >= 2, "report.calibration_bins", "must be at least 2")
        _check(0 < self.slice_flag_drop < 1, "report.slice_flag_drop", "must be in (0, 1)")
        _check_scoring(self, "report")
        _check(16 <= self.thumbnail_size <= 512, "report.thumbnail_size", "must be in [16, 512]")


@dataclass
class AuditConfig:
    """``cls-ray audit``: likely label errors from the model's out-of-sample probabilities (cleanlab)."""

    splits: list[str] = field(default_factory=lambda: ["val", "test"])
    """Splits to audit: ones the model did not train on (its confidence on its own training images says nothing
    about their labels)."""
    filter_by: Literal["prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given"] = (
        "prune_by_noise_rate"
    )
    """cleanlab's ``find_label_issues`` method."""
    folds: int = 0
    """K >= 2: audit the train split too, with out-of-sample probabilities from K-fold cross-validation (K models
    retrained with the audited model's recorded config, one Ray Tune job; :mod:`cls_ray.crossval`); 0: off."""
    fold_seed: int = 0
    """Seed of the fold assignment (stratified by class, groups kept in one fold)."""
    fold_overrides: list[str] = field(default_factory=list)
    """``--set``-style changes to the recorded training config of the fold models, e.g. ``["train.epochs=5",
    "train.num_workers=1"]`` (to fit another cluster, or to trade accuracy for time)."""
    batch_size: int = 128
    use_gpu: bool = False
    max_replicas: int | None = None

    def __post_init__(self) -> None:
        _check(self.folds == 0 or self.folds >= 2, "audit.folds", f"must be 0 (off) or at least 2, not {self.folds}")
        _check(
            "train" not in self.splits or self.folds >= 2,
            "audit.splits",
            "names train, but the model trained on those images (its confidence there says nothing about their "
            "labels): set audit.folds >= 2 to cross-validate them",
        )
        _check(
            self.folds == 0 or "train" in self.splits,
            "audit.folds",
            "cross-validates the train split: add train to audit.splits",
        )
        for item in self.fold_overrides:
            _check("=" in item and "." in item.split("=", 1)[0], "audit.fold_overrides", f"{item!r} is not key=value")
        _check(bool(self.splits), "audit.splits", "name at least one split")
        for split in self.splits:
            _check(split in ("train", "val", "test"), "audit.splits", f"unknown split {split!r} (train, val, test)")
        _check(len(set(self.splits)) == len(self.splits), "audit.splits", "names a split twice")
        _check_scoring(self, "audit")


PIPELINE_STAGES = ("ingest", "tune", "train", "evaluate", "report", "export", "predict", "serve")


@dataclass
class TrackingConfig:
    """Where ``train.tracking`` / ``tune.tracking`` send runs. Credentials come from MLflow's own environment
    variables (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``) on the
    machine that starts the run; they reach the workers with the run, never through a file or a log."""

    mlflow_uri: str | None = None
    """MLflow tracking URI (``http://host:5000``, ``databricks``, ``sqlite:///file.db``, a folder); None:
    ``MLFLOW_TRACKING_URI``, else MLflow's default."""
    experiment: str | None = None
    """MLflow experiment the runs go to (created when missing); None: ``MLFLOW_EXPERIMENT_NAME``, else ``cls-ray``."""
    log_package: bool = True
    """Log the model package a run ends with (weights, model.json) as artefacts of its MLflow run."""
    timeout_s: float = 10.0
    """Each tracking request's time limit. A server that does not answer is reported once and the run goes on
    untracked: tracking never stops training."""

    def __post_init__(self) -> None:
        _check(self.experiment != "", "tracking.experiment", "must be a non-empty name or null")
        _check(self.timeout_s > 0, "tracking.timeout_s", "must be positive")


@dataclass
class PipelineConfig:
    """Which stages ``cls-ray pipeline`` runs, in chain order."""

    stages: list[str] = field(default_factory=lambda: ["ingest", "tune", "train", "evaluate"])
    """Any of ingest, tune, train, evaluate, report, export, predict, serve. With both tune and train, the search
    runs on ``tune_subset_per_class`` images per class and the winning configuration is
    then trained on the full data."""
    tune_subset_per_class: int | None = None
    """Search on at most this many training images per class (a quick proxy task); None searches on everything."""
    serve_samples: int = 8
    """Test images sent over HTTP to the served model at the end of the pipeline."""
    export_format: Literal["onnx", "torchscript"] = "onnx"
    """The export stage's format (parity-checked on the validation split, recorded in the package)."""
    predict_source: str | None = None
    """The predict stage's input: a folder or s3:// prefix of images (results in WORKDIR/predictions/)."""

    def __post_init__(self) -> None:
        for stage in self.stages:
            _check(
                stage in PIPELINE_STAGES,
                "pipeline.stages",
                f"unknown stage {stage!r}; choose from {', '.join(PIPELINE_STAGES)}",
            )
        _check(
            self.tune_subset_per_class is None or self.tune_subset_per_class >= 3,
            "pipeline.tune_subset_per_class",
            "must be at least 3 (one image per split) or null",
        )


@dataclass
class Config:
    """The whole chain; each stage reads its own section."""

    ingest: IngestConfig = field(default_factory=IngestConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    source: str | None = None
    """Pipeline input: class folders (local or s3://)."""
    workdir: str = "runs/pipeline"
    """Pipeline output root: dataset, runs, experiment and model package live under it."""


# --------------------------------------------------------------------------------------------------------------
# Loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key} (in {source}): expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} (in {source}): {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} (in {source}): expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} (in {source}): expected a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} (in {source}): expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, source, prefix=f"{key}.")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} (in {source}): expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} (in {source}): expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} (in {source}): expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} (in {source}): expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict[str, Any], source: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]} (in {source}); valid keys of "
            f"{prefix.rstrip('.') or 'the config'}: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}", source) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in {source})") from None


def _set_nested(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["train.epochs=3", "model.name=resnet18"]`` -> nested dict; values are parsed as YAML scalars."""
    data: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        _set_nested(data, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return data


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """``data`` (a config as nested dicts) with ``--set``-style ``overrides`` merged in (a new dict)."""
    return _merge(data, parse_overrides(overrides))


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Load a :class:`Config` from an optional YAML file (local or URI) and ``--set`` overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path:
        try:
            text = storage.read_bytes(path).decode()
        except storage.StorageError as exc:
            raise ConfigError(f"cannot read config file: {exc}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        source = path
    extra = parse_overrides(overrides)
    if extra:
        data = _merge(data, extra)
        source = f"{source} + --set" if path else "--set"
    return _build(Config, data, source)


def section_from_dict(cls: type, data: dict[str, Any], source: str, prefix: str = "") -> Any:
    """Build one config section (for example a Tune trial's sampled values) with the same checks."""
    return _build(cls, data, source, prefix)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def write_resolved(cfg: Any, dir_uri: str, name: str = "config.yaml") -> str:
    """Write the resolved config next to an output it produced; returns the file's URI."""
    uri = storage.join(dir_uri, name)
    storage.write_bytes(uri, dump_yaml(cfg).encode())
    return uri


def with_absolute_paths(cfg: Config) -> Config:
    """A copy of ``cfg`` whose local paths are absolute (see :func:`cls_ray.storage.absolute`): ``source``,
    ``workdir``, ``pipeline.predict_source``, the train and tune storage paths, the search space, and
    ``model.pretrained`` when it names an existing local file (otherwise it is a hub name or a remote URI)."""
    cfg = copy.deepcopy(cfg)
    if cfg.source:
        cfg.source = storage.absolute(cfg.source)
    cfg.workdir = storage.absolute(cfg.workdir)
    if cfg.pipeline.predict_source:
        cfg.pipeline.predict_source = storage.absolute(cfg.pipeline.predict_source)
    cfg.train.storage_path = storage.absolute(cfg.train.storage_path)
    cfg.tune.storage_path = storage.absolute(cfg.tune.storage_path)
    if os.path.exists(cfg.tune.space):
        cfg.tune.space = storage.absolute(cfg.tune.space)
    if cfg.model.pretrained and not storage.is_remote(cfg.model.pretrained) and os.path.exists(cfg.model.pretrained):
        cfg.model.pretrained = storage.absolute(cfg.model.pretrained)
    return cfg
