"""Ray Tune's MLflow callback, guarded: kept out of :mod:`cls_ray.tracking`, which every Train worker and driver
imports, because importing it imports MLflow (~1.3 s on 2 cores); only a search with ``tune.tracking: [mlflow]``
needs it (:func:`cls_ray.tracking.tune_callbacks`)."""

from __future__ import annotations

import logging
from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback

from cls_ray.tracking import _reason

logger = logging.getLogger("cls_ray.tracking")


class GuardedMLflowLoggerCallback(MLflowLoggerCallback):
    """Ray Tune's MLflow callback; an error of the tracking server disables it (reported once) instead of failing
    the search."""

    failed = False

    def _guard(self, method: str, *args: Any, **kwargs: Any) -> None:
        if self.failed:
            return
        try:
            getattr(super(), method)(*args, **kwargs)
        except Exception as exc:
            self.failed = True
            logger.warning(
                "MLflow at %s stopped answering (%s): the search goes on untracked", self.tracking_uri, _reason(exc)
            )

    def setup(self, *args: Any, **kwargs: Any) -> None:
        self._trial_runs: dict[Any, str] = {}
        self._guard("setup", *args, **kwargs)

    def log_trial_start(self, trial: Any) -> None:
        self._guard("log_trial_start", trial)

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        if trial in self._trial_runs:
            self._guard("log_trial_result", iteration, trial, result)

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        if trial in self._trial_runs:
            self._guard("log_trial_end", trial, failed)
