"""The typed config loader (YAML + ``--set``) and URI storage (local paths, file://, s3:// on the session's
SeaweedFS server)."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from cls_ray import storage
from cls_ray.config import Config, ConfigError, IngestConfig, load_config, parse_overrides, write_resolved


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------------------------------------------
# Config


def test_defaults_yaml_and_overrides(tmp_path):
    assert load_config() == Config()
    path = _write(
        tmp_path / "c.yaml", "ingest:\n  seed: 4\n  max_side: 256\ntrain:\n  epochs: 3\nmodel:\n  name: resnet18\n"
    )
    cfg = load_config(path, ["ingest.seed=9", "optim.lr=0.01", "data.scale=[0.5, 1.0]", "model.pretrained=null"])
    assert cfg.ingest.seed == 9 and cfg.ingest.max_side == 256  # --set wins over the file, the rest stays
    assert cfg.train.epochs == 3 and cfg.model.name == "resnet18"
    assert cfg.optim.lr == 0.01 and cfg.data.scale == [0.5, 1.0] and cfg.model.pretrained is None
    assert cfg.ingest.val_fraction == IngestConfig().val_fraction
    assert isinstance(load_config(None, ["ingest.val_fraction=0"]).ingest.val_fraction, float)  # int -> float


def test_unknown_key_names_key_and_file(tmp_path):
    path = _write(tmp_path / "c.yaml", "ingest:\n  sed: 4\n")
    with pytest.raises(ConfigError, match=rf"unknown key ingest\.sed \(in {path}\).*seed"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown key ingestt \(in --set\)"):
        load_config(None, ["ingestt.seed=1"])
    with pytest.raises(ConfigError, match=rf"unknown key train\.epoch \(in {path} \+ --set\)"):
        load_config(_write(tmp_path / "c.yaml", "train:\n  epochs: 2\n"), ["train.epoch=3"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ingest:\n  seed: four\n", r"ingest\.seed \(in {path}\): expected an integer, got 'four'"),
        ("ingest:\n  overwrite: 1\n", r"ingest\.overwrite \(in {path}\): expected true or false"),
        ("ingest:\n  val_fraction: [1]\n", r"ingest\.val_fraction \(in {path}\): expected a number"),
        ("train:\n  amp: fp8\n", r"train\.amp \(in {path}\): 'fp8' is not one of"),
        ("train:\n  tracking: [wandb]\n", r"train\.tracking\[0\] \(in {path}\): 'wandb' is not one of"),
        ("tune:\n  tracking: mlflow\n", r"tune\.tracking \(in {path}\): expected a list"),
        ("train:\n  tracking: [mlflow, mlflow]\n", r"train\.tracking: names a tracker twice \(in {path}\)"),
        ("tracking:\n  timeout_s: 0\n", r"tracking\.timeout_s: must be positive \(in {path}\)"),
        ("ingest: 3\n", r"ingest \(in {path}\): expected a mapping of IngestConfig fields"),
        (
            "ingest:\n  val_fraction: 0.6\n  test_fraction: 0.5\n",
            r"ingest\.val_fraction \+ ingest\.test_fraction: "
            r"must leave some images .* \(in {path}\)",
        ),
        ("ingest:\n  jpeg_quality: 0\n", r"ingest\.jpeg_quality: must be in \[1, 100\] \(in {path}\)"),
        ("- a\n- b\n", r"{path}: the top level must be a mapping"),
        ("ingest: [unclosed\n", r"{path}: not valid YAML"),
    ],
)
def test_bad_values_name_key_and_file(tmp_path, text, message):
    path = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError, match=message.format(path=path)):
        load_config(path)


def test_bad_overrides_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"--set 'ingest\.seed': expected section\.key=value"):
        parse_overrides(["ingest.seed"])
    with pytest.raises(ConfigError, match=r"ingest\.seed \(in --set\): expected an integer"):
        load_config(None, ["ingest.seed=abc"])
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=rf"cannot read config file: {missing}"):
        load_config(missing)


def test_config_on_s3_and_resolved_copy(s3_bucket, tmp_path):
    storage.write_bytes(f"{s3_bucket}/cfg/c.yaml", b"ingest:\n  seed: 7\n")
    cfg = load_config(f"{s3_bucket}/cfg/c.yaml", ["ingest.max_side=64"])
    assert cfg.ingest.seed == 7 and cfg.ingest.max_side == 64
    uri = write_resolved(cfg, str(tmp_path / "out"))
    assert load_config(uri) == cfg  # the resolved dump loads back to the same config


# --------------------------------------------------------------------------------------------------------------
# Storage


def test_resolve_local_file_and_s3(tmp_path, monkeypatch, s3_server):
    monkeypatch.chdir(tmp_path)
    fs, path = storage.resolve("data/x")
    assert isinstance(fs, pafs.LocalFileSystem) and path == os.path.join(str(tmp_path), "data", "x")
    fs, path = storage.resolve(f"file://{tmp_path}/y")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/y"
    fs, path = storage.resolve("s3://bucket/some/prefix/")
    assert path == "bucket/some/prefix"
    assert fs.type_name == "py::cls-ray-retrying+s3" and isinstance(fs.handler.fs, pafs.S3FileSystem)
    assert storage.join("s3://b/p/", "train", "x.parquet") == "s3://b/p/train/x.parquet"
    assert storage.join("file:///d", "m.json") == "file:///d/m.json"
    assert storage.join("rel", "a") == os.path.join("rel", "a")
    assert storage.is_remote("s3://b") and not storage.is_remote("/s3://b")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "an empty URI"),
        ("s3://", "names no bucket"),
        ("gs://bucket/x", "unsupported URI scheme"),
    ],
)
def test_resolve_refuses_bad_uris(uri, message):
    with pytest.raises(storage.StorageError, match=message):
        storage.resolve(uri)


@pytest.mark.parametrize("where", ["local", "file", "s3"])
def test_read_write_list_delete(where, tmp_path, s3_bucket):
    root = {"local": str(tmp_path / "r"), "file": f"file://{tmp_path}/r", "s3": f"{s3_bucket}/r"}[where]
    storage.write_bytes(storage.join(root, "a", "b.bin"), b"\x00\x01")
    storage.write_json(storage.join(root, "m.json"), {"z": 1, "a": [1, 2]})
    assert storage.read_bytes(storage.join(root, "a", "b.bin")) == b"\x00\x01"
    assert storage.read_bytes(storage.join(root, "m.json")).startswith(b'{\n  "a"')  # sorted keys
    assert storage.read_json(storage.join(root, "m.json")) == {"z": 1, "a": [1, 2]}
    assert storage.exists(storage.join(root, "a")) and storage.is_dir(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "nope"))
    names = sorted(i.base_name for i in storage.list_files(root))
    assert names == ["b.bin", "m.json"]
    storage.delete(storage.join(root, "a"))
    storage.delete(storage.join(root, "never-was"))  # not an error
    assert not storage.exists(storage.join(root, "a", "b.bin"))
    with pytest.raises(storage.StorageError, match="r/missing"):
        storage.read_bytes(storage.join(root, "missing"))
    if where == "local":
        assert not [p for p in os.listdir(root) if ".tmp-" in p]  # atomic writes leave no temporaries


def test_list_missing_dir_and_error_hints(tmp_path):
    with pytest.raises(storage.StorageError, match="no such directory"):
        storage.list_files(str(tmp_path / "absent"))
    assert "check AWS_ENDPOINT_URL" in storage.describe_error("s3://b/k", OSError("curlCode: 7, Could not connect"))
    assert "check the AWS credentials" in storage.describe_error("s3://b/k", OSError("AWS Error ACCESS_DENIED"))
    assert "the bucket does not exist" in storage.describe_error("s3://b/k", OSError("NoSuchBucket"))
    assert storage.describe_error("/local/x", OSError("boom")) == "/local/x: boom"


def test_relative_paths_become_absolute_and_uris_do_not(tmp_path, monkeypatch):
    from cls_ray.config import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text("version: 1\n")
    (tmp_path / "w.safetensors").write_bytes(b"")
    cfg = load_config(
        None,
        [
            "source=data/folders",
            "workdir=work",
            "train.storage_path=s3://b/runs",
            "tune.space=space.yaml",
            "model.pretrained=w.safetensors",
        ],
    )
    out = with_absolute_paths(cfg)
    assert out.source == str(tmp_path / "data" / "folders") and out.workdir == str(tmp_path / "work")
    assert out.train.storage_path == "s3://b/runs" and out.tune.storage_path == str(tmp_path / "runs")
    assert out.tune.space == str(tmp_path / "space.yaml") and out.model.pretrained == str(tmp_path / "w.safetensors")
    assert cfg.workdir == "work"  # the caller's config is left as it was
    hub = with_absolute_paths(load_config(None, ["model.name=resnet18", "model.pretrained=resnet18.a1_in1k"]))
    assert hub.model.pretrained == "resnet18.a1_in1k"  # a hub name, not a file here
    assert storage.absolute("file:///x/y") == "file:///x/y" and storage.absolute("~/a") == os.path.expanduser("~/a")
