"""Ray's private APIs are used in one module, :mod:`cls_ray.ray_internals`, and each use degrades with one warning
when a Ray upgrade moves it: every fallback below is taken for real, by removing the internal it replaces. Also the
import structure the architecture asks for: no import cycles inside ``cls_ray``, ``ray.train`` only in
``cls_ray/train/``, private Ray APIs only in ``ray_internals``."""

from __future__ import annotations

import ast
import copy
import logging
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from cls_ray import ray_internals

PACKAGE = Path(__file__).resolve().parents[1] / "cls_ray"


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch, caplog) -> None:
    """Each test starts as a new process would: no fallback has warned yet."""
    monkeypatch.setattr(ray_internals, "_WARNED", set())
    caplog.set_level(logging.INFO, logger="cls_ray.ray_internals")


def fallback_warnings(caplog) -> list[str]:
    """The warnings :mod:`cls_ray.ray_internals` logged."""
    return [
        r.getMessage() for r in caplog.records if r.name == "cls_ray.ray_internals" and r.levelno == logging.WARNING
    ]


# ---------------------------------------------------------------------------------------------------------------
# Import structure (ast, no imports executed)


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package) for every module under ``root`` (a package directory)."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _imported_names(module: str, is_package: bool, tree: ast.AST) -> Iterator[str]:
    """Every dotted name an import statement anywhere in the module (top level, functions, TYPE_CHECKING) names
    (``X.Y`` for ``from X import Y``: the submodule Y, or a name of module X)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: None if is_package else -1]
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports."""
    modules = _modules(root)
    graph = {}
    for name, (path, is_package) in modules.items():
        targets = set()
        for imported in _imported_names(name, is_package, ast.parse(path.read_text())):
            while imported and imported not in modules:  # `from pkg.mod import func` names pkg.mod
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a set of modules that import
    each other, directly or through others."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_cycle_check_finds_a_cycle_through_function_level_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub.b import B\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    (pkg / "c.py").write_text("from pkg import a\n")
    assert import_cycles(import_graph(pkg)) == [["pkg.a", "pkg.sub.b"]]


def test_no_module_of_cls_ray_imports_a_module_that_imports_it_back():
    graph = import_graph(PACKAGE)
    assert "cls_ray.serve.api" in graph["cls_ray.serve.deployment"]  # the graph does see cls-ray's imports
    assert import_cycles(graph) == []


def _ray_imports(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every Ray module or name an import statement brings in."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "ray")
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "ray":
            yield node.lineno, node.module
            yield from ((node.lineno, f"{node.module}.{a.name}") for a in node.names)


def test_only_the_train_package_imports_ray_train():
    outside = []
    for path in PACKAGE.rglob("*.py"):
        if path.is_relative_to(PACKAGE / "train"):
            continue
        for line, name in _ray_imports(ast.parse(path.read_text())):
            if name == "ray.train" or name.startswith("ray.train."):
                outside.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name}")
    assert outside == []


PRIVATE_ATTRIBUTES = {
    "_topology",
    "_resolve_execution_options",
    "_get_global_client",
    "__serve_build_asgi_app__",
    "experiment_tag",
}
"""Private Ray attributes and hooks cls-ray used before they moved into ray_internals (or were replaced by public
API), reached without a private import."""


def test_private_ray_apis_are_used_only_in_ray_internals():
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "ray_internals.py":
            continue
        tree = ast.parse(path.read_text())
        for line, name in _ray_imports(tree):
            if any(part.startswith("_") for part in name.split(".")):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: import {name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in PRIVATE_ATTRIBUTES:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: def {node.name}")
            elif isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: .{node.attr}")
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "ray"
                and node.attr.startswith("_")
            ):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: ray.{node.attr}")
    assert found == []


# ---------------------------------------------------------------------------------------------------------------
# Fallbacks, each with the internal it replaces removed


def test_address_file_falls_back_to_rays_own_rule_with_one_warning(monkeypatch, tmp_path, caplog):
    import ray._common.utils

    from cls_ray.ray_connect import recorded_address

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:6379\n")
    expected = Path(ray._common.utils.get_ray_address_file(None))
    assert recorded_address() == (expected, "127.0.0.1:6379") and not fallback_warnings(caplog)

    monkeypatch.delattr(ray._common.utils, "get_ray_address_file")  # what a Ray that moved it looks like
    assert recorded_address() == (expected, "127.0.0.1:6379")
    assert recorded_address() == (expected, "127.0.0.1:6379")
    monkeypatch.delenv("RAY_TMPDIR")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "t"))
    assert ray_internals.ray_address_file() == tmp_path / "t" / "ray" / "ray_current_cluster"  # Linux: $TMPDIR
    (warning,) = fallback_warnings(caplog)
    assert "get_ray_address_file" in warning and ray.__version__ in warning


