"""``cls-ray tune``: Ray Tune drives Optuna (TPE) and ASHA over trials that are each a multi-worker Ray Train run.

Ray Train V2 pattern: every Tune trial is a small driver function that builds its own ``TorchTrainer`` (named after
the trial, so a restarted trial resumes its run from the last checkpoint) and forwards the workers' per-epoch
reports to Tune with ``TuneReportCallback``. The experiment lives at ``{tune.storage_path}/{tune.experiment_name}``
(local or s3://)::

    EXPERIMENT/
      tuner.pkl, experiment_state-*.json, searcher-state-*.pkl    Tune's state (resume)
      trial_0001_resnet10t/ ...                                    per-trial results, TensorBoard events
      runs/trial_0001_resnet10t/ ...                               the trial's Ray Train run: checkpoints, metrics
      leaderboard.csv, leaderboard.parquet, summary.json           written after the search
      best/                                                        the best trial's model package (+ eval-test/)

Re-running the same command continues the experiment (``Tuner.restore``): finished trials are kept as they are,
unfinished ones resume from their last checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import ray
from ray import tune as ray_tune

from cls_ray import ray_internals, storage, tracking
from cls_ray.config import Config, dump_yaml, with_absolute_paths, write_resolved
from cls_ray.tune.leaderboard import Leaderboard, build_leaderboard, print_leaderboard, write_leaderboard
from cls_ray.tune.space import ARCH_PARAM, SearchSpace, load_search_space, trial_config

logger = logging.getLogger(__name__)

RUNS_DIR = "runs"
BEST_DIR = "best"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "tune_config.yaml"
TIME_ATTR = "epoch"
"""ASHA's clock: the epoch the workers report. Unlike ``training_iteration`` it stays right when a trial resumes
its Train run from a checkpoint after the driver died (Tune restarts its iteration count, the run does not)."""
DRIVER_RESOURCES = {"cpu": 0, "memory": 1024**2}
"""What a trial's driver reserves: next to nothing (Ray refuses an all-zero request, hence 1 MiB of memory). The
driver only launches and watches its Train run, whose workers reserve their own CPUs/GPUs; concurrency is bounded by
``max_concurrent_trials`` instead, so concurrent trials' workers fit the cluster."""


class TuneError(ValueError):
    """The search cannot start or produced nothing to promote; the message says why and what to do."""


@dataclass
class TuneResult:
    """What a search produced."""

    experiment_uri: str
    leaderboard_uri: str
    """CSV leaderboard (a Parquet copy sits next to it)."""
    best_package_uri: str
    """The best trial's model package (``EXPERIMENT/best``)."""
    best_metric: float
    """The best trial's best validation value of ``metric``."""
    metric: str
    best_trial: str
    best_config: dict[str, Any]
    """The sampled Config values (dotted keys) of the best trial."""
    test_metrics: dict[str, Any] | None = None
    """The promoted package's metrics on the test split (``tune.evaluate_test``)."""


def experiment_uri(cfg: Config) -> str:
    """Where an experiment lives: ``{tune.storage_path}/{tune.experiment_name}``."""
    return storage.join(cfg.tune.storage_path, cfg.tune.experiment_name)


def trial_name(trial: Any) -> str:
    """Deterministic trial (and directory) name: ``trial_{n:04d}_{architecture}``, n counting from 1 in the order
    the searcher created them. No timestamps or random ids, so a resumed experiment keeps its names (restored trials
    keep theirs; only new trials are named). Where Tune's tag no longer gives n (a Ray internal), the trial's own
    ``trial_id`` stands in for it: unique, just not in creation order."""
    index = ray_internals.trial_index(trial)
    number = f"{index:04d}" if index is not None else str(trial.trial_id)
    return f"trial_{number}_{trial.config.get(ARCH_PARAM, 'model')}"


def trial_base_config(cfg: Config, exp_uri: str) -> Config:
    """The config every trial starts from: the user's, with epochs set by the search and runs in the experiment."""
    runs = storage.join(exp_uri, RUNS_DIR)
    # Trials are tracked by tune.tracking (one MLflow run per trial, TensorBoard events in each trial's directory).
    values = {"train.epochs": cfg.tune.max_epochs, "train.storage_path": runs, "train.tracking": []}
    return trial_config(cfg, values, "tune")


