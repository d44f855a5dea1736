"""``model.pretrained`` / ``model.mode``: mistakes that used to train the wrong thing silently are config errors at
load time, naming the keys; ``hf-hub:ORG/NAME`` weights go to timm's Hugging Face Hub loading.

The hub tests run offline against a Hugging Face cache the test writes (a timm ``config.json`` and the weights of a
model it creates), with huggingface_hub in offline mode: no network, the real timm + huggingface_hub code path.
"""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import save_file

from cls_ray.config import ConfigError, load_config, pretrained_source, with_absolute_paths
from cls_ray.models import create_model, data_config_for
from cls_ray.tune.space import SearchSpaceError, load_search_space


def _load_yaml(tmp_path: Path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path), lambda: load_config(str(path))


# ------------------------------------------------------------------------------------------------------------
# A timm hub tag must be one of model.name's architecture


@pytest.mark.parametrize("pretrained", ["resnet50.a1_in1k", "resnet50"])
def test_hub_tag_of_another_architecture_is_a_config_error_naming_both_keys(tmp_path: Path, pretrained: str):
    # Before: timm built ResNet-50 from the tag while the package recorded resnet18 (and packaging failed).
    path, load = _load_yaml(tmp_path, f"model:\n  name: resnet18\n  pretrained: {pretrained}\n  mode: finetune\n")
    with pytest.raises(ConfigError) as info:
        load()
    message = str(info.value)
    for part in ("model.pretrained", "model.name", pretrained, "resnet18", "resnet18.a1_in1k", path):
        assert part in message, message


def test_hub_tag_of_the_same_architecture_loads():
    cfg = load_config(None, ["model.name=resnet18", "model.pretrained=resnet18.a1_in1k", "model.mode=finetune"])
    assert pretrained_source(cfg.model.pretrained) == "timm"
    assert data_config_for(cfg.model)["input_size"] == [3, 224, 224]  # the tag's own preprocessing, no download


def test_unknown_hub_tag_is_a_config_error_listing_the_known_tags():
    with pytest.raises(
        ConfigError,
        match=r"model\.pretrained: timm has no pretrained weights 'resnet18\.nope'.*"
        r"resnet18\.a1_in1k",
    ):
        load_config(None, ["model.name=resnet18", "model.pretrained=resnet18.nope", "model.mode=finetune"])


def test_pretrained_that_is_neither_file_nor_tag_is_a_config_error():
    with pytest.raises(ConfigError, match="model.pretrained: 'my_weights' is neither a weights file"):
        load_config(None, ["model.pretrained=my_weights", "model.mode=finetune"])


# ------------------------------------------------------------------------------------------------------------
# finetune / frozen need weights


@pytest.mark.parametrize("mode", ["finetune", "frozen"])
@pytest.mark.parametrize("pretrained", [None, ""])
def test_finetune_or_frozen_without_weights_is_a_config_error_naming_both_keys(tmp_path, mode, pretrained):
    # Before: finetune without weights silently trained from scratch.
    line = "" if pretrained is None else f"  pretrained: '{pretrained}'\n"
    path, load = _load_yaml(tmp_path, f"model:\n  name: resnet18\n  mode: {mode}\n{line}")
    with pytest.raises(ConfigError) as info:
        load()
    message = str(info.value)
    for part in ("model.mode", f"'{mode}'", "model.pretrained", "model.mode=scratch", path):
        assert part in message, message


def test_a_space_pairing_finetune_with_no_weights_fails_before_any_trial(tmp_path: Path):
    space = tmp_path / "space.yaml"
    space.write_text("version: 1\nfixed: {model.mode: finetune}\nfamilies:\n  resnet: {architectures: [resnet10t]}\n")
    with pytest.raises(SearchSpaceError) as info:
        load_search_space(str(space))
    message = str(info.value)
    assert str(space) in message and "model.mode" in message and "model.pretrained" in message, message


