"""Every pipeline config we ship, resolved to what `cls-ray pipeline` would really train with it.

A config names a model, but with the tune stage the search space decides: each trial is the base config with the
trial's sampled and fixed values (``trial_config``, as ``run_trial`` builds it), and the final run is the base config
with the winner's values (``pipeline._final_config``). So a "ResNet-50" config that searches ``quick.yaml`` trains
ResNet-10-T or MobileNetV3-Small from scratch. Here every shipped config (``configs/*.yaml``,
``cluster/pipeline*.yaml``, the ``pipeline*.yaml`` of every ConfigMap in ``k8s/``) goes through the project's own
functions: its space is loaded against it, Ray Tune's OptunaSearch (built as ``cls-ray tune`` builds it) proposes
every trial of the search, each trial's Config is built, each trial is taken as the winner of the final run, and
the architecture, start (mode, weights) and input size of each are checked against what the config is shipped for.
No Ray cluster is started and nothing trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cls_ray.config import Config, load_config
from cls_ray.models import data_config_for, weights_source
from cls_ray.pipeline import _final_config
from cls_ray.tune.space import SearchSpace, load_search_space, resolve_space_uri, trial_config
from cls_ray.tune.tuner import TuneResult, build_searcher, experiment_uri, trial_base_config

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

REPO = Path(__file__).resolve().parents[1]
IMAGE_HOME = "/home/ray/cls-ray/"  # where the Dockerfile puts the repository inside the image


@dataclass(frozen=True)
class Trains:
    """What a shipped config is meant to train, in every trial and in the final run."""

    architectures: frozenset[str]
    mode: str
    image_size: int
    weights: str | None
    """Where the starting weights come from (:func:`cls_ray.models.weights_source`); None: random init."""


GPU = Trains(
    architectures=frozenset({"resnet18", "resnet50", "efficientnet_b0", "vit_small_patch16_224"}),
    mode="finetune",
    image_size=224,
    weights="timm",
)
DEMO = Trains(
    architectures=frozenset({"resnet10t", "mobilenetv3_small_050"}), mode="scratch", image_size=28, weights=None
)
EXPECTED = {
    "configs/demo.yaml": DEMO,
    "cluster/pipeline-s3.yaml": GPU,
    "k8s/rayjob.yaml:pipeline.yaml": GPU,
}


def shipped_config_texts() -> dict[str, str]:
    """Every pipeline config in the repository, by id (its path, plus the ConfigMap key for k8s ones)."""
    texts = {}
    for path in [*sorted((REPO / "configs").glob("*.yaml")), *sorted((REPO / "cluster").glob("pipeline*.yaml"))]:
        if "families" not in (yaml.safe_load(path.read_text()) or {}):  # not a search space kept in configs/
            texts[str(path.relative_to(REPO))] = path.read_text()
    for path in sorted((REPO / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "ConfigMap":
                for key, text in (doc.get("data") or {}).items():
                    if key.startswith("pipeline") and key.endswith(".yaml"):
                        texts[f"{path.relative_to(REPO)}:{key}"] = text
    return texts


def load_shipped(config_id: str, tmp_path: Path) -> Config:
    path = tmp_path / Path(config_id.split(":")[-1]).name
    path.write_text(shipped_config_texts()[config_id])
    return load_config(str(path))


def space_in_checkout(uri: str) -> str:
    """The checkout's copy of a space as the config names it where it runs: in the image (k8s), relative to the
    job's working_dir, the repository root (cluster/), or a shipped name (the demo's ``quick``)."""
    if uri.startswith(IMAGE_HOME):
        return str(REPO / uri[len(IMAGE_HOME) :])
    if (REPO / uri).is_file():
        return str(REPO / uri)
    return resolve_space_uri(uri)


def search_trials(space: SearchSpace, cfg: Config) -> list[dict]:
    """The sampled values of every trial of the search, as Ray Tune's OptunaSearch proposes them to ``cls-ray tune``
    (``tune.num_samples`` of them; a made-up score reported after each, so TPE goes past its start-up trials)."""
    searcher = build_searcher(space, cfg)
    searcher.set_search_properties(cfg.train.metric, cfg.train.metric_mode, {})
    trials = []
    for i in range(cfg.tune.num_samples):
        trials.append(searcher.suggest(f"t{i}"))
        searcher.on_trial_complete(f"t{i}", {cfg.train.metric: (i % 5) / 5})
    return trials


def assert_trains(cfg: Config, trains: Trains, what: str, input_sizes: dict) -> None:
    model = cfg.model
    assert model.name in trains.architectures, f"{what} trains {model.name}"
    assert model.mode == trains.mode, f"{what} trains {model.name} in mode {model.mode}"
    assert weights_source(model) == trains.weights, f"{what} starts {model.name} from {model.pretrained!r}"
    assert model.image_size == trains.image_size, f"{what} trains {model.name} at {model.image_size} px"
    key = (model.name, model.pretrained, model.mode, model.image_size)
    if key not in input_sizes:  # the input size the workers' data pipeline is built for
        input_sizes[key] = data_config_for(model)["input_size"]
    assert input_sizes[key] == [3, trains.image_size, trains.image_size], f"{what}: {input_sizes[key]}"


def test_every_shipped_pipeline_config_has_its_expectation():
    assert set(shipped_config_texts()) == set(EXPECTED)


@pytest.mark.parametrize("config_id", sorted(EXPECTED))
def test_shipped_config_trains_the_architectures_mode_and_size_it_is_shipped_for(config_id: str, tmp_path: Path):
    trains = EXPECTED[config_id]
    cfg = load_shipped(config_id, tmp_path)
    input_sizes: dict = {}
    # `cls-ray train` with the file alone trains its own model section.
    assert_trains(cfg, trains, f"{config_id} (model section)", input_sizes)
    if "tune" not in cfg.pipeline.stages:
        assert_trains(_final_config(cfg, None), trains, f"{config_id} (final run)", input_sizes)
        return
    space = load_search_space(space_in_checkout(cfg.tune.space), base=cfg)
    assert set(space.architectures) == trains.architectures, f"{config_id} searches {space.source}"
    base = trial_base_config(cfg, experiment_uri(cfg))
    trials = search_trials(space, cfg)
    assert {t["model.name"] for t in trials} == trains.architectures, "the search tries every architecture"
    for i, values in enumerate(trials):
        name = f"trial_{i + 1:04d}_{values['model.name']}"
        trial_cfg = trial_config(base, {**values, "train.run_name": name}, f"trial {name}")
        assert_trains(trial_cfg, trains, f"{config_id}: search {name}", input_sizes)
        assert trial_cfg.train.epochs == cfg.tune.max_epochs
        if "train" in cfg.pipeline.stages:  # this trial as the search's winner, trained on the full data
            winner = TuneResult(
                experiment_uri="",
                leaderboard_uri="",
                best_package_uri="",
                best_metric=1.0,
                metric=cfg.train.metric,
                best_trial=name,
                best_config=values,
            )
            final = _final_config(cfg, winner)
            assert_trains(final, trains, f"{config_id}: final run of winner {name}", input_sizes)
            assert final.model.name == values["model.name"] and final.train.epochs == cfg.train.epochs
