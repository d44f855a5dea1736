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
from pathlib import Path

import yaml

from cls_ray import storage
from cls_ray.config import Config
from cls_ray.tune.space_model import (
    ARCH_PARAM,
    CONDITIONAL_SEP,
    Family,
    Param,
    SearchSpace,
    SearchSpaceError,
    config_values,
    space_error,
    trial_config,
)

__all__ = [
    "ARCH_PARAM",
    "CONDITIONAL_SEP",
    "Family",
    "Param",
    "SearchSpace",
    "SearchSpaceError",
    "config_values",
    "load_search_space",
    "resolve_space_uri",
    "space_error",
    "trial_config",
]
"""The model (:mod:`cls_ray.tune.space_model`) is importable from here too, beside the loader."""


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
