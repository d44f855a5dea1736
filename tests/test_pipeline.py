"""`cls-ray pipeline` end to end on real data: ingest -> proxy search on a subset -> final training of the winner ->
test evaluation -> serving with real HTTP requests, all from one config file, in a fresh process as a user runs it.
Also: every config YAML the project ships loads."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import RAY_NOISE, console_lines, free_port, write_digits_folders

from cls_ray.config import load_config
from cls_ray.data.manifest import read_manifest
from cls_ray.package import read_package_meta

REPO = Path(__file__).resolve().parents[1]
#: Console lines of the whole chain below (seven stages, a 1-trial search; 265 measured with 2 trials), most of them
#: Tune's trial table, which Tune reprints every 30 s (so a slower machine prints more of them).
PIPELINE_LINE_BUDGET = 450

PIPELINE = {
    "pipeline": {
        "stages": ["ingest", "tune", "train", "evaluate", "export", "predict", "serve"],
        "tune_subset_per_class": 12,
        "serve_samples": 4,
    },
    "model": {"name": "resnet10t", "image_size": 32, "crop_pct": 1.0},
    "data": {
        "batch_size": 32,
        "eval_batch_size": 128,
        "auto_augment": None,
        "re_prob": 0.0,
        "hflip": 0.0,
        "scale": [0.6, 1.0],
        "label_smoothing": 0.0,
    },
    "optim": {"lr": 0.01, "warmup_epochs": 0},
    "train": {"epochs": 3, "num_workers": 1, "max_failures": 0, "keep_checkpoints": 1},
    "tune": {"num_samples": 1, "max_epochs": 1, "grace_period": 1, "evaluate_test": False},  # the chain, not the search
}

SPACE = """
version: 1
params:
  optim.lr: {loguniform: [3.0e-3, 3.0e-2]}
families:
  resnet: {architectures: [resnet10t]}
"""


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(2400)  # five stages, each starting Ray work, on 2 cores: minutes quiet, far more under load
def test_pipeline_runs_the_whole_chain_from_one_config(tmp_path):
    source = write_digits_folders(tmp_path / "digits", per_class=60)
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    workdir = tmp_path / "work"
    port = free_port()
    # Relative paths, as a user types them: trials and replicas run in other directories than the command.
    config = {
        **PIPELINE,
        "source": str(source.relative_to(tmp_path)),
        "workdir": "work",
        "pipeline": {**PIPELINE["pipeline"], "predict_source": str((source / "digit_3").relative_to(tmp_path))},
        "tune": {**PIPELINE["tune"], "space": space.name},
        "serve": {"port": port, "max_replicas": 1},
    }
    config_path = tmp_path / "pipeline.yaml"
    config_path.write_text(yaml.safe_dump(config))

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "cls_ray.cli", "pipeline", "--config", str(config_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=2300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    # Every stage left its output under the workdir.
    manifest = read_manifest(str(workdir / "dataset"))
    assert len(manifest["classes"]) == 10
    subset = read_manifest(str(workdir / "dataset-search"))
    assert all(count <= 12 for count in subset["splits"]["train"]["class_counts"])
    assert subset["subset_of"]["per_class"] == 12
    assert (workdir / "search" / "best" / "model.json").exists()
    meta = read_package_meta(str(workdir / "runs" / "final" / "package"))
    assert meta["architecture"] == "resnet10t" and meta["classes"] == manifest["classes"]
    final_cfg = load_config(str(workdir / "runs" / "final" / "config.yaml"))
    assert final_cfg.train.epochs == 3  # the user's epochs, not the search's max_epochs
    assert 3e-3 <= final_cfg.optim.lr <= 3e-2  # the search winner's learning rate

    metrics = json.loads((workdir / "evaluation" / "metrics.json").read_text())["metrics"]
    assert metrics["num_samples"] == sum(manifest["splits"]["test"]["class_counts"])
    assert metrics["top1"] > 0.5, metrics  # ten classes: chance is 0.1

    # The export stage recorded a parity-checked ONNX file in the final package.
    (onnx,) = [e for e in meta["exports"] if e["format"] == "onnx"]
    assert (workdir / "runs" / "final" / "package" / onnx["file"]).exists()
    assert onnx["parity"]["max_abs_diff"] <= 1e-4

    # The predict stage scored every file of pipeline.predict_source.
    predicted = json.loads((workdir / "predictions" / "_summary.json").read_text())
    assert predicted["files"] == predicted["scored"] == len(list((source / "digit_3").glob("*.png")))

    # The serving check printed predictions for real test images received over HTTP.
    assert f"127.0.0.1:{port}/v1/predict" in proc.stdout
    assert "served predictions match the true labels" in proc.stdout
    assert load_config(str(workdir / "config.yaml")).pipeline.stages == PIPELINE["pipeline"]["stages"]

    # The whole chain's console in a pipe (as in a CI log): no Ray output, cls-ray's own lines once each, within a
    # line budget. (Tune's trial table repeats its rows by design; its lines are not cls-ray's.)
    transcript = proc.stdout + proc.stderr
    lines = console_lines(transcript)
    assert not [line for line in lines if RAY_NOISE.search(line)], transcript[-5000:]
    own = [line for line in lines if re.match(r"\d\d:\d\d:\d\d \w+ cls_ray\.|epoch \d+/\d+ \|", line)]
    assert own and len(own) == len(set(own)), transcript[-5000:]
    assert len(lines) <= PIPELINE_LINE_BUDGET, f"{len(lines)} lines: {transcript[-5000:]}"


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(path):
    """Every YAML in configs/ loads: pipeline configs through the config loader, search spaces through theirs."""
    from cls_ray.tune.space import load_search_space

    text = yaml.safe_load((REPO / path).read_text())
    if "families" in text or "params" in text:
        assert load_search_space(str(REPO / path))
    else:
        assert load_config(str(REPO / path)).model.name


def test_demo_config_names_its_search_space():
    from cls_ray.pipeline import DEMO_CONFIG
    from cls_ray.tune.space import load_search_space, resolve_space_uri, trial_config

    cfg = load_config(str(DEMO_CONFIG))
    assert "tune" in cfg.pipeline.stages
    # The demo searches the shipped quick.yaml, found by name from any directory, over its two architectures; the
    # demo config's input and batch size override the space's 32 px default (the winner's training budget).
    assert resolve_space_uri(cfg.tune.space) == str(REPO / "search_spaces" / "quick.yaml")
    space = load_search_space(cfg.tune.space, base=cfg)
    assert len(space.architectures) == 2 and cfg.tune.num_samples >= 2
    for arch in space.architectures:
        trial = trial_config(cfg, {**space.fixed, "model.name": arch}, "demo trial")
        assert (trial.model.image_size, trial.data.batch_size) == (28, 128)


def test_pipeline_without_source_is_refused_before_any_work(tmp_path):
    config_path = tmp_path / "pipeline.yaml"
    config_path.write_text(yaml.safe_dump({"workdir": str(tmp_path / "work"), "pipeline": {"stages": ["ingest"]}}))
    proc = subprocess.run(
        [sys.executable, "-m", "cls_ray.cli", "pipeline", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "source" in proc.stderr
    assert not (tmp_path / "work" / "dataset").exists()


def test_unknown_stage_names_key_and_file(tmp_path):
    config_path = tmp_path / "pipeline.yaml"
    config_path.write_text(yaml.safe_dump({"pipeline": {"stages": ["ingest", "deploy"]}}))
    with pytest.raises(ValueError, match=r"pipeline.stages.*deploy.*pipeline.yaml"):
        load_config(str(config_path))