def test_served_address_falls_back_to_the_configured_one_with_one_warning(monkeypatch, caplog):
    import ray.serve.context

    from cls_ray.config import ServeConfig
    from cls_ray.serve.app import _running_http_address

    monkeypatch.delattr(ray.serve.context, "_get_global_client")
    cfg = ServeConfig(host="127.0.0.1", port=18123)
    assert _running_http_address(cfg) == ("127.0.0.1", 18123)
    assert _running_http_address(cfg) == ("127.0.0.1", 18123)
    (warning,) = fallback_warnings(caplog)
    assert "_get_global_client" in warning and "serve.port" in warning


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Ray ships its jemalloc on Linux")
def test_jemalloc_env_is_empty_with_one_warning_where_rays_wheel_has_no_jemalloc(monkeypatch, tmp_path, caplog):
    from cls_ray.train.trainer import JEMALLOC_CONF, jemalloc_env

    env = jemalloc_env()
    assert Path(env["LD_PRELOAD"]).is_file() and env["LD_PRELOAD"].endswith("/core/libjemalloc.so")
    assert env["MALLOC_CONF"] == JEMALLOC_CONF

    monkeypatch.setattr(ray, "__file__", str(tmp_path / "ray" / "__init__.py"))  # a wheel laid out otherwise
    assert jemalloc_env() == {} and jemalloc_env() == {}
    (warning,) = fallback_warnings(caplog)
    assert "libjemalloc.so" in warning and "system allocator" in warning


def test_trial_names_fall_back_to_the_trial_id_with_one_warning(caplog):
    from ray.tune.experiment import Trial

    from cls_ray.tune.tuner import trial_name

    config = {"model.name": "resnet10t"}
    third = Trial("trainable", config=config, experiment_tag="3_model.name=resnet10t", stub=True)
    assert trial_name(third) == "trial_0003_resnet10t" and not fallback_warnings(caplog)
    # A tag without the searcher's counter (Ray's PopulationBasedTrainingReplay writes "replay_{file}").
    replay = Trial("trainable", config=config, experiment_tag="replay_policy_0.txt", stub=True)
    assert trial_name(replay) == f"trial_{replay.trial_id}_resnet10t" == trial_name(replay)
    (warning,) = fallback_warnings(caplog)
    assert "experiment_tag" in warning and "trial_id" in warning


def test_backoff_is_not_installed_with_one_warning_where_ray_data_has_no_callback_hook(monkeypatch, caplog):
    from ray.data import DataContext

    from cls_ray.data import backoff

    context = copy.copy(DataContext.get_current())
    context.custom_execution_callback_classes = []
    assert backoff.install(context) and context.custom_execution_callback_classes == [backoff.IdleBackoff]
    assert backoff.install(context) and context.custom_execution_callback_classes == [backoff.IdleBackoff]

    # The hook's base class gone (a module Python cannot import):
    monkeypatch.setitem(sys.modules, "ray.data._internal.execution.execution_callback", None)
    monkeypatch.setattr(backoff, "_HOOK", ray_internals.execution_callback_base())
    assert backoff._HOOK is None
    fresh = copy.copy(DataContext.get_current())
    fresh.custom_execution_callback_classes = []
    assert not backoff.install(fresh) and fresh.custom_execution_callback_classes == []
    assert ray_internals.execution_callback_base() is None
    (warning,) = fallback_warnings(caplog)
    assert "ExecutionCallback" in warning and "data.idle_backoff" in warning

    # The context's list of callback classes gone:
    caplog.clear()
    monkeypatch.undo()
    monkeypatch.setattr(ray_internals, "_WARNED", set())
    bare = copy.copy(DataContext.get_current())
    del bare.custom_execution_callback_classes
    assert not backoff.install(bare) and not backoff.install(bare)
    (warning,) = fallback_warnings(caplog)
    assert "custom_execution_callback_classes" in warning


def test_idle_backoff_field_defaults_on_and_is_set_like_any_other():
    from cls_ray.config import Config, load_config

    assert Config().data.idle_backoff is True
    assert load_config(None, ["data.idle_backoff=false"]).data.idle_backoff is False


