"""The search's leaderboard: one row per trial with its sampled config, best metric, epochs run, how it ended and
its wall time. Built from Tune's ResultGrid, written as CSV and Parquet in the experiment directory and printed as
a rich table."""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from cls_ray import storage
from cls_ray.config import Config
from cls_ray.tune.space import config_values

LEADERBOARD_CSV = "leaderboard.csv"
LEADERBOARD_PARQUET = "leaderboard.parquet"

COMPLETED = "completed"
STOPPED_ASHA = "stopped early (ASHA)"
STOPPED_PATIENCE = "stopped early (no improvement)"
ERRORED = "errored"
NO_RESULTS = "no results"


@dataclass
class TrialRow:
    """One trial of the search."""

    trial: str
    status: str
    """completed | stopped early (ASHA) | stopped early (no improvement) | errored | no results."""
    best_metric: float | None
    best_epoch: int | None
    epochs: int
    """Epochs the trial trained (the last epoch it reported)."""
    wall_time_s: float
    config: dict[str, Any] = field(default_factory=dict)
    """The sampled Config values, dotted keys."""
    error: str | None = None


@dataclass
class Leaderboard:
    """All trials, best first (trials without the metric last)."""

    metric: str
    mode: str
    max_epochs: int
    rows: list[TrialRow]

    def best(self) -> TrialRow | None:
        return self.rows[0] if self.rows and self.rows[0].best_metric is not None else None

    def to_records(self) -> list[dict[str, Any]]:
        """Flat records: rank, trial, status, the metric, epochs, wall time, config columns, error."""
        keys = sorted({k for row in self.rows for k in row.config})
        records = []
        for rank, row in enumerate(self.rows, start=1):
            record = {
                "rank": rank,
                "trial": row.trial,
                "status": row.status,
                self.metric: row.best_metric,
                "best_epoch": row.best_epoch,
                "epochs": row.epochs,
                "wall_time_s": round(row.wall_time_s, 2),
            }
            record.update({k: row.config.get(k) for k in keys})
            record["error"] = row.error
            records.append(record)
        return records


_WRAPPERS = ("WorkerGroupError", "TrainingFailedError", "RayTaskError", "TuneError", "RayActorError")


