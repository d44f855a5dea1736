"""Experiment tracking: MLflow through Ray's own integrations, TensorBoard event files, never a reason to stop.

``train.tracking: [mlflow]``: the driver finds or creates the run's MLflow run (one per training run: a resumed
run goes on in the same MLflow run, found by its ``cls_ray.run_uri`` tag), logs the config as params and tags
naming the dataset and config digest; rank 0 joins that run with Ray's ``setup_mlflow`` and logs every epoch's
metrics; the driver ends it with the model package as artefacts. ``tune.tracking: [mlflow]``: Ray Tune's
``MLflowLoggerCallback``, one MLflow run per trial, and the promoted package logged to the best trial's run.
``train.tracking: [tensorboard]``: rank 0 writes one TensorBoard event file per epoch under ``RUN/tensorboard``
(each one PUT on object stores; a resumed run drops the files of the epochs it runs again).

A tracking server that does not answer costs the run nothing: it is reported once, and the run goes on untracked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

from cls_ray import storage

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
DEFAULT_EXPERIMENT = "cls-ray"
RUN_URI_TAG = "cls_ray.run_uri"
#: MLflow's own client settings (credentials, TLS) that the workers need as the driver has them.
_CLIENT_ENV = re.compile(
    r"^(MLFLOW_TRACKING_(USERNAME|PASSWORD|TOKEN|INSECURE_TLS|SERVER_CERT_PATH|CLIENT_CERT_PATH)"
    r"|DATABRICKS_HOST|DATABRICKS_TOKEN)$"
)
#: MLflow's per-request settings: a bounded wait instead of MLflow's default (7 retries, minutes of backoff).
_MAX_RETRIES = "2"


class TrackingUnavailable(RuntimeError):
    """The tracking server could not be reached or refused a request."""


def experiment_name(tracking_cfg: Any) -> str:
    return tracking_cfg.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def tracking_uri(tracking_cfg: Any) -> str:
    """The MLflow tracking URI: the config's, else ``MLFLOW_TRACKING_URI``, else MLflow's default, with a local
    path made absolute (the workers' working directory is not the driver's)."""
    import mlflow

    uri = tracking_cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    if re.match(r"^[A-Za-z][\w+.-]*:", uri) is None or uri.startswith("file:"):  # a folder (file store)
        path = uri.removeprefix("file://").removeprefix("file:")
        return "file://" + os.path.abspath(path)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri.removeprefix("sqlite:///"))
    return uri


def request_env(tracking_cfg: Any) -> dict[str, str]:
    """MLflow's HTTP settings for tracking requests: ``tracking.timeout_s`` per request, few retries. The user's own
    ``MLFLOW_HTTP_REQUEST_*`` settings win."""
    wanted = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(tracking_cfg.timeout_s))),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": _MAX_RETRIES,
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }
    return {k: os.environ.get(k, v) for k, v in wanted.items()}


def _apply_env(env: Mapping[str, str]) -> None:
    for key, value in env.items():
        os.environ.setdefault(key, value)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    errno = re.search(r"\[Errno -?\d+\] ([^'\"()]+)", text)  # requests' wrapping of a refused or unknown host
    if errno:
        return errno.group(1).strip()
    lines = text.splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": "0.1"}``: the config as MLflow params (strings)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return out


def config_digest(cfg: Any) -> str:
    from cls_ray.config import to_dict

    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------------------
# Driver: one MLflow run per training run


def start_mlflow_run(cfg: Any, run_uri: str, data_uri: str, dataset_digest: str) -> dict[str, Any] | None:
    """Find (a resumed run) or create the MLflow run of the training run at ``run_uri`` and log its config; the
    returned target goes to the workers in the run's spec. None, after one warning, when the server is down."""
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    from cls_ray.config import to_dict

    uri, name = tracking_uri(cfg.tracking), experiment_name(cfg.tracking)
    env = request_env(cfg.tracking)
    _apply_env(env)
    try:
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        escaped = run_uri.replace("'", "\\'")
        found = client.search_runs([experiment_id], f"tags.`{RUN_URI_TAG}` = '{escaped}'", max_results=1)
        tags = {
            RUN_URI_TAG: run_uri,
            "cls_ray.dataset": data_uri,
            "cls_ray.dataset_digest": dataset_digest,
            "cls_ray.config_digest": config_digest(cfg),
            "cls_ray.model": cfg.model.name,
        }
        if found:
            run_id, logged = found[0].info.run_id, found[0].data.params
            client.update_run(run_id, status="RUNNING")
        else:
            run_id, logged = client.create_run(experiment_id, run_name=cfg.train.run_name, tags=tags).info.run_id, {}
        params = [Param(k, v[:6000]) for k, v in flatten(to_dict(cfg)).items() if k not in logged]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=params[start : start + 100])
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    except Exception as exc:  # MlflowException, requests' ConnectionError, ...: tracking never stops training
        logger.warning("MLflow at %s is unavailable (%s): this run is not tracked in MLflow", uri, _reason(exc))
        return None
    logger.info("MLflow: run %s in experiment %r at %s", run_id, name, uri)
    client_env = {k: v for k, v in os.environ.items() if _CLIENT_ENV.match(k)}
    return {
        "uri": uri,
        "experiment_id": experiment_id,
        "run_id": run_id,
        "run_name": cfg.train.run_name,
        "env": {**env, **client_env},
    }


