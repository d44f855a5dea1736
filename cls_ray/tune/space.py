"""Search spaces: a YAML file in ``search_spaces/`` -> a validated :class:`SearchSpace` -> Optuna define-by-run.

A space (format ``version: 1``) names Config keys (``optim.lr``, ``data.mixup``, ...) and how to vary them::

    version: 1
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
first: the base config (``--config`` / ``--set``), shared ``fixed``, shared ``params``, family ``fixed``, family
``params``, per-architecture values. Every mistake (a typo in a key, an unknown architecture, an empty range, a value
the Config refuses) is a :class:`SearchSpaceError` naming the file, the key and the reason, raised before anything
runs. No computation happens in :meth:`SearchSpace.__call__` (Optuna's define-by-run contract).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import yaml

from cls_ray import storage
from cls_ray.config import Config, ConfigError, section_from_dict, to_dict
from cls_ray.models import check_architecture

SPACE_FORMAT_VERSION = 1
SEARCHABLE_SECTIONS = ("model", "data", "optim", "train")
DISTRIBUTIONS = ("uniform", "loguniform", "int", "logint", "choice")
RESERVED_KEYS = {
    "model.name": "the architecture is chosen through `families`",
    "train.epochs": "trials run up to tune.max_epochs",
    "train.run_name": "each trial's run is named after the trial",
    "train.storage_path": "trials keep their runs in the experiment directory",
    "train.metric": "the metric is fixed for a whole experiment (--set train.metric=...)",
    "train.metric_mode": "the metric mode is fixed for a whole experiment (--set train.metric_mode=...)",
    "train.num_workers": "workers per trial are fixed for a whole experiment (--set train.num_workers=N)",
    "train.cpus_per_worker": "trial resources are fixed for a whole experiment (--set train.cpus_per_worker=N)",
    "train.use_gpu": "trial resources are fixed for a whole experiment (--set train.use_gpu=true)",
}
_SPACE_KEYS = ("version", "description", "fixed", "params", "families")
_FAMILY_KEYS = ("architectures", "fixed", "params")
ARCH_PARAM = "model.name"
"""Name of the Optuna parameter holding the architecture (a categorical over every family's architectures)."""
CONDITIONAL_SEP = "@"
"""Optuna names a family's own parameter ``KEY@FAMILY`` so each name always has one distribution."""


class SearchSpaceError(ConfigError):
    """A search-space file is malformed; the message names the file, the key and the reason."""


def _fail(source: str, key: str, reason: str) -> SearchSpaceError:
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

    @property
    def architectures(self) -> list[str]:
        return [arch for fam in self.families.values() for arch in fam.architectures]

    def family_of(self, architecture: str) -> Family:
        for fam in self.families.values():
            if architecture in fam.architectures:
                return fam
        raise KeyError(architecture)

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
        base: The experiment's base config; every bound of every parameter is checked against it.

    Raises:
        SearchSpaceError: Naming the file, the key and the reason.
    """
    uri = resolve_space_uri(uri)
    try:
        text = storage.read_bytes(uri).decode()
    except storage.StorageError as exc:
        raise SearchSpaceError(f"cannot read search space: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SearchSpaceError(f"search space {uri}: not valid YAML: {exc}") from None
    space = parse_search_space(data, uri)
    check_search_space(space, base or Config())
    return space


def parse_search_space(data: Any, source: str) -> SearchSpace:
    """Turn the parsed YAML of a space into a :class:`SearchSpace` (structure only; see :func:`check_search_space`)."""
    if not isinstance(data, dict):
        raise _fail(source, "(top level)", "must be a mapping with `families` (and optionally `params`, `fixed`)")
    _check_keys(data, _SPACE_KEYS, source, "")
    if data.get("version", SPACE_FORMAT_VERSION) != SPACE_FORMAT_VERSION:
        raise _fail(
            source,
            "version",
            f"{data['version']!r} is not supported (this cls-ray reads version {SPACE_FORMAT_VERSION})",
        )
    families_raw = data.get("families")
    if not isinstance(families_raw, dict) or not families_raw:
        raise _fail(source, "families", "must be a non-empty mapping of family name -> {architectures, params}")
    families = {name: _parse_family(name, spec, source) for name, spec in families_raw.items()}
    seen: dict[str, str] = {}
    for fam in families.values():
        for arch in fam.architectures:
            if arch in seen:
                raise _fail(
                    source,
                    f"families.{fam.name}.architectures",
                    f"{arch!r} is already in family {seen[arch]!r}; an architecture belongs to one family",
                )
            seen[arch] = fam.name
    return SearchSpace(
        source=source,
        families=families,
        fixed=_parse_fixed(data.get("fixed"), source, "fixed"),
        params=_parse_params(data.get("params"), source, "params"),
        description=str(data.get("description") or ""),
    )


def _check_keys(data: dict, allowed: tuple[str, ...], source: str, where: str) -> None:
    unknown = sorted(str(k) for k in set(data) - set(allowed))
    if unknown:
        raise _fail(source, f"{where}{unknown[0]}", f"unknown key; valid keys here: {', '.join(allowed)}")


def _parse_family(name: Any, spec: Any, source: str) -> Family:
    where = f"families.{name}"
    if not isinstance(spec, dict):
        raise _fail(source, where, "must be a mapping with `architectures` (and optionally `params`, `fixed`)")
    _check_keys(spec, _FAMILY_KEYS, source, f"{where}.")
    archs_raw = spec.get("architectures")
    if isinstance(archs_raw, list):
        archs_raw = {a: None for a in archs_raw}
    if not isinstance(archs_raw, dict) or not archs_raw:
        raise _fail(
            source,
            f"{where}.architectures",
            "must be a non-empty list of timm architecture names (or a mapping name -> fixed values)",
        )
    archs = {}
    for arch, fixed in archs_raw.items():
        if not isinstance(arch, str):
            raise _fail(source, f"{where}.architectures", f"{arch!r} is not an architecture name")
        archs[arch] = _parse_fixed(fixed, source, f"{where}.architectures.{arch}")
    fam = Family(
        name=str(name),
        architectures=archs,
        fixed=_parse_fixed(spec.get("fixed"), source, f"{where}.fixed"),
        params=_parse_params(spec.get("params"), source, f"{where}.params"),
    )
    both = sorted(set(fam.fixed) & set(fam.params))
    if both:
        raise _fail(source, f"{where}.params.{both[0]}", "is also in this family's `fixed`; keep one")
    return fam


def _check_key(key: Any, source: str, where: str) -> str:
    if not isinstance(key, str) or key.count(".") != 1:
        raise _fail(source, f"{where}.{key}", "keys are Config keys of the form section.field (e.g. optim.lr)")
    if key in RESERVED_KEYS:
        raise _fail(source, f"{where}.{key}", f"cannot be set by a search space: {RESERVED_KEYS[key]}")
    section, name = key.split(".")
    if section not in SEARCHABLE_SECTIONS:
        raise _fail(
            source,
            f"{where}.{key}",
            f"section {section!r} cannot be searched; searchable sections: {', '.join(SEARCHABLE_SECTIONS)}",
        )
    fields = to_dict(getattr(Config(), section))
    if name not in fields:
        raise _fail(source, f"{where}.{key}", f"unknown key; valid keys of {section}: {', '.join(sorted(fields))}")
    return key


def _parse_fixed(raw: Any, source: str, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _fail(source, where, "must be a mapping of Config keys to values")
    return {_check_key(k, source, where): v for k, v in raw.items()}


def _parse_params(raw: Any, source: str, where: str) -> dict[str, Param]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _fail(source, where, "must be a mapping of Config keys to distributions")
    return {_check_key(k, source, where): _parse_param(k, spec, source, f"{where}.{k}") for k, spec in raw.items()}


def _number(value: Any, source: str, where: str) -> float | int:
    # PyYAML reads `1e-4` (no dot) as a string; accept it rather than fail on a YAML 1.1 quirk.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _fail(source, where, f"{value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(source, where, f"{value!r} is not a finite number")
    return value


def _parse_param(key: str, spec: Any, source: str, where: str) -> Param:
    if not isinstance(spec, dict) or not (set(spec) & set(DISTRIBUTIONS)):
        raise _fail(
            source,
            where,
            f"must be a distribution such as {{loguniform: [1.0e-4, 1.0e-2]}} or "
            f"{{choice: [a, b]}} (one of {', '.join(DISTRIBUTIONS)}); put constants in `fixed`",
        )
    kinds = [k for k in spec if k in DISTRIBUTIONS]
    extra = sorted(str(k) for k in spec if k not in DISTRIBUTIONS and k != "step")
    if len(kinds) != 1 or extra:
        raise _fail(
            source,
            where,
            f"give exactly one distribution ({', '.join(DISTRIBUTIONS)}) and optionally "
            f"`step`; got {', '.join(str(k) for k in spec)}",
        )
    kind = kinds[0]
    if kind == "choice":
        return _parse_choice(key, spec, source, where)
    bounds = spec[kind]
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise _fail(source, where, f"{kind} needs [low, high], got {bounds!r}")
    low, high = (_number(b, source, where) for b in bounds)
    step = _number(spec["step"], source, f"{where}.step") if spec.get("step") is not None else None
    if kind in ("int", "logint"):
        if not all(float(v).is_integer() for v in (low, high, step or 1)):
            raise _fail(source, where, f"{kind} bounds and step must be integers, got {bounds!r}")
        low, high, step = int(low), int(high), int(step) if step is not None else None
    else:  # Optuna samples floats here; checking float bounds refuses a float range over an integer key
        low, high, step = float(low), float(high), float(step) if step is not None else None
    if low >= high:
        raise _fail(source, where, f"empty range: low ({low}) must be below high ({high})")
    if kind.startswith("log") and low <= 0:
        raise _fail(source, where, f"{kind} needs low > 0, got {low}")
    if step is not None and (kind.startswith("log") or not 0 < step <= high - low):
        raise _fail(source, where, "step must be positive, at most high - low, and is not allowed with log scales")
    return Param(key=key, kind=kind, low=low, high=high, step=step)


def _parse_choice(key: str, spec: dict, source: str, where: str) -> Param:
    values = spec["choice"]
    if spec.get("step") is not None:
        raise _fail(source, where, "`step` only goes with uniform or int")
    if not isinstance(values, list) or not values:
        raise _fail(source, where, f"empty choice: choice needs a non-empty list of values, got {values!r}")
    for v in values:
        # Optuna's categorical distribution holds only scalars.
        if v is not None and not isinstance(v, (bool, int, float, str)):
            raise _fail(source, where, f"choice values must be scalars (number, string, true/false, null), got {v!r}")
    if len({repr(v) for v in values}) != len(values):
        raise _fail(source, where, f"choice has duplicate values: {values!r}")
    return Param(key=key, kind="choice", values=tuple(values))


def check_search_space(space: SearchSpace, base: Config) -> None:
    """Check every architecture exists in timm and every bound / choice builds a valid Config with ``base``.

    Each parameter value is checked with the others at their fixed (or first) values, per architecture, so a
    value the Config refuses (a wrong type, ``model.mode: frozen`` without weights, ...) fails here, naming the
    key, instead of in a trial."""
    source = space.source
    for fam in space.families.values():
        for arch, fixed in fam.architectures.items():
            where = f"families.{fam.name}.architectures"
            try:
                check_architecture(arch, key=f"{where}.{arch}")
            except ConfigError as exc:
                raise SearchSpaceError(f"search space {source}: {exc}") from None
            _check_pretrained_tag(arch, fixed.get("model.pretrained"), source, f"{where}.{arch}")
            _check_architecture_values(space, fam, arch, base)


def _check_pretrained_tag(arch: str, pretrained: Any, source: str, where: str) -> None:
    """A timm hub tag must exist and belong to the architecture it is given for."""
    if (
        not isinstance(pretrained, str)
        or storage.is_remote(pretrained)
        or "://" in pretrained
        or os.sep in pretrained
        or pretrained.endswith((".safetensors", ".pt", ".pth", ".bin"))
    ):
        return
    if pretrained.split(".")[0] != arch.split(".")[0]:
        raise _fail(source, f"{where}.model.pretrained", f"hub tag {pretrained!r} is not a tag of {arch!r}")
    if pretrained not in timm.list_pretrained(pretrained):
        raise _fail(
            source,
            f"{where}.model.pretrained",
            f"timm has no pretrained tag {pretrained!r}; known tags: "
            f"{', '.join(timm.list_pretrained(arch + '.*')[:8])}",
        )


class _CornerTrial:
    """Stands in for an Optuna trial: the architecture is given, one parameter takes a chosen value, every other
    parameter its first corner (low end or first choice)."""

    def __init__(self, arch: str, name: str | None = None, value: Any = None) -> None:
        self.arch, self.name, self.value = arch, name, value

    def _answer(self, name: str, first: Any) -> Any:
        return self.value if name == self.name else first

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        return self.arch if name == ARCH_PARAM else self._answer(name, choices[0])

    def suggest_int(self, name: str, low: int, high: int, **_: Any) -> int:
        return self._answer(name, low)

    def suggest_float(self, name: str, low: float, high: float, **_: Any) -> float:
        return self._answer(name, low)


def searched_params(space: SearchSpace, fam: Family) -> dict[str, Param]:
    """The parameters sampled for an architecture of ``fam``, by their Optuna names."""
    shared = {k: p for k, p in space.params.items() if k not in fam.params and k not in fam.fixed}
    return {**shared, **{f"{k}{CONDITIONAL_SEP}{fam.name}": p for k, p in fam.params.items()}}


def _check_architecture_values(space: SearchSpace, fam: Family, arch: str, base: Config) -> None:
    _build_checked(base, space(_CornerTrial(arch)), space.source, f"families.{fam.name} ({arch}), fixed values")
    for name, param in searched_params(space, fam).items():
        scope = f"families.{fam.name}.params.{param.key}" if CONDITIONAL_SEP in name else f"params.{param.key}"
        for value in param.corner_values():
            values = space(_CornerTrial(arch, name, value))
            _build_checked(base, values, space.source, f"{scope} = {value!r} (with {arch})")


def _build_checked(base: Config, values: dict[str, Any], source: str, where: str) -> None:
    try:
        trial_config(base, values, source)
    except ConfigError as exc:
        raise _fail(source, where, str(exc).replace(f" (in {source})", "")) from None
