"""A finished Ray Train run, read back from its storage (checkpoints and reported metrics).

Ray Tune's trials run their Train runs in driver processes that are gone by the time the search promotes the best
trial (and ASHA-stopped trials never return a result): the search reads the run back from where Ray Train wrote it.
"""

from __future__ import annotations

import ray.train

from cls_ray import storage


def load_run_result(run_uri: str) -> ray.train.Result:
    """The ``ray.train.Result`` of the Train run at ``run_uri`` (``{train.storage_path}/{train.run_name}``)."""
    fs, path = storage.resolve(run_uri)
    return ray.train.Result.from_path(path, storage_filesystem=fs)
