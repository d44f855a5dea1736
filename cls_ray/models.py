"""timm model creation: architecture by name, pretrained weights from the hub, a local file or s3://, freezing.

Knows nothing of Ray or DDP.
"""

from __future__ import annotations

import io
import logging
import os

import timm
import torch
from torch import nn

from cls_ray import storage
from cls_ray.config import ConfigError, ModelConfig

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def check_architecture(name: str, key: str = "model.name") -> None:
    """Raise a :class:`ConfigError` naming close matches when timm has no such architecture."""
    if timm.is_model(name):
        return
    base = name.split(".")[0]
    if timm.is_model(base):
        return
    close = timm.list_models(f"*{base.split('_')[0]}*")[:8]
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise ConfigError(f"{key}: timm has no architecture {name!r}{hint}")


def _is_weights_file(pretrained: str) -> bool:
    return storage.is_remote(pretrained) or pretrained.startswith("file://") or os.path.sep in pretrained or \
        pretrained.endswith(WEIGHT_SUFFIXES)


def load_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file or a state-dict ``.pt`` (never unpickling arbitrary objects)."""
    data = storage.read_bytes(uri)
    if uri.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        return load_safetensors(data)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ConfigError(f"model.pretrained: {uri} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_pretrained_file(model: nn.Module, uri: str) -> None:
    state = load_state_dict(uri)
    head = model.get_classifier()
    head_keys = {f"{name}.{p}" for name, mod in model.named_modules() if mod is head for p, _ in mod.named_parameters()}
    own = model.state_dict()
    # The classifier is replaced for this dataset's classes: drop head weights whose shape does not fit.
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    dropped = sorted(set(state) - set(kept))
    missing = sorted(set(own) - set(kept))
    bad_missing = [k for k in missing if k not in head_keys and not k.endswith("num_batches_tracked")]
    if bad_missing:
        raise ConfigError(f"model.pretrained: {uri} does not fit {type(model).__name__}; missing "
                          f"{len(bad_missing)} weights such as {bad_missing[:3]}")
    model.load_state_dict(kept, strict=False)
    logger.info("loaded %d tensors from %s (%d dropped: new classifier head)", len(kept), uri, len(dropped))


def model_kwargs(cfg: ModelConfig) -> dict:
    """Architecture kwargs beyond ``num_classes`` that shape the weights (recorded in the model package so
    :func:`cls_ray.package.load_model_package` rebuilds the same model)."""
    if cfg.image_size and _accepts_img_size(cfg.name):
        return {"img_size": cfg.image_size}
    return {}


def _accepts_img_size(name: str) -> bool:
    # Transformers (ViT, Swin, ...) size their position embeddings from img_size; CNNs take any input size
    # and refuse the kwarg. Building on the meta device costs no memory.
    try:
        with torch.device("meta"):
            timm.create_model(name.split(".")[0], pretrained=False, num_classes=1, img_size=224)
    except TypeError:
        return False
    return True


def create_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Create a timm model for ``num_classes`` classes, load its pretrained weights and apply ``cfg.mode``."""
    check_architecture(cfg.name)
    pretrained = cfg.pretrained
    from_hub = bool(pretrained) and cfg.mode != "scratch" and not _is_weights_file(pretrained)
    kwargs = {"num_classes": num_classes, "drop_rate": cfg.drop_rate, **model_kwargs(cfg)}
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    name = pretrained if from_hub and "." in pretrained else cfg.name
    model = timm.create_model(name, pretrained=from_hub, **kwargs)
    if pretrained and cfg.mode != "scratch" and not from_hub:
        _load_pretrained_file(model, pretrained)
    if cfg.mode == "frozen":
        freeze_backbone(model)
    return model


def data_config_for(cfg: ModelConfig) -> dict:
    """The preprocessing (timm data config) of the model ``cfg`` describes, without allocating its weights."""
    check_architecture(cfg.name)
    # A hub tag (``resnet50.a1_in1k``) carries its own mean/std/crop; weight files use the architecture's default.
    hub_tag = cfg.pretrained if cfg.pretrained and not _is_weights_file(cfg.pretrained) else None
    name = hub_tag if hub_tag and "." in hub_tag else cfg.name
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=1, **model_kwargs(cfg))
    data_config = model_data_config(model, cfg.image_size)
    if cfg.crop_pct is not None:
        data_config["crop_pct"] = float(cfg.crop_pct)
    return data_config


def freeze_backbone(model: nn.Module) -> None:
    """Freeze everything but the classifier head (feature extraction). BatchNorm statistics freeze with it:
    the train loop keeps frozen modules in eval mode via :func:`set_train_mode`."""
    head_params = {id(p) for p in model.get_classifier().parameters()}
    for p in model.parameters():
        p.requires_grad = id(p) in head_params


def set_train_mode(model: nn.Module) -> None:
    """``model.train()``, but modules whose parameters are all frozen stay in eval mode (frozen BN stats)."""
    model.train()
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if params and not any(p.requires_grad for p in params):
            module.eval()


def model_data_config(model: nn.Module, image_size: int | None = None) -> dict:
    """timm's data config of a model (input size, mean/std, interpolation, crop), as plain JSON types."""
    cfg = timm.data.resolve_data_config({}, model=model)
    if image_size:
        cfg["input_size"] = (3, image_size, image_size)
    return {
        "input_size": list(cfg["input_size"]),
        "mean": [float(x) for x in cfg["mean"]],
        "std": [float(x) for x in cfg["std"]],
        "interpolation": cfg["interpolation"],
        "crop_pct": float(cfg["crop_pct"]),
        "crop_mode": cfg.get("crop_mode", "center"),
    }


def save_weights_file(model: nn.Module, path: str) -> None:
    """Write a model's state dict as safetensors (used by tests and export)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, path)
