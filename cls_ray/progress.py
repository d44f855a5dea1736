"""Live training progress on the driver, fed by what rank 0 reports, and the console's quiet default.

Rank 0 sends its step count, throughput and data wait to a small Ray actor (:class:`ProgressBoard`, no CPU) at most
once a second, and its epoch summaries when epochs end; the driver polls the actor and draws one bar per epoch with
the run's ETA (tqdm) on a terminal, or prints plain lines when stdout is not one (CI logs, ``ray job logs``): one
per epoch, and within a long epoch one at most every :data:`PLAIN_INTERVAL_S`.

:func:`console` is the CLI's choice of what the console shows: by default cls-ray's own lines only (Ray's
loggers on the driver at ERROR, Ray's deprecation warnings off, worker output not forwarded: ``log_to_driver``,
MLflow's run links not printed); ``-v`` shows everything. Errors stay visible either way: a failed run ends in one
line naming the cause.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

logger = logging.getLogger(__name__)

#: Plain (not a terminal) progress: at most one in-epoch line per this many seconds.
PLAIN_INTERVAL_S = 30.0
#: Rank 0 sends at most one step update per this many seconds.
SEND_INTERVAL_S = 1.0

_verbose = True  # library use (tests, notebooks) keeps Ray's output; the CLI chooses
RAY_DATA_LOGGING_ENV = "RAY_DATA_LOGGING_CONFIG"
#: Loggers the quiet console raises: Ray's driver side, and faiss's loader (INFO lines at import).
QUIETED = {"ray": logging.ERROR, "faiss": logging.WARNING}
#: MLflow's client writes a run's and its experiment's URLs to stdout when the run ends; cls-ray's own log line names
#: the run when it starts. Shown with -v.
MLFLOW_QUIET_ENV = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


@contextlib.contextmanager
def console(verbose: bool) -> Iterator[None]:
    """What the console shows while a CLI command runs (see the module docstring); entered before Ray starts.
    Everything it changes is put back on exit (a command run in-process, as tests do, leaves no trace)."""
    global _verbose
    saved_verbose, quieted = _verbose, {name: logging.getLogger(name) for name in QUIETED}
    saved_levels = {n: lg.level for n, lg in quieted.items()}
    saved_env = {name: os.environ.get(name) for name in (RAY_DATA_LOGGING_ENV, MLFLOW_QUIET_ENV)}
    _verbose = verbose
    with warnings.catch_warnings():
        if not verbose:
            for name, level in QUIETED.items():
                quieted[name].setLevel(level)
            # Ray Data configures its own logger from this file on every execution: the console handler at ERROR
            # (Ray Data's log file in the session directory keeps everything).
            os.environ.setdefault(RAY_DATA_LOGGING_ENV, str(Path(__file__).with_name("ray_data_logging.yaml")))
            os.environ.setdefault(MLFLOW_QUIET_ENV, "true")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"(ray|torch|timm|torchvision)(\.|$)")
        try:
            yield
        finally:
            _verbose = saved_verbose
            for name, level in saved_levels.items():
                quieted[name].setLevel(level)
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)


def forward_worker_output() -> bool:
    """``ray.init(log_to_driver=...)``: whether worker and actor output reaches this console."""
    return _verbose


def ray_logging_level() -> int:
    """``ray.init(logging_level=...)``: the level ``ray.init`` sets Ray's driver-side logger to."""
    return logging.INFO if _verbose else logging.ERROR


@ray.remote(num_cpus=0)
class ProgressBoard:
    """The latest progress of one run: rank 0 writes, the driver reads."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        self.epochs: list[dict[str, Any]] = []

    def step(self, state: dict[str, Any]) -> None:
        self.state = state

    def epoch(self, metrics: dict[str, Any]) -> None:
        self.epochs.append(metrics)

    def read(self, seen_epochs: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return self.state, self.epochs[seen_epochs:]


class StepReporter:
    """Rank 0's side: ``__call__(step)`` after every step of an epoch, throttled to :data:`SEND_INTERVAL_S`."""

    def __init__(self, board: Any, epoch: int, epochs: int, steps: int) -> None:
        self.board, self.epoch, self.epochs, self.steps = board, epoch, epochs, steps
        self.start = time.perf_counter()
        self.sent = 0.0

    def __call__(self, step: int, samples: int, wait_s: float) -> None:
        now = time.perf_counter()
        if now - self.sent < SEND_INTERVAL_S and step < self.steps:
            return
        self.sent = now
        elapsed = max(now - self.start, 1e-9)
        state = {
            "epoch": self.epoch,
            "epochs": self.epochs,
            "step": step,
            "steps": self.steps,
            "img_per_s": samples / elapsed,
            "data_wait_frac": wait_s / elapsed,
            "elapsed_s": elapsed,
        }
        try:
            self.board.step.remote(state)
        except Exception:  # the driver went away: progress is for show only
            self.board = _Dropped()