def _error_summary(error: BaseException | None) -> str | None:
    """The line of a trial's error that says what went wrong (Tune and Train wrap the worker's traceback)."""
    if error is None:
        return None
    full = str(error)
    lines = [line.strip() for line in full.splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*:", line)]
    specific = [line for line in raised if not any(w in line.split(":", 1)[0] for w in _WRAPPERS)]
    text = (specific or raised or lines[-1:] or [type(error).__name__])[-1]
    if re.search(r"oom kill|OutOfMemoryError|low on memory", full, re.IGNORECASE):
        text = f"out of memory (Ray's memory monitor killed a worker): {text}"
    return text[:500]


def result_config(result: Any) -> dict[str, Any]:
    """The trial's sampled values: from its results, or from ``params.json`` when it errored before reporting."""
    if result.config:
        return dict(result.config)
    path = f"{str(result.path).rstrip('/')}/params.json"
    try:
        with result.filesystem.open_input_stream(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return {}


def _status(error: Any, epochs: int, last_done: bool, max_epochs: int) -> str:
    if error is not None:
        return ERRORED
    if epochs == 0:
        return NO_RESULTS
    if epochs >= max_epochs:
        return COMPLETED
    # Tune marks the logged result `done` when the scheduler stops a trial; a run that ends on its own (the training
    # loop's early stopping) finishes with an unmarked last result.
    return STOPPED_ASHA if last_done else STOPPED_PATIENCE


def trial_row(result: Any, metric: str, mode: str, max_epochs: int) -> TrialRow:
    """A leaderboard row from one ``ray.tune.Result``."""
    name = str(result.path).rstrip("/").rsplit("/", 1)[-1]
    df = result.metrics_dataframe
    best_metric = best_epoch = None
    epochs, wall, last_done = 0, 0.0, False
    if df is not None and len(df) and "epoch" in df:
        epochs = int(df["epoch"].max())
        wall = float(df["time_this_iter_s"].sum()) if "time_this_iter_s" in df else 0.0
        last_done = bool(df["done"].iloc[-1]) if "done" in df else False
        if metric in df and df[metric].notna().any():
            # Ties go to the latest epoch, as in Ray's checkpoint manager (which keeps, and so packages, the newer
            # of two equally scored checkpoints): the row then names the epoch whose weights were promoted.
            best = df[metric].max() if mode == "max" else df[metric].min()
            idx = df.index[df[metric] == best][-1]
            best_metric, best_epoch = float(best), int(df.loc[idx, "epoch"])
    return TrialRow(
        trial=name,
        status=_status(result.error, epochs, last_done, max_epochs),
        best_metric=best_metric,
        best_epoch=best_epoch,
        epochs=epochs,
        wall_time_s=wall,
        config=config_values(result_config(result)),
        error=_error_summary(result.error),
    )


def build_leaderboard(grid: Any, cfg: Config) -> Leaderboard:
    """Rank every trial of a ``ResultGrid`` by its best ``train.metric`` (ties: fewer epochs, then name)."""
    metric, mode = cfg.train.metric, cfg.train.metric_mode
    rows = [trial_row(result, metric, mode, cfg.tune.max_epochs) for result in grid]
    sign = -1.0 if mode == "max" else 1.0

    def key(row: TrialRow) -> tuple:
        missing = row.best_metric is None or math.isnan(row.best_metric)
        return (missing, 0.0 if missing else sign * row.best_metric, row.epochs, row.trial)

    return Leaderboard(metric=metric, mode=mode, max_epochs=cfg.tune.max_epochs, rows=sorted(rows, key=key))


def _table(board: Leaderboard) -> pa.Table:
    records = board.to_records()
    columns: dict[str, list[Any]] = {name: [r[name] for r in records] for name in (records[0] if records else {})}
    for name, values in columns.items():
        kinds = {type(v) for v in values if v is not None}
        uniform = kinds <= {int, float} or kinds <= {bool} or kinds <= {str}
        if not uniform:  # a column mixing types (e.g. choice [0, "x"]): keep every value readable as text
            columns[name] = [None if v is None else json.dumps(v) if not isinstance(v, str) else v for v in values]
    return pa.table(columns) if columns else pa.table({"trial": pa.array([], pa.string())})


def write_leaderboard(board: Leaderboard, exp_uri: str) -> str:
    """Write ``leaderboard.csv`` and ``leaderboard.parquet`` into the experiment; returns the CSV's URI."""
    table = _table(board)
    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    csv_uri = storage.join(exp_uri, LEADERBOARD_CSV)
    storage.write_bytes(csv_uri, buf.getvalue())
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(storage.join(exp_uri, LEADERBOARD_PARQUET), sink.getvalue().to_pybytes())
    return csv_uri


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:.4g}"
    return "-" if value is None else str(value)


def _headers(keys: list[str]) -> list[str]:
    """Short column names (``optim.lr`` -> ``lr``) unless two keys would share one."""
    short = [k.split(".", 1)[-1] for k in keys]
    return [s if short.count(s) == 1 else k for s, k in zip(short, keys, strict=True)]


def print_leaderboard(board: Leaderboard, console: Any = None) -> None:
    """Print the leaderboard as a rich table on the terminal (the config columns that vary across trials)."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file or CI: no need to squeeze rows into 80 columns
            console = Console(width=220)
    keys = sorted({k for row in board.rows for k in row.config})
    varying = [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in board.rows}) > 1]
    table = Table(title=f"cls-ray tune: {len(board.rows)} trials, best {board.metric} ({board.mode}) first")
    for name in ["#", "trial", "status", board.metric, "epochs", "time (s)", *_headers(varying)]:
        table.add_column(name, no_wrap=name == "trial")
    table.add_column("error", overflow="ellipsis", max_width=60)
    for rank, row in enumerate(board.rows, start=1):
        table.add_row(
            str(rank),
            row.trial,
            row.status,
            _fmt(row.best_metric),
            str(row.epochs),
            f"{row.wall_time_s:.1f}",
            *[_fmt(row.config.get(k)) for k in varying],
            row.error or "",
        )
    console.print(table)
