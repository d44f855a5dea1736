"""The search-space file format (version 1): parsing the YAML into a
:class:`~cls_ray.tune.space_model.SearchSpace` and checking it against timm and the Config before anything runs.
The format itself is described in :mod:`cls_ray.tune.space` and docs/design.md ("Search spaces")."""

from __future__ import annotations

import math
import os
from typing import Any

import timm

from cls_ray import storage
from cls_ray.config import Config, ConfigError, to_dict
from cls_ray.models import check_architecture
from cls_ray.tune.space_model import (
    ARCH_PARAM,
    CONDITIONAL_SEP,
    Family,
    Param,
    SearchSpace,
    SearchSpaceError,
    space_error,
    trial_config,
)

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
_SPACE_KEYS = ("version", "description", "defaults", "fixed", "params", "families")
_FAMILY_KEYS = ("architectures", "fixed", "params")


def parse_search_space(data: Any, source: str) -> SearchSpace:
    """Turn the parsed YAML of a space into a :class:`SearchSpace` (structure only; see :func:`check_search_space`)."""
    if not isinstance(data, dict):
        raise space_error(source, "(top level)", "must be a mapping with `families` (and optionally `params`, `fixed`)")
    _check_keys(data, _SPACE_KEYS, source, "")
    if data.get("version", SPACE_FORMAT_VERSION) != SPACE_FORMAT_VERSION:
        raise space_error(
            source,
            "version",
            f"{data['version']!r} is not supported (this cls-ray reads version {SPACE_FORMAT_VERSION})",
        )
    families_raw = data.get("families")
    if not isinstance(families_raw, dict) or not families_raw:
        raise space_error(source, "families", "must be a non-empty mapping of family name -> {architectures, params}")
    families = {name: _parse_family(name, spec, source) for name, spec in families_raw.items()}
    seen: dict[str, str] = {}
    for fam in families.values():
        for arch in fam.architectures:
            if arch in seen:
                raise space_error(
                    source,
                    f"families.{fam.name}.architectures",
                    f"{arch!r} is already in family {seen[arch]!r}; an architecture belongs to one family",
                )
            seen[arch] = fam.name
    space = SearchSpace(
        source=source,
        families=families,
        fixed=_parse_fixed(data.get("fixed"), source, "fixed"),
        params=_parse_params(data.get("params"), source, "params"),
        description=str(data.get("description") or ""),
        defaults=_parse_fixed(data.get("defaults"), source, "defaults"),
    )
    _check_defaults(space)
    return space


def _check_defaults(space: SearchSpace) -> None:
    """A default fills a key only where the base config leaves it null, so it must be a key that is null by
    default, and one the space does not also set or search (that would always win, leaving the default dead)."""
    defaults = to_dict(Config())
    setters = [("fixed", space.fixed), ("params", space.params)]
    for fam in space.families.values():
        setters += [(f"families.{fam.name}.fixed", fam.fixed), (f"families.{fam.name}.params", fam.params)]
        setters += [(f"families.{fam.name}.architectures.{a}", v) for a, v in fam.architectures.items()]
    for key in space.defaults:
        section, name = key.split(".")
        if defaults[section][name] is not None:
            raise space_error(
                space.source,
                f"defaults.{key}",
                f"defaults only fill keys that are null unless set (this one defaults to {defaults[section][name]!r}); "
                "put it under `fixed`, or leave it to the base config",
            )
        for where, mapping in setters:
            if key in mapping:
                raise space_error(space.source, f"defaults.{key}", f"is also set in `{where}`, which always wins")


def _check_keys(data: dict, allowed: tuple[str, ...], source: str, where: str) -> None:
    unknown = sorted(str(k) for k in set(data) - set(allowed))
    if unknown:
        raise space_error(source, f"{where}{unknown[0]}", f"unknown key; valid keys here: {', '.join(allowed)}")


def _parse_family(name: Any, spec: Any, source: str) -> Family:
    where = f"families.{name}"
    if not isinstance(spec, dict):
        raise space_error(source, where, "must be a mapping with `architectures` (and optionally `params`, `fixed`)")
    _check_keys(spec, _FAMILY_KEYS, source, f"{where}.")
    archs_raw = spec.get("architectures")
    if isinstance(archs_raw, list):
        archs_raw = {a: None for a in archs_raw}
    if not isinstance(archs_raw, dict) or not archs_raw:
        raise space_error(
            source,
            f"{where}.architectures",
            "must be a non-empty list of timm architecture names (or a mapping name -> fixed values)",
        )
    archs = {}
    for arch, fixed in archs_raw.items():
        if not isinstance(arch, str):
            raise space_error(source, f"{where}.architectures", f"{arch!r} is not an architecture name")
        archs[arch] = _parse_fixed(fixed, source, f"{where}.architectures.{arch}")
    fam = Family(
        name=str(name),
        architectures=archs,
        fixed=_parse_fixed(spec.get("fixed"), source, f"{where}.fixed"),
        params=_parse_params(spec.get("params"), source, f"{where}.params"),
    )
    both = sorted(set(fam.fixed) & set(fam.params))
    if both:
        raise space_error(source, f"{where}.params.{both[0]}", "is also in this family's `fixed`; keep one")
    return fam