class _Dropped:
    class _Method:
        def remote(self, *args: Any) -> None:
            return None

    step = epoch = _Method()


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressPrinter:
    """The driver's side: a thread that polls the board and draws (tty) or prints (plain) the run's progress.

    ``format_epoch(metrics) -> str`` is the summary line of an ended epoch."""

    def __init__(self, board: Any, epochs: int, format_epoch: Any, stream: Any = None) -> None:
        self.board, self.epochs, self.format_epoch = board, epochs, format_epoch
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.seen = 0
        self.ended = 0
        self.epoch_started = time.monotonic()
        self.bar: Any = None
        self.bar_epoch = 0
        self.last_plain = 0.0
        self.epoch_seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cls-ray-progress", daemon=True)

    def __enter__(self) -> ProgressPrinter:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self._poll()  # the last epochs' lines
        except Exception as exc:
            logger.debug("progress: %s", exc)
        self._close_bar()
        ray.kill(self.board)

    def _run(self) -> None:
        while not self._stop.wait(0.5 if self.tty else 2.0):
            try:
                self._poll()
            except Exception as exc:  # the board is gone (the run ended): nothing more to show
                logger.debug("progress: %s", exc)
                return

    def _eta(self, state: dict[str, Any]) -> float | None:
        """Seconds left in the run: this epoch's remaining steps at its rate, plus the epochs after it at the mean
        epoch time so far (this epoch's projected time before any epoch has ended)."""
        step, steps, elapsed = state.get("step", 0), state.get("steps", 0), state.get("elapsed_s", 0.0)
        if not step or not steps:
            return None
        this_epoch = elapsed / step * steps
        per_epoch = sum(self.epoch_seconds) / len(self.epoch_seconds) if self.epoch_seconds else this_epoch
        return max(0.0, this_epoch - elapsed) + per_epoch * (self.epochs - state["epoch"])

    def _poll(self) -> None:
        state, ended = ray.get(self.board.read.remote(self.seen), timeout=30)
        for metrics in ended:
            self.seen += 1
            self.ended = max(self.ended, int(metrics["epoch"]))
            now = time.monotonic()
            self.epoch_seconds.append(now - self.epoch_started)  # wall time, validation and checkpoint included
            self.epoch_started = now
            self._close_bar()
            left = self.epochs - self.ended
            eta = f" | ETA {_duration(left * sum(self.epoch_seconds) / len(self.epoch_seconds))}" if left > 0 else ""
            self._print(self.format_epoch(metrics) + eta)
        if not state or state["epoch"] <= self.ended:  # no step yet, or that epoch's line is out
            return
        eta = self._eta(state)
        postfix = f"{state['img_per_s']:.0f} img/s, data wait {state['data_wait_frac']:.0%}"
        if self.tty:
            self._draw(state, postfix, eta)
        elif time.monotonic() - self.last_plain >= PLAIN_INTERVAL_S and state["step"] < state["steps"]:
            self.last_plain = time.monotonic()
            left = f", run ETA {_duration(eta)}" if eta is not None else ""
            self._print(
                f"epoch {state['epoch']}/{state['epochs']}: step {state['step']}/{state['steps']}, {postfix}{left}"
            )

    def _draw(self, state: dict[str, Any], postfix: str, eta: float | None) -> None:
        from tqdm import tqdm

        if self.bar is None or self.bar_epoch != state["epoch"]:
            self._close_bar()
            self.bar = tqdm(
                total=state["steps"],
                desc=f"epoch {state['epoch']}/{state['epochs']}",
                unit="step",
                file=self.stream,
                leave=False,
                # A terminal that reports no size (0 x 0: tqdm would draw nothing) gets 100 x 24.
                ncols=shutil.get_terminal_size((100, 24)).columns,
                nrows=shutil.get_terminal_size((100, 24)).lines,
            )
            self.bar_epoch = state["epoch"]
        self.bar.n = min(state["step"], state["steps"])
        left = f", run ETA {_duration(eta)}" if eta is not None else ""
        self.bar.set_postfix_str(postfix + left, refresh=False)
        self.bar.refresh()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)


class PlainBar:
    """A progress bar for output that is not a terminal: a line at most every :data:`PLAIN_INTERVAL_S` and one at
    the end (``desc: n/total img (pct), rate img/s, ETA``), never a carriage-return redraw in a log file."""

    def __init__(self, total: int, desc: str, unit: str, stream: Any = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.n = 0
        self.start = self.last = time.monotonic()

    def __enter__(self) -> PlainBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= PLAIN_INTERVAL_S and self.n < self.total:
            self.last = time.monotonic()
            self._line()

    def _line(self) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.n / elapsed
        pct = f" ({self.n / self.total:.0%})" if self.total else ""
        eta = f", ETA {_duration((self.total - self.n) / rate)}" if rate > 0 and self.n < self.total else ""
        done = f" in {_duration(elapsed)}" if self.n >= self.total else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}, {rate:.0f} {self.unit}/s{eta}{done}",
              file=self.stream, flush=True)  # fmt: skip

    def close(self) -> None:
        if self.start is not None:
            self._line()
            self.start = None  # type: ignore[assignment]

    def write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


def bar(total: int, desc: str, unit: str = "img", stream: Any = None) -> Any:
    """A progress bar over ``total`` items: tqdm on a terminal, :class:`PlainBar` lines otherwise."""
    stream = stream or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream, mininterval=0.5)
    return PlainBar(total, desc, unit, stream)
