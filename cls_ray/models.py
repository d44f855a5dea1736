"""timm model creation: architecture by name, pretrained weights from the timm or Hugging Face hub (``hf-hub:``), a
local file or s3://, freezing.

Knows nothing of Ray or DDP.
"""

from __future__ import annotations

import io
import logging

import timm
import torch
from torch import nn

from cls_ray import storage
from cls_ray.config import ConfigError, ModelConfig, PretrainedSource, pretrained_source

logger = logging.getLogger(__name__)


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
        raise ConfigError(
            f"model.pretrained: {uri} does not fit {type(model).__name__}; missing "
            f"{len(bad_missing)} weights such as {bad_missing[:3]}"
        )
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


def weights_source(cfg: ModelConfig) -> PretrainedSource | None:
    """Where the weights :func:`create_model` starts from come from (``timm``, ``hf-hub`` or ``file``, see
    :func:`cls_ray.config.pretrained_source`); None for a random init (``model.mode=scratch``)."""
    return pretrained_source(cfg.pretrained) if cfg.mode != "scratch" else None


def _check_hf_hub_architecture(cfg: ModelConfig) -> None:
    """An ``hf-hub:ORG/NAME`` repository names its architecture in its ``config.json`` (downloaded here, as timm
    does): timm builds that architecture, and the model package records ``model.name``, so they must agree."""
    from timm.models import get_arch_name, load_model_config_from_hf, parse_model_name

    _, repo = parse_model_name(cfg.pretrained)
    _, architecture, _ = load_model_config_from_hf(repo)
    if get_arch_name(architecture) != get_arch_name(cfg.name):
        raise ConfigError(
            f"model.pretrained: {cfg.pretrained} holds weights of {architecture!r}, not of model.name "
            f"{cfg.name!r}; set model.name={architecture}, or model.pretrained to weights of "
            f"{cfg.name!r}"
        )


def _timm_name(cfg: ModelConfig) -> str:
    """The name :func:`timm.create_model` gets: a hub tag (``resnet50.a1_in1k``: that tag's weights and
    preprocessing) or ``hf-hub:ORG/NAME`` (the repository's) when the weights come from a hub, else ``model.name``.
    The Config refuses a timm tag of another architecture; an ``hf-hub:`` repository is checked here."""
    source = weights_source(cfg)
    if source == "hf-hub":
        _check_hf_hub_architecture(cfg)
        return cfg.pretrained
    return cfg.pretrained if source == "timm" and "." in cfg.pretrained else cfg.name


def create_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Create a timm model for ``num_classes`` classes, load its pretrained weights and apply ``cfg.mode``."""
    check_architecture(cfg.name)
    source = weights_source(cfg)
    kwargs = {"num_classes": num_classes, "drop_rate": cfg.drop_rate, **model_kwargs(cfg)}
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    model = timm.create_model(_timm_name(cfg), pretrained=source in ("timm", "hf-hub"), **kwargs)
    if source == "file":
        _load_pretrained_file(model, cfg.pretrained)
    if cfg.mode == "frozen":
        freeze_backbone(model)
    return model


def data_config_for(cfg: ModelConfig) -> dict:
    """The preprocessing (timm data config) of the model ``cfg`` describes, without allocating its weights."""
    check_architecture(cfg.name)
    # Hub weights carry their own mean/std/crop (the same model timm builds in create_model); weight files and
    # random inits use the architecture's default.
    name = _timm_name(cfg)
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