def test_a_space_that_gives_its_architectures_the_base_configs_hub_tag_fails_before_any_trial(tmp_path: Path):
    # The base config fine-tunes ResNet-50 from its tag; a space over architectures without weights of their own
    # would hand that tag to every trial (each training ResNet-50 under another name): each trial's Config is
    # checked when the space is loaded, so this fails there, naming the keys.
    space = tmp_path / "space.yaml"
    space.write_text("version: 1\nfamilies:\n  resnet: {architectures: [resnet50, resnet18]}\n")
    base = load_config(None, ["model.name=resnet50", "model.pretrained=resnet50.a1_in1k", "model.mode=finetune"])
    load_search_space(str(space))  # on its own (random init) the space is fine
    with pytest.raises(SearchSpaceError) as info:
        load_search_space(str(space), base=base)
    message = str(info.value)
    assert "resnet18" in message and "model.pretrained" in message and "model.name" in message, message


# ------------------------------------------------------------------------------------------------------------
# hf-hub:ORG/NAME: timm's Hugging Face Hub loading, never a file path


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """huggingface_hub offline, on an empty cache of the test's own (both read when a download is asked for)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def _put_hub_repo(cache: Path, repo: str, architecture: str, model: torch.nn.Module, mean: list[float]) -> None:
    """A timm model repository as ``hf download`` leaves it in the cache: refs/main -> snapshot with config.json
    (timm's format) and model.safetensors."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    config = {
        "architecture": architecture,
        "num_classes": model.num_classes,
        "pretrained_cfg": {
            "input_size": [3, 224, 224],
            "interpolation": "bilinear",
            "crop_pct": 0.95,
            "mean": mean,
            "std": [0.5, 0.5, 0.5],
            "first_conv": "conv1",
            "classifier": "fc",
        },
    }
    (snapshot / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snapshot / "model.safetensors"))


def _hub_cfg(pretrained: str, name: str = "resnet18"):
    return load_config(None, [f"model.name={name}", f"model.pretrained={pretrained}", "model.mode=finetune"])


def test_hf_hub_tag_is_accepted_as_hub_weights_not_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from cls_ray.train.trainer import _check_pretrained

    cfg = _hub_cfg("hf-hub:acme/resnet18.cats")
    assert pretrained_source(cfg.model.pretrained) == "hf-hub"
    monkeypatch.chdir(tmp_path)
    assert with_absolute_paths(cfg).model.pretrained == "hf-hub:acme/resnet18.cats"
    _check_pretrained(cfg)  # before: "model.pretrained: no weights file at hf-hub:acme/resnet18.cats"
    with pytest.raises(ConfigError, match="no weights file at"):  # a real path still is one
        _check_pretrained(_hub_cfg(str(tmp_path / "missing.safetensors")))


def test_hf_hub_weights_and_preprocessing_load_through_timm(offline_hub: Path):
    torch.manual_seed(0)
    source = timm.create_model("resnet18", num_classes=1000)
    _put_hub_repo(offline_hub, "acme/resnet18.cats", "resnet18", source, mean=[0.1, 0.2, 0.3])
    cfg = _hub_cfg("hf-hub:acme/resnet18.cats").model

    model = create_model(cfg, num_classes=5)
    assert model.get_classifier().out_features == 5  # a new head; every other tensor from the hub repository
    for name, tensor in model.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(tensor, source.state_dict()[name]), name
    data_config = data_config_for(cfg)  # the repository's own preprocessing
    assert data_config["mean"] == pytest.approx([0.1, 0.2, 0.3]) and data_config["crop_pct"] == pytest.approx(0.95)


def test_hf_hub_repository_of_another_architecture_is_a_config_error_naming_both_keys(offline_hub: Path):
    _put_hub_repo(offline_hub, "acme/resnet34.cats", "resnet34", timm.create_model("resnet34"), mean=[0.5] * 3)
    cfg = _hub_cfg("hf-hub:acme/resnet34.cats").model  # the architecture is only known from the hub
    for build in (lambda: create_model(cfg, num_classes=5), lambda: data_config_for(cfg)):
        with pytest.raises(ConfigError) as info:
            build()
        message = str(info.value)
        assert "model.pretrained" in message and "model.name" in message and "resnet34" in message, message


def test_missing_hf_hub_repository_fails_in_the_hub_download(offline_hub: Path):
    with pytest.raises(LocalEntryNotFoundError):  # huggingface_hub's error, not "no weights file at hf-hub:..."
        create_model(_hub_cfg("hf-hub:acme/resnet18.nothere").model, num_classes=5)
