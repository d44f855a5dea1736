"""The search-space model: what a space file (:mod:`cls_ray.tune.space_format`) parses into, its Optuna define-by-run
sampling, and a trial's :class:`~cls_ray.config.Config` from the sampled values. The file format and loading are
described in :mod:`cls_ray.tune.space`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

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