# ---------------------------------------------------------------------------------------------------------------
# With a Ray instance


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(address="local", num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def small_dataset(ray_instance, tmp_path_factory) -> str:
    from conftest import write_digits_folders

    from cls_ray.config import IngestConfig
    from cls_ray.data.ingest import ingest

    folders = write_digits_folders(tmp_path_factory.mktemp("internals-folders"), per_class=10)
    dest = str(tmp_path_factory.mktemp("internals-data") / "digits")
    ingest(str(folders), dest, IngestConfig(), summary=False)
    return dest


@pytest.mark.ray
def test_data_idle_backoff_false_leaves_ray_data_as_it_is(small_dataset):
    from cls_ray.config import Config, load_config
    from cls_ray.data import backoff
    from cls_ray.data.manifest import read_manifest
    from cls_ray.data.pipeline import build_eval_dataset
    from cls_ray.models import data_config_for

    manifest = read_manifest(small_dataset)
    data_config = data_config_for(Config().model)
    on = build_eval_dataset(small_dataset, manifest, "val", data_config, Config().data)
    assert backoff.IdleBackoff in on.context.custom_execution_callback_classes
    off_cfg = load_config(None, ["data.idle_backoff=false"]).data
    off = build_eval_dataset(small_dataset, manifest, "val", data_config, off_cfg)
    assert backoff.IdleBackoff not in off.context.custom_execution_callback_classes
    assert off.count() == on.count() == manifest["splits"]["val"]["num_rows"]


def _backoff_probe():
    """:class:`IdleBackoff` as Ray Data runs it, keeping each instance (Ray makes one per execution)."""
    from cls_ray.data import backoff

    instances = []

    class Probe(backoff.IdleBackoff):
        def __init__(self) -> None:
            super().__init__()
            instances.append(self)

    return Probe, instances


def _run_backpressured(probe: type) -> int:
    import numpy as np

    ds = ray.data.range(3000, override_num_blocks=12)
    ray_internals.add_execution_callback(ds.context, probe)
    ds = ds.map_batches(
        lambda b: {"x": np.zeros((len(b["id"]), 64), np.uint8)},
        batch_size=None,
        compute=ray.data.TaskPoolStrategy(size=1),
    )
    rows = 0
    for batch in ds.iter_batches(batch_size=250, prefetch_batches=1):
        time.sleep(0.02)  # a slow consumer: the map stage is backpressured, the loop idles
        rows += len(batch["x"])
    return rows


@pytest.mark.ray
def test_idle_backoff_turns_itself_off_with_one_warning_when_rays_counters_change(ray_instance, monkeypatch, caplog):
    probe, instances = _backoff_probe()
    assert _run_backpressured(probe) == 3000
    (control,) = instances
    assert not control.disabled and control._last is not None and not fallback_warnings(caplog)

    # A Ray whose operators count progress under another name:
    renamed = (*ray_internals.DATA_PROGRESS_COUNTERS[:-1], "num_external_outqueue_blocks_renamed")
    monkeypatch.setattr(ray_internals, "DATA_PROGRESS_COUNTERS", renamed)
    instances.clear()
    assert _run_backpressured(probe) == 3000 and _run_backpressured(probe) == 3000  # two executions, one warning
    assert len(instances) == 2
    assert all(i.disabled and i._sleep == 0.0 for i in instances)  # never slept
    (warning,) = fallback_warnings(caplog)
    assert "num_external_outqueue_blocks_renamed" in warning and "turns itself off" in warning


@pytest.mark.ray
def test_eval_splits_cover_every_row_once_with_rays_default_ingest_options(ray_instance):
    """``EvalSplitsExact`` (public ``DataConfig`` API only): train in equal shards, val split without dropping."""
    from cls_ray.train.splits import EvalSplitsExact

    datasets = {"train": ray.data.range(10), "val": ray.data.range(7)}
    shards = EvalSplitsExact().configure(datasets, world_size=2, worker_handles=None, worker_node_ids=None)
    rows: dict[tuple[int, str], list[int]] = {}

    def consume(rank: int, name: str) -> None:
        rows[rank, name] = [r["id"] for r in shards[rank][name].iter_rows()]

    for name in ("train", "val"):
        threads = [threading.Thread(target=consume, args=(rank, name)) for rank in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert len(rows[0, "train"]) == len(rows[1, "train"]) == 5
    assert sorted(rows[0, "val"] + rows[1, "val"]) == list(range(7))


def test_tune_stops_copying_aws_credentials_into_trial_runtime_envs():
    """Ray Tune 2.60 copies the driver's AWS credential variables into every trial's runtime env, which Ray's
    runtime-env agent logs in clear; cls-ray removes them from the set Tune copies (the S3 Tune test then finds
    the secret in no log of the cluster)."""
    from ray.tune.execution import class_cache

    assert ray_internals.stop_tune_credential_propagation() is True
    assert not set(ray_internals.CREDENTIAL_VARIABLES) & class_cache.ENV_VARS_TO_PROPAGATE
    assert "PL_DISABLE_FORK" in class_cache.DEFAULT_ENV_VARS  # the rest of Tune's propagation is untouched


def test_credential_propagation_left_alone_with_one_warning_where_tune_reshaped_it(monkeypatch, caplog):
    from ray.tune.execution import class_cache

    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE", frozenset({"AWS_SECRET_ACCESS_KEY"}))
    monkeypatch.setattr(ray_internals, "_WARNED", set())
    assert ray_internals.stop_tune_credential_propagation() is False
    assert ray_internals.stop_tune_credential_propagation() is False
    (warning,) = fallback_warnings(caplog)
    assert "ENV_VARS_TO_PROPAGATE" in warning and "credential" in warning
