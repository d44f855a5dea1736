"""Search spaces: a YAML file in ``search_spaces/`` -> a validated :class:`SearchSpace` -> Optuna define-by-run.

A space (format ``version: 1``) names Config keys (``optim.lr``, ``data.mixup``, ...) and how to vary them::

    version: 1
    defaults:              # Config keys the base config leaves null (unset): the value trials use then
      model.image_size: 32
    fixed:                 # Config keys set for every trial
      data.auto_augment: null
    params:                # shared: sampled for every trial
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
      data.mixup: {choice: [0.0, 0.2]}
    families:              # the architecture choice; parameters conditional on the family
      resnet:
        architectures: [resnet18, resnet50]     # or a mapping: {resnet18: {model.pretrained: resnet18.a1_in1k}}
        fixed: {data.batch_size: 64}
        params:
          optim.lr: {loguniform: [1.0e-3, 1.0e-1]}   # replaces the shared optim.lr for this family

Distributions: ``uniform`` / ``loguniform`` (floats), ``int`` / ``logint`` (integers), each ``[low, high]`` with
``low < high`` and an optional ``step`` (uniform, int); ``choice: [values]`` (scalars or null). Precedence, lowest
first: ``defaults`` (only where the base config holds null), the base config (``--config`` / ``--set``), shared
``fixed``, shared ``params``, family ``fixed``, family ``params``, per-architecture values. Every mistake (a typo in
a key, an unknown architecture, an empty range, a value the Config refuses) is a :class:`SearchSpaceError` naming
the file, the key and the reason, raised before anything runs. No computation happens in
:meth:`SearchSpace.__call__` (Optuna's define-by-run contract).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from cls_ray import storage
from cls_ray.config import Config, ConfigError, section_from_dict, to_dict

ARCH_PARAM = "model.name"
"""Name of the Optuna parameter holding the architecture (a categorical over every family's architectures)."""
CONDITIONAL_SEP = "@"
"""Optuna names a family's own parameter ``KEY@FAMILY`` so each name always has one distribution."""


class SearchSpaceError(ConfigError):
    """A search-space file is malformed; the message names the file, the key and the reason."""


def space_error(source: str, key: str, reason: str) -> SearchSpaceError:
    """The error for a mistake at ``key`` of the space file ``source``."""
    return SearchSpaceError(f"search space {source}: {key}: {reason}")


@dataclass(frozen=True)
class Param:
    """One searched Config key and its distribution."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    values: tuple[Any, ...] = ()

    def suggest(self, trial: Any, name: str) -> Any:
        """Ask an Optuna trial (or Tune's captor of one) for a value under ``name``."""
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.values))
        if self.kind in ("int", "logint"):
            return trial.suggest_int(name, self.low, self.high, step=self.step or 1, log=self.kind == "logint")
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.kind == "loguniform")

    def corner_values(self) -> list[Any]:
        """The values that bound the distribution; each is checked against the Config at load time."""
        return list(self.values) if self.kind == "choice" else [self.low, self.high]


