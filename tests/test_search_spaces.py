"""Search spaces: every shipped YAML loads and yields valid trial configs; malformed spaces are refused with the file,
the key and the reason. No Ray, no training: Optuna samples the define-by-run space directly."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import timm

from cls_ray.config import Config, load_config
from cls_ray.tune.space import (
    CONDITIONAL_SEP,
    SearchSpaceError,
    config_values,
    load_search_space,
    resolve_space_uri,
    trial_config,
)

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

SPACES_DIR = Path(__file__).resolve().parents[1] / "search_spaces"
SHIPPED = sorted(SPACES_DIR.glob("*.yaml"))
REQUIRED = {
    "quick": {"resnet10t", "mobilenetv3_small_050"},
    "cnn": {"resnet18", "resnet50", "resnet101", "efficientnet_b0", "mobilenetv3_small_100"},
    "vit": {"vit_small_patch16_224", "vit_base_patch16_224"},
    "gpu": {"resnet18", "resnet50", "efficientnet_b0", "vit_small_patch16_224"},
}


def _sample(space, n: int, seed: int = 0) -> list[tuple[dict, dict]]:
    """Sample ``n`` trials with seeded TPE (random start, then the model), telling it a score so TPE is exercised.
    Returns (the trial's Config values, Optuna's parameter names and values) per trial."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True, group=True)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    samples = []
    for i in range(n):
        trial = study.ask()
        samples.append((space(trial), dict(trial.params)))
        study.tell(trial, float(i % 7) / 7)
    return samples


def test_every_required_space_is_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"quick", "cnn", "vit", "default", "gpu"} <= names
    default = load_search_space(str(SPACES_DIR / "default.yaml"))
    assert set().union(*(REQUIRED[k] for k in ("cnn", "vit"))) <= set(default.architectures)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_space_yields_valid_trial_configs(path: Path):
    text = path.read_text()
    assert text.startswith("# cls-ray search space"), "every space starts with a header comment explaining the format"
    space = load_search_space(str(path))
    assert set(REQUIRED.get(path.stem, set())) <= set(space.architectures)
    seen_archs = set()
    for values, params in _sample(space, 40):
        cfg = trial_config(Config(), values, f"{path.name} sample")
        assert timm.is_model(cfg.model.name)
        seen_archs.add(cfg.model.name)
        fam = space.family_of(cfg.model.name)
        # Every searched and fixed value reached the Config, and conditional params follow the sampled family.
        for key, value in config_values(values).items():
            section, name = key.split(".")
            assert getattr(getattr(cfg, section), name) == value, key
        for key in params:
            if CONDITIONAL_SEP in key:
                assert key.endswith(f"{CONDITIONAL_SEP}{fam.name}")
        for key, param in {**space.params, **fam.params}.items():
            if key in fam.fixed:
                continue
            value = config_values(values)[key]
            if param.kind == "choice":
                assert value in param.values
            elif key not in fam.architectures[cfg.model.name]:
                assert param.low <= value <= param.high, (key, value)
    assert len(seen_archs) >= min(2, len(space.architectures))


def test_family_params_replace_shared_ones():
    space = load_search_space(str(SPACES_DIR / "quick.yaml"))
    lows = {"resnet10t": 1.0e-3, "mobilenetv3_small_050": 2.0e-3}
    for values, params in _sample(space, 30, seed=3):
        arch = values["model.name"]
        assert values["optim.lr"] >= lows[arch] * (1 - 1e-9)
        if arch == "mobilenetv3_small_050":
            assert params[f"optim.lr{CONDITIONAL_SEP}mobilenet"] == values["optim.lr"]
            assert "optim.lr" not in params
        else:
            assert params["optim.lr"] == values["optim.lr"]
            assert f"optim.lr{CONDITIONAL_SEP}mobilenet" not in params


def test_defaults_fill_only_what_the_base_config_leaves_unset():
    # quick.yaml: 32 px unless the base config names a size (the demo's 28 px); batch size always from the base.
    unset = load_search_space("quick", base=Config())
    sized = load_search_space("quick", base=load_config(None, ["model.image_size=28", "data.batch_size=128"]))
    for space, base, size in ((unset, Config(), 32), (sized, load_config(None, ["model.image_size=28"]), 28)):
        for values, _ in _sample(space, 6):
            cfg = trial_config(base, values, "sample")
            assert cfg.model.image_size == size
            assert cfg.data.batch_size == base.data.batch_size
    assert "model.image_size" not in config_values(_sample(sized, 1)[0][0])


def test_space_resolves_by_name_and_applies_to_a_base_config():
    assert resolve_space_uri("quick") == str(SPACES_DIR / "quick.yaml")
    base = load_config(None, ["train.num_workers=1", "data.eval_batch_size=64"])
    space = load_search_space("quick", base=base)
    cfg = trial_config(base, _sample(space, 1)[0][0], "sample")
    assert cfg.train.num_workers == 1 and cfg.data.eval_batch_size == 64


GOOD = """
version: 1
params:
  optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
families:
  resnet:
    architectures: [resnet10t]
"""


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


