"""The metrics history of a run: one JSON record per epoch, each written once, under ``RUN/history/``.

Rank 0 writes ``history/epoch-000001.json`` when an epoch ends and never rewrites an earlier one, so the bytes a run
writes grow with its epochs, not with their square, and on object stores every record is one atomic PUT (S3 has no
append). A record holds the epoch's report (loss, throughput, data wait, learning rate, the latest validation
scalars), whether it evaluated, the checkpoint epoch its process resumed from, and on evaluation epochs the
per-class metrics (one entry per class). The confusion matrix (classes x classes) is not in the history: the
checkpoint of its epoch holds it (:data:`cls_ray.train.state.EVALUATION_FILE`), so neither the history nor a
checkpoint grows with epochs x classes^2.

A resumed run first drops the records after the checkpoint it resumed from (epochs its failed attempt ran past the
last checkpoint) and then writes those epochs again: every epoch appears once, none is lost.

Knows nothing of Ray.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

from cls_ray import storage

HISTORY_DIR = "history"
_PREFIX, _SUFFIX = "epoch-", ".json"


def record_uri(run_uri: str, epoch: int) -> str:
    return storage.join(run_uri, HISTORY_DIR, f"{_PREFIX}{epoch:06d}{_SUFFIX}")


def write_record(run_uri: str, record: dict[str, Any]) -> None:
    """Write the record of epoch ``record["epoch"]`` (compact JSON, one object)."""
    data = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    storage.write_bytes(record_uri(run_uri, int(record["epoch"])), data)


def _record_epochs(run_uri: str) -> dict[int, str]:
    directory = storage.join(run_uri, HISTORY_DIR)
    if not storage.exists(directory):
        return {}
    epochs: dict[int, str] = {}
    for info in storage.list_files(directory, recursive=False):
        name = posixpath.basename(info.path)
        number = name[len(_PREFIX) : -len(_SUFFIX)]
        if name.startswith(_PREFIX) and name.endswith(_SUFFIX) and number.isdigit():
            epochs[int(number)] = storage.join(directory, name)
    return epochs


def read_history(run_uri: str) -> list[dict[str, Any]]:
    """Every epoch's record of the run at ``run_uri``, in epoch order (empty when it has none yet)."""
    return [storage.read_json(uri) for _, uri in sorted(_record_epochs(run_uri).items())]


def drop_records_after(run_uri: str, epoch: int) -> list[int]:
    """Delete the records of epochs after ``epoch`` (a resumed run writes them again); returns their epochs."""
    dropped = sorted(e for e in _record_epochs(run_uri) if e > epoch)
    for e in dropped:
        storage.delete(record_uri(run_uri, e))
    return dropped