@dataclass(frozen=True)
class Family:
    """Architectures that share conditional parameters."""

    name: str
    architectures: dict[str, dict[str, Any]]
    """Architecture -> its own fixed Config values (for example ``model.pretrained``)."""
    fixed: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Param] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space; calling it with an Optuna trial samples one trial's Config values."""

    source: str
    families: dict[str, Family]
    fixed: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Param] = field(default_factory=dict)
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Values for Config keys that are null by default (``model.image_size``, ...), used where the base config
    leaves them null: a space made for small CPU runs can pick a small input size without overriding the size a
    user's config sets. :meth:`resolve` folds them into ``fixed`` for one base config."""

    @property
    def architectures(self) -> list[str]:
        return [arch for fam in self.families.values() for arch in fam.architectures]

    def resolve(self, base: Config) -> SearchSpace:
        """This space for ``base``: its ``defaults`` for the keys ``base`` leaves null become fixed values, the
        others are dropped (the base config's value stands)."""
        data = to_dict(base)
        filled = {k: v for k, v in self.defaults.items() if data[k.split(".")[0]][k.split(".")[1]] is None}
        return replace(self, fixed={**filled, **self.fixed}, defaults={})

    def family_of(self, architecture: str) -> Family:
        for fam in self.families.values():
            if architecture in fam.architectures:
                return fam
        raise KeyError(architecture)

    def fixed_values(self, architecture: str) -> dict[str, Any]:
        """The Config values every trial of ``architecture`` gets whatever is sampled: the space's fixed values, its
        family's and its own, and ``model.name`` (what :meth:`__call__` returns, less the sampled parameters)."""
        fam = self.family_of(architecture)
        return {**self.fixed, **fam.fixed, **fam.architectures[architecture], ARCH_PARAM: architecture}

    def __call__(self, trial: Any) -> dict[str, Any]:
        """Optuna define-by-run: sample the architecture, then the shared and that family's parameters.

        Returns the trial's Config values as ``{dotted key: value}`` (constants only; no computation here)."""
        arch = trial.suggest_categorical(ARCH_PARAM, self.architectures)
        fam = self.family_of(arch)
        values: dict[str, Any] = dict(self.fixed)
        for key, param in self.params.items():
            if key not in fam.params and key not in fam.fixed:
                values[key] = param.suggest(trial, key)
        values.update(fam.fixed)
        for key, param in fam.params.items():
            values[key] = param.suggest(trial, f"{key}{CONDITIONAL_SEP}{fam.name}")
        values.update(fam.architectures[arch])
        values[ARCH_PARAM] = arch
        return values


def trial_config(base: Config, values: dict[str, Any], source: str) -> Config:
    """Build a trial's :class:`Config`: ``base`` with the sampled ``{dotted key: value}`` applied, through the same
    checks as ``--set``. Keys holding :data:`CONDITIONAL_SEP` are Optuna's bookkeeping names and are skipped."""
    data = to_dict(base)
    for key, value in values.items():
        if CONDITIONAL_SEP in key:
            continue
        section, name = key.split(".", 1)
        data[section][name] = value
    return section_from_dict(Config, data, source)


def config_values(values: dict[str, Any]) -> dict[str, Any]:
    """The Config keys of a trial's values (Optuna's ``KEY@FAMILY`` bookkeeping names dropped)."""
    return {k: v for k, v in values.items() if CONDITIONAL_SEP not in k}


# --------------------------------------------------------------------------------------------------------------
# Loading and validation


def resolve_space_uri(name: str) -> str:
    """A space URI as given, or, for a relative path missing from the working directory, the file of that name
    shipped in the repository's ``search_spaces/`` (``quick`` and ``quick.yaml`` also work)."""
    if storage.is_remote(name) or name.startswith("file://") or os.path.exists(name):
        return name
    shipped = Path(__file__).resolve().parents[2] / "search_spaces"
    base = Path(name).name
    for candidate in (shipped / base, shipped / f"{base}.yaml"):
        if candidate.is_file():
            return str(candidate)
    return name


def load_search_space(uri: str, base: Config | None = None) -> SearchSpace:
    """Read, parse and validate a search-space YAML (local path or s3:// URI).

    Args:
        uri: The file; a bare name such as ``quick`` names a shipped space.
        base: The experiment's base config; the space's ``defaults`` are resolved for it, and every bound of
            every parameter is checked against it.

    Raises:
        SearchSpaceError: Naming the file, the key and the reason.
    """
    from cls_ray.tune.space_format import check_search_space, parse_search_space

    uri = resolve_space_uri(uri)
    try:
        text = storage.read_bytes(uri).decode()
    except storage.StorageError as exc:
        raise SearchSpaceError(f"cannot read search space: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SearchSpaceError(f"search space {uri}: not valid YAML: {exc}") from None
    base = base or Config()
    space = parse_search_space(data, uri).resolve(base)
    check_search_space(space, base)
    return space