def _check_key(key: Any, source: str, where: str) -> str:
    if not isinstance(key, str) or key.count(".") != 1:
        raise space_error(source, f"{where}.{key}", "keys are Config keys of the form section.field (e.g. optim.lr)")
    if key in RESERVED_KEYS:
        raise space_error(source, f"{where}.{key}", f"cannot be set by a search space: {RESERVED_KEYS[key]}")
    section, name = key.split(".")
    if section not in SEARCHABLE_SECTIONS:
        raise space_error(
            source,
            f"{where}.{key}",
            f"section {section!r} cannot be searched; searchable sections: {', '.join(SEARCHABLE_SECTIONS)}",
        )
    fields = to_dict(getattr(Config(), section))
    if name not in fields:
        valid = ", ".join(sorted(fields))
        raise space_error(source, f"{where}.{key}", f"unknown key; valid keys of {section}: {valid}")
    return key


def _parse_fixed(raw: Any, source: str, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise space_error(source, where, "must be a mapping of Config keys to values")
    return {_check_key(k, source, where): v for k, v in raw.items()}


def _parse_params(raw: Any, source: str, where: str) -> dict[str, Param]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise space_error(source, where, "must be a mapping of Config keys to distributions")
    return {_check_key(k, source, where): _parse_param(k, spec, source, f"{where}.{k}") for k, spec in raw.items()}


def _number(value: Any, source: str, where: str) -> float | int:
    # PyYAML reads `1e-4` (no dot) as a string; accept it rather than fail on a YAML 1.1 quirk.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise space_error(source, where, f"{value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise space_error(source, where, f"{value!r} is not a finite number")
    return value


def _parse_param(key: str, spec: Any, source: str, where: str) -> Param:
    if not isinstance(spec, dict) or not (set(spec) & set(DISTRIBUTIONS)):
        raise space_error(
            source,
            where,
            f"must be a distribution such as {{loguniform: [1.0e-4, 1.0e-2]}} or "
            f"{{choice: [a, b]}} (one of {', '.join(DISTRIBUTIONS)}); put constants in `fixed`",
        )
    kinds = [k for k in spec if k in DISTRIBUTIONS]
    extra = sorted(str(k) for k in spec if k not in DISTRIBUTIONS and k != "step")
    if len(kinds) != 1 or extra:
        raise space_error(
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
        raise space_error(source, where, f"{kind} needs [low, high], got {bounds!r}")
    low, high = (_number(b, source, where) for b in bounds)
    step = _number(spec["step"], source, f"{where}.step") if spec.get("step") is not None else None
    if kind in ("int", "logint"):
        if not all(float(v).is_integer() for v in (low, high, step or 1)):
            raise space_error(source, where, f"{kind} bounds and step must be integers, got {bounds!r}")
        low, high, step = int(low), int(high), int(step) if step is not None else None
    else:  # Optuna samples floats here; checking float bounds refuses a float range over an integer key
        low, high, step = float(low), float(high), float(step) if step is not None else None
    if low >= high:
        raise space_error(source, where, f"empty range: low ({low}) must be below high ({high})")
    if kind.startswith("log") and low <= 0:
        raise space_error(source, where, f"{kind} needs low > 0, got {low}")
    if step is not None and (kind.startswith("log") or not 0 < step <= high - low):
        raise space_error(source, where, "step must be positive and at most high - low (and not with log scales)")
    return Param(key=key, kind=kind, low=low, high=high, step=step)


def _parse_choice(key: str, spec: dict, source: str, where: str) -> Param:
    values = spec["choice"]
    if spec.get("step") is not None:
        raise space_error(source, where, "`step` only goes with uniform or int")
    if not isinstance(values, list) or not values:
        raise space_error(source, where, f"empty choice: choice needs a non-empty list of values, got {values!r}")
    for v in values:
        # Optuna's categorical distribution holds only scalars.
        if v is not None and not isinstance(v, (bool, int, float, str)):
            raise space_error(source, where, f"choice values must be scalars (number, string, bool, null), got {v!r}")
    if len({repr(v) for v in values}) != len(values):
        raise space_error(source, where, f"choice has duplicate values: {values!r}")
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
        raise space_error(source, f"{where}.model.pretrained", f"hub tag {pretrained!r} is not a tag of {arch!r}")
    if pretrained not in timm.list_pretrained(pretrained):
        raise space_error(
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
        raise space_error(source, where, str(exc).replace(f" (in {source})", "")) from None