def _local_copy(uri: str, directory: str) -> str:
    """``uri`` (a local folder or an s3:// prefix) as a local folder (downloaded into ``directory`` if remote)."""
    if not storage.is_remote(uri):
        return uri
    import pyarrow.fs as pafs

    filesystem, path = storage.resolve(uri.rstrip("/"))
    pafs.copy_files(path, directory, source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem())
    return directory


def log_artifacts(target: dict[str, Any] | None, uri: str, artifact_path: str) -> bool:
    """Log the folder at ``uri`` (local or s3://) as artefacts of the MLflow run; False (after a warning) when the
    server refuses."""
    if target is None:
        return False
    from mlflow.tracking import MlflowClient

    _apply_env(target["env"])
    try:
        with tempfile.TemporaryDirectory(prefix="cls-ray-mlflow-") as tmp:
            MlflowClient(tracking_uri=target["uri"]).log_artifacts(
                target["run_id"], _local_copy(uri, tmp), artifact_path
            )
    except Exception as exc:
        logger.warning("MLflow at %s: %s not logged as artefacts (%s)", target["uri"], uri, _reason(exc))
        return False
    return True


def log_report(meta: Mapping[str, Any], output_dir: str) -> None:
    """Log a report of a package to the MLflow run of the training run it came from, when that run was tracked
    (``train.tracking`` of the package's config names mlflow); its artefact folder is the report's folder name."""
    from cls_ray.config import TrackingConfig, section_from_dict

    train_config = meta.get("train_config") or {}
    train = train_config.get("train") or {}
    if "mlflow" not in (train.get("tracking") or []):
        return
    from mlflow.tracking import MlflowClient

    tracking_cfg = section_from_dict(TrackingConfig, train_config.get("tracking") or {}, "the package's model.json")
    uri, run_uri = tracking_uri(tracking_cfg), storage.join(train["storage_path"], train["run_name"])
    _apply_env(request_env(tracking_cfg))
    try:
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(experiment_name(tracking_cfg))
        escaped = run_uri.replace("'", "\\'")
        runs = client.search_runs([experiment.experiment_id], f"tags.`{RUN_URI_TAG}` = '{escaped}'", max_results=1)
    except Exception as exc:
        logger.warning("MLflow at %s: the report is not logged (%s)", uri, _reason(exc))
        return
    if runs:
        target = {"uri": uri, "run_id": runs[0].info.run_id, "env": {}}
        if log_artifacts(target, output_dir, posixpath.basename(output_dir.rstrip("/"))):
            logger.info("MLflow: report logged to run %s at %s", target["run_id"], uri)


def end_mlflow_run(target: dict[str, Any] | None, status: str) -> None:
    """Mark the MLflow run ``FINISHED`` or ``FAILED`` (a resumed run sets it running again)."""
    if target is None:
        return
    from mlflow.tracking import MlflowClient

    _apply_env(target["env"])
    try:
        MlflowClient(tracking_uri=target["uri"]).set_terminated(target["run_id"], status=status)
    except Exception as exc:
        logger.warning("MLflow at %s: run %s not marked %s (%s)", target["uri"], target["run_id"], status, _reason(exc))