def run_trial(config: dict[str, Any], data_uri: str, base: Config, shared: dict[str, Any] | None = None) -> None:
    """One Tune trial: build the trial's Config from the sampled values and run it as a Ray Train run, on the
    splits the search read once (``shared``: :func:`cls_ray.data.pipeline.read_shared_splits`) where they fit."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from cls_ray.train.trainer import build_trainer

    # Ray Train's run state tracking: every trial's Train run (named after the trial) shows on the dashboard's
    # Train page with its workers and status. An explicit RAY_TRAIN_ENABLE_STATE_TRACKING=0 is respected.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    name = ray_tune.get_context().get_trial_name()
    cfg = trial_config(base, {**config, "train.run_name": name}, f"trial {name}")
    trainer = build_trainer(
        data_uri,
        cfg,
        storage_path=cfg.train.storage_path,
        run_name=name,
        callbacks=[TuneReportCallback()],
        shared=shared,
    )
    trainer.fit()


def trial_cpus(cfg: Config) -> float:
    """CPUs one trial occupies: its Train workers plus at least one Ray Data decode task (without one, a trial's
    data pipeline starves behind other trials' workers)."""
    return cfg.train.num_workers * cfg.train.cpus_per_worker + cfg.data.decode_cpus


def derive_max_concurrent_trials(cfg: Config) -> int:
    """``tune.max_concurrent_trials``, or as many trials as the cluster fits at once: its CPUs (and GPUs with
    ``train.use_gpu``) divided by what one trial needs (:func:`trial_cpus`, one GPU per worker); at least 1."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    resources = ray.cluster_resources()
    fits = math.floor(resources.get("CPU", 0) / trial_cpus(cfg) + 1e-9)
    if cfg.train.use_gpu:
        fits = min(fits, math.floor(resources.get("GPU", 0) / cfg.train.num_workers + 1e-9))
    if fits < 1:
        logger.warning(
            "the cluster (%s) cannot fit one trial (%d workers) now; trials wait for resources "
            "(an autoscaling cluster adds nodes)",
            resources,
            cfg.train.num_workers,
        )
    return max(1, fits)


def _startup_trials(cfg: Config) -> int:
    return cfg.tune.startup_trials or min(10, max(2, cfg.tune.num_samples // 3))


def build_searcher(space: SearchSpace, cfg: Config) -> Any:
    """OptunaSearch with a seeded TPE sampler over the define-by-run ``space``."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    with warnings.catch_warnings():
        # multivariate/group TPE is marked experimental; it is what models conditional (per-family) spaces well.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=cfg.tune.seed, n_startup_trials=_startup_trials(cfg), multivariate=True, group=True, constant_liar=True
        )
    return OptunaSearch(
        space,
        metric=cfg.train.metric,
        mode=cfg.train.metric_mode,
        sampler=sampler,
        points_to_evaluate=first_points(space, cfg),
    )


def first_points(space: SearchSpace, cfg: Config) -> list[dict[str, Any]] | None:
    """``tune.each_architecture_first``: one enqueued trial per architecture, in the space's order, each fixing only
    the architecture (Optuna samples the rest). Random start-up trials over a categorical can repeat one choice and
    miss another (seed 0 draws MobileNet twice from quick.yaml's two architectures), and a 3-trial search cannot
    afford that. Nothing is enqueued when ``num_samples`` is smaller than the number of architectures."""
    archs = space.architectures
    if not cfg.tune.each_architecture_first or len(archs) < 2 or cfg.tune.num_samples < len(archs):
        return None
    return [{ARCH_PARAM: arch} for arch in archs]


def build_scheduler(cfg: Config) -> Any:
    """ASHA on the validation metric, in epochs.

    ``stop_last_trials=False``: a trial that reaches ``tune.max_epochs`` ends its Train run itself (clean shutdown,
    final history written) instead of being killed by the scheduler at its last report. Trials ASHA stops earlier
    are killed; Ray Train's PlacementGroupCleaner then returns their workers' resources (it needs the dashboard's
    state API, which every ``ray start`` / ``ray.init()`` cluster has unless started with ``include_dashboard=False``).
    """
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr=TIME_ATTR,
        metric=cfg.train.metric,
        mode=cfg.train.metric_mode,
        max_t=cfg.tune.max_epochs,
        grace_period=cfg.tune.grace_period,
        reduction_factor=cfg.tune.reduction_factor,
        stop_last_trials=False,
    )