BAD_SPACES = [
    ("typo in a Config key", GOOD.replace("optim.lr:", "optim.lrr:"), ["params.optim.lrr", "unknown key"]),
    ("typo in a section", GOOD.replace("optim.lr:", "optimm.lr:"), ["params.optimm.lr", "cannot be searched"]),
    ("typo at the top level", GOOD.replace("params:", "parms:"), ["parms", "unknown key"]),
    ("typo in a family", GOOD.replace("architectures:", "architecture:"), ["families.resnet.architecture"]),
    ("unknown architecture", GOOD.replace("[resnet10t]", "[resnet10tt]"), ["resnet10tt", "timm has no architecture"]),
    ("empty range", GOOD.replace("[1.0e-4, 1.0e-2]", "[1.0e-2, 1.0e-4]"), ["params.optim.lr", "empty range"]),
    ("equal bounds", GOOD.replace("[1.0e-4, 1.0e-2]", "[1.0e-2, 1.0e-2]"), ["params.optim.lr", "empty range"]),
    ("empty choice", GOOD.replace("{loguniform: [1.0e-4, 1.0e-2]}", "{choice: []}"), ["optim.lr", "empty choice"]),
    ("log of zero", GOOD.replace("[1.0e-4, 1.0e-2]", "[0, 1.0e-2]"), ["params.optim.lr", "low > 0"]),
    ("unknown distribution", GOOD.replace("loguniform", "lognormal"), ["params.optim.lr", "distribution"]),
    ("constant among params", GOOD.replace("{loguniform: [1.0e-4, 1.0e-2]}", "0.01"), ["optim.lr", "fixed"]),
    ("no architectures", GOOD.replace("[resnet10t]", "[]"), ["families.resnet.architectures", "non-empty"]),
    ("no families", "version: 1\nparams: {}\n", ["families", "non-empty"]),
    ("reserved key", GOOD.replace("optim.lr:", "train.epochs:"), ["train.epochs", "tune.max_epochs"]),
    (
        "value the Config refuses",
        GOOD.replace("optim.lr: {loguniform: [1.0e-4, 1.0e-2]}", "data.batch_size: {choice: [0, 32]}"),
        ["data.batch_size", "at least 1"],
    ),
    (
        "wrong type",
        GOOD.replace("optim.lr: {loguniform: [1.0e-4, 1.0e-2]}", "data.batch_size: {uniform: [16, 64]}"),
        ["data.batch_size", "expected an integer"],
    ),
    (
        "impossible value",
        GOOD.replace("optim.lr: {loguniform: [1.0e-4, 1.0e-2]}", "model.mode: {choice: [frozen]}"),
        ["model.mode", "needs model.pretrained"],
    ),
    (
        "list choice",
        GOOD.replace("optim.lr: {loguniform: [1.0e-4, 1.0e-2]}", "data.scale: {choice: [[0.5, 1.0]]}"),
        ["data.scale", "scalars"],
    ),
    (
        "wrong hub tag",
        GOOD.replace("[resnet10t]", "{resnet10t: {model.pretrained: resnet18.a1_in1k}}"),
        ["model.pretrained", "not a tag of"],
    ),
    ("unknown version", "version: 2\n" + GOOD.replace("version: 1\n", ""), ["version", "not supported"]),
    ("architecture in two families", GOOD + "  other:\n    architectures: [resnet10t]\n", ["already in family"]),
    ("not YAML", "families: [unclosed", ["not valid YAML"]),
    (
        "default for a key that is never null",
        "defaults: {data.batch_size: 32}\n" + GOOD,
        ["defaults.data.batch_size", "null unless set", "fixed"],
    ),
    (
        "default the space also sets",
        "defaults: {model.image_size: 32}\nfixed: {model.image_size: 48}\n" + GOOD,
        ["defaults.model.image_size", "`fixed`"],
    ),
    ("typo in a default", "defaults: {model.image_sise: 32}\n" + GOOD, ["defaults.model.image_sise", "unknown key"]),
    ("default the Config refuses", "defaults: {model.image_size: 4}\n" + GOOD, ["model.image_size", "at least 8"]),
]


@pytest.mark.parametrize("text, expected", [(t, e) for _, t, e in BAD_SPACES], ids=[n for n, _, _ in BAD_SPACES])
def test_bad_space_is_refused_naming_file_key_and_reason(tmp_path: Path, text: str, expected: list[str]):
    uri = _write(tmp_path, text)
    with pytest.raises(SearchSpaceError) as info:
        load_search_space(uri)
    message = str(info.value)
    assert uri in message
    for part in expected:
        assert part in message, message


def test_missing_space_file_is_refused(tmp_path: Path):
    with pytest.raises(SearchSpaceError, match="cannot read search space"):
        load_search_space(str(tmp_path / "nope.yaml"))


def test_good_space_loads(tmp_path: Path):
    space = load_search_space(_write(tmp_path, GOOD))
    assert space.architectures == ["resnet10t"]
    assert space.params["optim.lr"].kind == "loguniform"


def test_each_architecture_is_tried_first_when_the_budget_covers_them():
    from cls_ray.tune.tuner import build_searcher, first_points

    space = load_search_space("quick")
    cfg = load_config(None, ["tune.num_samples=3"])
    assert first_points(space, cfg) == [{"model.name": "resnet10t"}, {"model.name": "mobilenetv3_small_050"}]
    assert first_points(space, load_config(None, ["tune.num_samples=1"])) is None
    assert first_points(space, load_config(None, ["tune.num_samples=3", "tune.each_architecture_first=false"])) is None
    # Through Ray Tune's OptunaSearch, as `cls-ray tune` builds it: the enqueued architectures come first, with
    # their other values sampled inside the space's ranges; then TPE goes on.
    searcher = build_searcher(space, cfg)
    searcher.set_search_properties(cfg.train.metric, cfg.train.metric_mode, {})
    archs = []
    for i in range(3):
        values = searcher.suggest(f"t{i}")
        archs.append(values["model.name"])
        assert 1.0e-3 <= values["optim.lr"] <= 3.0e-2
        searcher.on_trial_complete(f"t{i}", {cfg.train.metric: 0.5 + i / 10})
    assert archs[:2] == ["resnet10t", "mobilenetv3_small_050"]