# --------------------------------------------------------------------------------------------------------------
# Rank 0: per-epoch metrics


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"
    }


class EpochTracker:
    """Rank 0's trackers of one run: ``log_epoch`` after every epoch. A tracker that fails is reported once and
    dropped; the run goes on."""

    def __init__(self, trackers: list[str], run_uri: str, mlflow_target: dict[str, Any] | None) -> None:
        self.run_uri = run_uri
        self.tensorboard = "tensorboard" in trackers
        self.mlflow: Any = None
        if "mlflow" in trackers and mlflow_target is not None:
            self.mlflow = self._join_mlflow(mlflow_target)

    @staticmethod
    def _join_mlflow(target: dict[str, Any]) -> Any:
        from ray.air.integrations.mlflow import setup_mlflow

        _apply_env(target["env"])
        os.environ["MLFLOW_RUN_ID"] = target["run_id"]  # mlflow.start_run continues the driver's run
        try:
            return setup_mlflow(
                tracking_uri=target["uri"],
                experiment_id=target["experiment_id"],
                run_name=target["run_name"],
                create_experiment_if_not_exists=False,
                rank_zero_only=True,
            )
        except Exception as exc:
            logger.warning("MLflow at %s is unavailable (%s): metrics go untracked", target["uri"], _reason(exc))
            return None

    def drop_after(self, epoch: int) -> None:
        """A resumed run writes the epochs after ``epoch`` again: their TensorBoard files go first."""
        if not self.tensorboard:
            return
        directory = storage.join(self.run_uri, TENSORBOARD_DIR)
        if not storage.exists(directory):
            return
        for info in storage.list_files(directory, recursive=False):
            match = re.search(r"\.epoch(\d+)$", info.path)
            if match and int(match.group(1)) > epoch:
                storage.delete(storage.join(directory, posixpath.basename(info.path)))

    def log_epoch(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        scalars = _scalars(metrics)
        if self.mlflow is not None:
            try:
                self.mlflow.log_metrics(scalars, step=epoch)
            except Exception as exc:
                logger.warning(
                    "MLflow stopped answering (%s): the run goes on, its later epochs untracked", _reason(exc)
                )
                self.mlflow = None
        if self.tensorboard:
            try:
                self._write_events(epoch, scalars)
            except Exception as exc:
                logger.warning("TensorBoard events not written (%s): the run goes on without them", _reason(exc))
                self.tensorboard = False

    def _write_events(self, epoch: int, scalars: Mapping[str, float]) -> None:
        from tensorboardX import SummaryWriter

        with tempfile.TemporaryDirectory(prefix="cls-ray-tb-") as tmp:
            writer = SummaryWriter(logdir=tmp, filename_suffix=f".epoch{epoch:06d}")
            for key, value in scalars.items():
                writer.add_scalar(key, value, global_step=epoch)
            writer.close()
            for name in os.listdir(tmp):
                with open(os.path.join(tmp, name), "rb") as f:
                    storage.write_bytes(storage.join(self.run_uri, TENSORBOARD_DIR, name), f.read())


# --------------------------------------------------------------------------------------------------------------
# Tune: one MLflow run per trial


def tune_callbacks(cfg: Any, experiment_uri: str) -> list[Any]:
    """Ray Tune's ``MLflowLoggerCallback`` when ``tune.tracking`` names mlflow and the server answers; its failures
    later in the search are reported once and stop only the tracking."""
    if "mlflow" not in cfg.tune.tracking:
        return []
    from mlflow.tracking import MlflowClient

    uri, name = tracking_uri(cfg.tracking), experiment_name(cfg.tracking)
    _apply_env(request_env(cfg.tracking))
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:
        logger.warning("MLflow at %s is unavailable (%s): this search is not tracked in MLflow", uri, _reason(exc))
        return []

    tags = {"cls_ray.experiment_uri": experiment_uri, "cls_ray.config_digest": config_digest(cfg)}
    return [_guarded_callback_class()(tracking_uri=uri, experiment_name=name, tags=tags)]


def __getattr__(name: str) -> Any:
    # ``GuardedMLflowLoggerCallback`` is made on first use: its base class is in a module that imports MLflow (~1.3 s
    # on 2 cores), and every Train worker and driver imports this module. Pickles (Tune's experiment state) name it
    # here, and unpickling finds it through this hook.
    if name == "GuardedMLflowLoggerCallback":
        return _guarded_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _guarded_callback_class() -> type:
    """``GuardedMLflowLoggerCallback``: Ray Tune's ``MLflowLoggerCallback``; an error of the tracking server disables
    it (reported once) instead of failing the search. Made once, then a module attribute like any class."""
    made = globals().get("GuardedMLflowLoggerCallback")
    if made is not None:
        return made
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.result import TIMESTEPS_TOTAL, TRAINING_ITERATION

    class GuardedMLflowLoggerCallback(MLflowLoggerCallback):
        failed = False

        def _guard(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
            if self.failed:
                return
            try:
                call(*args, **kwargs)
            except Exception as exc:
                self.failed = True
                logger.warning(
                    "MLflow at %s stopped answering (%s): the search goes on untracked", self.tracking_uri, _reason(exc)
                )

        def setup(self, *args: Any, **kwargs: Any) -> None:
            self._trial_runs: dict[Any, str] = {}
            self._guard(super().setup, *args, **kwargs)

        def log_trial_start(self, trial: Any) -> None:
            if trial not in self._trial_runs:
                self._guard(self._continue_earlier_run, trial)
            self._guard(super().log_trial_start, trial)

        def _continue_earlier_run(self, trial: Any) -> None:
            """A trial of a resumed search continues the run an earlier driver started for it (same trial name and
            experiment URI), marked running again, instead of a second run holding only the epochs after the
            resume."""
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.tracking_uri)
            runs = client.search_runs(
                [self.mlflow_util.experiment_id], _trial_filter(str(trial), self.tags["cls_ray.experiment_uri"])
            )
            if runs:
                self._trial_runs[trial] = runs[0].info.run_id
                client.update_run(runs[0].info.run_id, status="RUNNING")

        def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
            if trial not in self._trial_runs:
                return
            # Ray steps by the trainable's iteration, which starts again at 1 when a trial of a resumed search
            # continues its Train run: the epoch is the step (a resumed trial's points follow its earlier ones).
            step = result.get("epoch") or result.get(TIMESTEPS_TOTAL) or result[TRAINING_ITERATION]
            self._guard(self.mlflow_util.log_metrics, run_id=self._trial_runs[trial], metrics_to_log=result, step=step)

        def log_trial_end(self, trial: Any, failed: bool = False) -> None:
            if trial in self._trial_runs:
                self._guard(super().log_trial_end, trial, failed)

    GuardedMLflowLoggerCallback.__qualname__ = GuardedMLflowLoggerCallback.__name__  # pickled by reference
    GuardedMLflowLoggerCallback.__module__ = __name__
    globals()["GuardedMLflowLoggerCallback"] = GuardedMLflowLoggerCallback
    return GuardedMLflowLoggerCallback


def _trial_filter(trial_name: str, experiment_uri: str) -> str:
    """MLflow's search filter for the run of one trial of one experiment (Ray's ``trial_name`` tag and ours)."""
    name, uri = (value.replace("'", "\\'") for value in (trial_name, experiment_uri))
    return f"tags.trial_name = '{name}' and tags.`cls_ray.experiment_uri` = '{uri}'"


def log_promoted_package(cfg: Any, experiment_uri: str, trial_name: str, package_uri: str) -> None:
    """Log the promoted package as artefacts of the best trial's MLflow run (found by Ray's ``trial_name`` tag)."""
    if "mlflow" not in cfg.tune.tracking or not cfg.tracking.log_package:
        return
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg.tracking)
    try:
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(experiment_name(cfg.tracking))
        runs = client.search_runs([experiment.experiment_id], _trial_filter(trial_name, experiment_uri), max_results=1)
    except Exception as exc:
        logger.warning("MLflow at %s: the promoted package is not logged (%s)", uri, _reason(exc))
        return
    if runs:
        target = {"uri": uri, "run_id": runs[0].info.run_id, "env": {}}
        log_artifacts(target, package_uri, "package")
