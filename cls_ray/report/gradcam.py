"""Grad-CAM overlays with pytorch-grad-cam (the ``grad-cam`` package), target layer chosen for timm models.

CNNs: the deepest stage of timm's ``feature_info`` whose feature map is still at least :data:`MIN_CAM_SIDE` cells
on a side at the model's input size (the last stage of a 224 px ResNet is 7x7; at 32 px it is 1x1, which explains
nothing, so an earlier stage is used). Vision transformers (a ``patch_embed`` and ``blocks``): the last block's
first norm, its tokens (minus the class/register tokens) reshaped to the patch grid. A model the method cannot
explain raises :class:`GradCamUnsupported` naming why; the report shows that instead of overlays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

MIN_CAM_SIDE = 4


class GradCamUnsupported(ValueError):
    """The model has no layer Grad-CAM can use (the message says why)."""


def target_layer(model: torch.nn.Module, input_size: int) -> tuple[str, torch.nn.Module, Any]:
    """``(layer name, layer, reshape_transform or None)`` for Grad-CAM on a timm model."""
    if hasattr(model, "patch_embed") and hasattr(model, "blocks") and len(model.blocks) > 0:
        grid = getattr(model.patch_embed, "grid_size", None)
        block = model.blocks[-1]
        layer = getattr(block, "norm1", None)
        if grid is None or layer is None:
            raise GradCamUnsupported(
                f"{type(model).__name__}: a transformer without a patch grid or a norm1 in its last block"
            )
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        height, width = int(grid[0]), int(grid[1])

        def reshape(tokens: torch.Tensor) -> torch.Tensor:
            if tokens.dim() == 4:  # already (B, H, W, C), as some timm ViTs keep
                return tokens.permute(0, 3, 1, 2)
            patches = tokens[:, prefix:, :]
            if patches.shape[1] != height * width:
                raise GradCamUnsupported(
                    f"{type(model).__name__}: {patches.shape[1]} patch tokens do not form a {height}x{width} grid"
                )
            return patches.reshape(tokens.shape[0], height, width, tokens.shape[2]).permute(0, 3, 1, 2)

        return f"blocks.{len(model.blocks) - 1}.norm1", layer, reshape
    info = getattr(model, "feature_info", None)
    stages = list(info) if info is not None else []
    if not stages:
        raise GradCamUnsupported(f"{type(model).__name__}: timm lists no feature stages for it (feature_info)")
    chosen = stages[-1]
    for stage in reversed(stages):
        if input_size // int(stage["reduction"]) >= MIN_CAM_SIDE:
            chosen = stage
            break
    return chosen["module"], model.get_submodule(chosen["module"]), None


def grad_cam(
    model: torch.nn.Module,
    images: np.ndarray,
    targets: list[int],
    mean: list[float],
    std: list[float],
    batch_size: int = 16,
) -> tuple[str, np.ndarray]:
    """Grad-CAM heatmaps (N, H, W) in [0, 1] at input resolution for uint8 CHW ``images`` and their target classes.

    Returns ``(target layer name, heatmaps)``.

    Raises:
        GradCamUnsupported: no usable layer, or the library fails on this model (the message names it).
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from cls_ray.data.transforms import normalize

    size = int(images.shape[-1])
    name, layer, reshape = target_layer(model, size)
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(True)
    device = next(model.parameters()).device
    maps = []
    try:
        with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
            for start in range(0, len(images), batch_size):
                x = normalize(torch.from_numpy(np.array(images[start : start + batch_size])).to(device), mean, std)
                chunk = targets[start : start + batch_size]
                maps.append(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in chunk]))
    except GradCamUnsupported:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the method on this model is reported, not raised
        raise GradCamUnsupported(
            f"Grad-CAM failed on {type(model).__name__} at {name}: {type(exc).__name__}: {exc}"
        ) from exc
    heat = np.concatenate(maps) if maps else np.zeros((0, size, size), np.float32)
    return name, np.nan_to_num(heat.astype(np.float32), nan=0.0)


def overlay(image_chw: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """An RGB uint8 HWC picture of ``heatmap`` over the image (pytorch-grad-cam's ``show_cam_on_image``)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = image_chw.transpose(1, 2, 0).astype(np.float32) / 255.0
    return show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=0.55)
