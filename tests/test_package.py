"""The model package format: a name (checked, URL-safe) and a version that is the weights' digest; packages of the
previous format still load; a package whose weights are not the ones its model.json describes is refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import timm
import torch

from cls_ray.config import ConfigError, load_config
from cls_ray.models import model_data_config
from cls_ray.package import (
    PackageError,
    load_model_package,
    package_name,
    read_package_meta,
    save_model_package,
    update_package_meta,
)


def _meta(model: torch.nn.Module, **extra) -> dict:
    return {
        "architecture": "resnet10t",
        "classes": ["a", "b", "c"],
        "data_config": model_data_config(model, 32),
        **extra,
    }


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("resnet10t", num_classes=3)


def test_version_is_the_weights_digest_and_changes_only_with_the_weights(tmp_path):
    model = _model(0)
    save_model_package(str(tmp_path / "a"), model, _meta(model, name="flowers"))
    save_model_package(str(tmp_path / "same"), model, _meta(model, name="flowers"))
    other = _model(1)
    save_model_package(str(tmp_path / "b"), other, _meta(other, name="flowers"))

    a, same, b = (read_package_meta(str(tmp_path / n)) for n in ("a", "same", "b"))
    weights = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a["version"] == hashlib.sha256(weights).hexdigest()[:12] and a["name"] == "flowers"
    assert a["version"] == same["version"] != b["version"]
    package = load_model_package(str(tmp_path / "a"))
    assert (package.name, package.version) == ("flowers", a["version"])


def test_names_must_be_url_safe_and_the_version_is_not_the_callers(tmp_path):
    model = _model(0)
    with pytest.raises(PackageError, match="name 'my photos'"):
        save_model_package(str(tmp_path / "p"), model, _meta(model, name="my photos"))
    with pytest.raises(PackageError, match="'name'"):
        save_model_package(str(tmp_path / "p"), model, _meta(model))
    with pytest.raises(PackageError, match="'version'"):
        save_model_package(str(tmp_path / "p"), model, _meta(model, name="x", version="3"))
    assert not (tmp_path / "p").exists()
    assert package_name("my photos/") == "my-photos" and package_name("///") == "model"
    with pytest.raises(ConfigError, match="train.package_name"):
        load_config(None, ["train.package_name=my photos"])
    assert load_config(None, ["train.package_name=flowers-v2.1"]).train.package_name == "flowers-v2.1"


def test_previous_format_packages_load_with_a_derived_name_and_version(tmp_path):
    model = _model(0)
    uri = str(tmp_path / "old")
    save_model_package(uri, model, _meta(model, name="ignored"))
    meta_path = Path(uri, "model.json")
    old = json.loads(meta_path.read_text())
    for key in ("name", "version", "weights_sha256"):
        del old[key]
    old["format_version"] = 1
    meta_path.write_text(json.dumps(old))

    package = load_model_package(uri)
    weights = Path(uri, "model.safetensors").read_bytes()
    assert package.name == "resnet10t" and package.version == hashlib.sha256(weights).hexdigest()[:12]


def test_metadata_updates_keep_the_stored_format(tmp_path):
    """Recording an export or a calibration rewrites model.json as stored: a format-1 package stays format 1 (its
    name and version are still derived when read, not frozen into the file), and the weights' digest and version
    cannot be updated."""
    model = _model(0)
    uri = str(tmp_path / "old")
    save_model_package(uri, model, _meta(model, name="ignored"))
    meta_path = Path(uri, "model.json")
    old = json.loads(meta_path.read_text())
    for key in ("name", "version", "weights_sha256"):
        del old[key]
    old["format_version"] = 1
    meta_path.write_text(json.dumps(old))

    update_package_meta(uri, {"calibration": {"temperature": 1.7}})
    stored = json.loads(meta_path.read_text())
    assert stored["format_version"] == 1 and "name" not in stored and "version" not in stored
    assert stored["calibration"] == {"temperature": 1.7}
    assert read_package_meta(uri)["name"] == "resnet10t"
    copy = tmp_path / "copy"
    update_package_meta(uri, {"exports": []}, target_uri=str(copy))
    assert json.loads((copy / "model.json").read_text())["exports"] == []
    for key in ("version", "weights_sha256", "format_version"):
        with pytest.raises(PackageError, match=key):
            update_package_meta(uri, {key: "x"})
    assert json.loads(meta_path.read_text()) == stored
    with pytest.raises(PackageError, match="model.json is missing"):
        update_package_meta(str(tmp_path / "nothing"), {"calibration": {}})


def test_weights_that_do_not_match_model_json_are_refused(tmp_path):
    model = _model(0)
    uri = str(tmp_path / "p")
    save_model_package(uri, model, _meta(model, name="flowers"))
    other = _model(1)
    save_model_package(str(tmp_path / "q"), other, _meta(other, name="flowers"))
    (tmp_path / "p" / "model.safetensors").write_bytes((tmp_path / "q" / "model.safetensors").read_bytes())
    with pytest.raises(PackageError, match="SHA-256"):
        load_model_package(uri)