def make_trainable(data_uri: str, base: Config, fn: Any = None, shared: dict[str, Any] | None = None) -> Any:
    """The Tune trainable: ``fn`` (default :func:`run_trial`) bound to the dataset, the base config and the
    ``shared`` splits, with the trial driver's near-zero resource request (:data:`DRIVER_RESOURCES`)."""
    bound = ray_tune.with_parameters(fn or run_trial, data_uri=data_uri, base=base, shared=shared)
    return ray_tune.with_resources(bound, DRIVER_RESOURCES)


def read_trial_splits(data_uri: str, base: Config, values: dict[str, Any]) -> dict[str, Any]:
    """The dataset's train and val splits, read (and cached, as ``data.cache`` says) once for every trial.

    Each trial would otherwise list, read and cache them itself before its workers start (~10 s per trial on a
    2-core machine, and one cached copy per running trial). Blocked for the input size of the trial config that
    ``values`` make of ``base``; a trial whose model takes another size reads its own
    (:class:`cls_ray.data.pipeline.SharedSplit`).
    """
    from cls_ray.data.manifest import read_manifest
    from cls_ray.data.pipeline import read_shared_splits
    from cls_ray.models import data_config_for

    cfg = trial_config(base, values, "the search's first trial")
    splits = ("val",) if cfg.data.format == "ffcv" else ("train", "val")  # FFCV workers read the train .beton
    return read_shared_splits(data_uri, read_manifest(data_uri), splits, data_config_for(cfg.model), cfg.data)


def build_tuner(data_uri: str, cfg: Config, space: SearchSpace, base: Config) -> ray_tune.Tuner:
    """A new Tuner for the experiment, or the restored one when the experiment already exists; its trials share
    the splits read here (:func:`read_trial_splits`)."""
    from ray.tune.logger import TBXLoggerCallback

    exp = experiment_uri(cfg)
    fs, exp_path = storage.resolve(exp)
    _, root_path = storage.resolve(cfg.tune.storage_path)
    restore = ray_tune.Tuner.can_restore(exp_path, storage_filesystem=fs)
    if restore and not cfg.tune.resume:
        raise TuneError(
            f"experiment {exp} already exists and tune.resume is false: pick another "
            "tune.experiment_name or set tune.resume=true to continue it"
        )
    shared = read_trial_splits(data_uri, base, space.fixed_values(space.architectures[0]))
    trainable = make_trainable(data_uri, base, shared=shared)
    if restore:
        logger.info("resuming experiment %s (finished trials are kept, unfinished ones continue)", exp)
        return ray_tune.Tuner.restore(
            exp_path, trainable, resume_unfinished=True, resume_errored=cfg.tune.resume_errored, storage_filesystem=fs
        )
    concurrent = derive_max_concurrent_trials(cfg)
    logger.info(
        "new experiment %s: %d trials, at most %d at once, %d worker(s) each, search space %s",
        exp,
        cfg.tune.num_samples,
        concurrent,
        cfg.train.num_workers,
        space.source,
    )
    tune_config = ray_tune.TuneConfig(
        search_alg=build_searcher(space, cfg),
        scheduler=build_scheduler(cfg),
        num_samples=cfg.tune.num_samples,
        max_concurrent_trials=concurrent,
        trial_name_creator=trial_name,
        trial_dirname_creator=trial_name,
    )
    run_config = ray_tune.RunConfig(
        name=cfg.tune.experiment_name,
        storage_path=root_path,
        storage_filesystem=fs,
        callbacks=[TBXLoggerCallback(), *tracking.tune_callbacks(cfg, exp)],
        failure_config=ray_tune.FailureConfig(max_failures=0),
    )
    return ray_tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


def _check_state_api() -> None:
    """Warn when the state API is unreachable: Ray Train's PlacementGroupCleaner needs it to free the workers of the
    trials ASHA stops (see :func:`build_scheduler`)."""
    from ray.util.state import list_nodes

    try:
        list_nodes(limit=1, timeout=10)
    except Exception as exc:  # the state API raises ConnectionError, RayStateApiException, ...
        logger.warning(
            "Ray's state API is unreachable (%s): trials that ASHA stops will keep their workers' resources reserved "
            "until the search ends. Start Ray with the dashboard, and set RAY_ADDRESS on the cluster when several "
            "Ray instances share a machine.",
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )


def _record_config(cfg: Config, exp: str) -> None:
    """Write the config a search starts with; on resume keep it (Tune restores the original search settings)."""
    uri = storage.join(exp, CONFIG_FILE)
    if not storage.exists(uri):
        write_resolved(cfg, exp, CONFIG_FILE)
    elif storage.read_bytes(uri).decode() != dump_yaml(cfg):
        logger.warning(
            "the config differs from the one experiment %s started with (%s); a resumed experiment keeps "
            "its original search settings, trials and space",
            exp,
            uri,
        )


def tune(data_uri: str, cfg: Config) -> TuneResult:
    """Run (or resume) the search of ``cfg.tune`` on the dataset at ``data_uri`` and promote the best trial.

    Raises:
        SearchSpaceError: The space file is invalid (before anything runs).
        TuneError: No trial produced the metric (nothing to promote); the leaderboard is still written.
    """
    from cls_ray.data.manifest import read_manifest
    from cls_ray.ray_connect import ensure_ray

    # Each trial runs in its own directory: relative paths would name different places there.
    data_uri, cfg = storage.absolute(data_uri), with_absolute_paths(cfg)
    space = load_search_space(cfg.tune.space, base=cfg)
    read_manifest(data_uri)  # a missing or unreadable dataset fails here, before Ray starts
    exp = experiment_uri(cfg)
    base = trial_base_config(cfg, exp)
    ensure_ray()
    _check_state_api()
    ray_internals.stop_tune_credential_propagation()  # before the trainable's actor class is made
    tuner = build_tuner(data_uri, cfg, space, base)
    _record_config(cfg, exp)
    grid = tuner.fit()
    board = build_leaderboard(grid, cfg)
    leaderboard_uri = write_leaderboard(board, exp)
    print_leaderboard(board)
    result = promote_best(board, data_uri, base, exp, leaderboard_uri)
    print_tune_result(result)
    return result


def promote_best(board: Leaderboard, data_uri: str, base: Config, exp: str, leaderboard_uri: str) -> TuneResult:
    """Export the best trial's best checkpoint as ``EXPERIMENT/best`` and optionally evaluate it on the test split."""
    from cls_ray.train.results import load_run_result
    from cls_ray.train.trainer import export_package

    best = board.best()
    if best is None:
        raise TuneError(f"no trial of experiment {exp} reported {board.metric}; see the errors in {leaderboard_uri}")
    cfg = trial_config(base, {**best.config, "train.run_name": best.trial}, f"trial {best.trial}")
    run_uri = storage.join(cfg.train.storage_path, best.trial)
    package_uri = storage.join(exp, BEST_DIR)
    export_package(load_run_result(run_uri), data_uri, cfg, package_uri)
    logger.info("promoted %s (%s %.4f) to %s", best.trial, board.metric, best.best_metric, package_uri)
    tracking.log_promoted_package(base, exp, best.trial, package_uri)
    test_metrics = None
    if base.tune.evaluate_test:
        from cls_ray.evaluate import evaluate

        test_metrics = evaluate(
            package_uri,
            data_uri,
            split="test",
            output_dir=storage.join(package_uri, "eval-test"),
            batch_size=cfg.data.eval_batch_size,
        )
    result = TuneResult(
        experiment_uri=exp,
        leaderboard_uri=leaderboard_uri,
        best_package_uri=package_uri,
        best_metric=best.best_metric,
        metric=board.metric,
        best_trial=best.trial,
        best_config=best.config,
        test_metrics=test_metrics,
    )
    storage.write_json(storage.join(exp, SUMMARY_FILE), _summary(result))
    return result


def print_tune_result(result: TuneResult) -> None:
    """The search's outcome on the terminal: the winner, its package and where the leaderboard is."""
    from rich.console import Console

    test = result.test_metrics or {}
    line = f"best trial [bold]{result.best_trial}[/bold]: {result.metric} {result.best_metric:.4f}"
    if "top1" in test:
        line += f", test top1 {test['top1']:.4f}"
    Console().print(f"{line}\nmodel package: {result.best_package_uri}\nleaderboard: {result.leaderboard_uri}")


def _summary(result: TuneResult) -> dict[str, Any]:
    return {
        "best_trial": result.best_trial,
        "metric": result.metric,
        "best_metric": result.best_metric,
        "best_config": result.best_config,
        "best_package": result.best_package_uri,
        "leaderboard": result.leaderboard_uri,
        "test_metrics": {k: v for k, v in (result.test_metrics or {}).items() if isinstance(v, (int, float, str))}
        or None,
    }
