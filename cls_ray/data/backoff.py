"""Stops Ray Data's streaming executor from spinning while its consumer is the bottleneck.

Ray Data 2.60's scheduling loop blocks only in ``ray.wait(active tasks, timeout=0.1)``. When the consumer (a training
worker pulling through ``streaming_split``, or any slow iterator) is slower than decoding, the executor is
backpressured: either no task is in flight, or the one in flight has finished and its output may not be read yet.
Both ways ``ray.wait`` returns at once and the loop runs flat out, ~2,000 steps a second doing bookkeeping. In the
demo's training that was the ``SplitCoordinator`` actor taking 73% of a core out of two, more than a third of the CPU
the training workers should have had.

:class:`IdleBackoff` is an execution callback (``DataContext.custom_execution_callback_classes``, the hook Ray Data
calls after every scheduling step): when a step changed nothing (no input taken, no task dispatched or finished, no
output produced or handed to the consumer), it sleeps, 1 ms at first and doubling up to :data:`MAX_SLEEP_S`; any
progress resets it. Ray's own loop waits up to 100 ms for a task, so the added delay is within what it already
tolerates, and it only ever happens while nothing can move.

The hook and the counters are Ray internals (:mod:`cls_ray.ray_internals`): where an upgrade changed them, the
backoff is not installed or turns itself off at its first step, with one warning, and Ray Data runs as it would
without cls-ray. ``data.idle_backoff: false`` turns it off on purpose.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from cls_ray import ray_internals

if TYPE_CHECKING:
    from ray.data import DataContext

MIN_SLEEP_S = 0.001
MAX_SLEEP_S = 0.05

_HOOK = ray_internals.execution_callback_base()
"""Ray Data's execution-callback base class; ``None`` where Ray no longer has it (then nothing is installed)."""


class IdleBackoff(_HOOK or object):  # type: ignore[misc]
    """Sleep after scheduling steps that made no progress (see the module docstring).

    The operators' progress counters are Ray internals (:func:`cls_ray.ray_internals.data_progress`): where they
    cannot be read, the first step says so (one warning per process) and the backoff stops sleeping for good."""

    def __init__(self) -> None:  # Ray Data makes one instance per execution (each epoch)
        self._last: tuple[int, ...] | None = None
        self._sleep = 0.0
        self.disabled = False

    def on_execution_step(self, executor: object) -> None:
        if self.disabled:
            return
        state = ray_internals.data_progress(executor)
        if state is None:
            self.disabled = True
            return
        if not state:
            return
        if state != self._last:
            self._last, self._sleep = state, 0.0
            return
        self._sleep = min(MAX_SLEEP_S, max(MIN_SLEEP_S, 2 * self._sleep))
        time.sleep(self._sleep)


def install(context: DataContext) -> bool:
    """Add :class:`IdleBackoff` to a dataset's context (once); ``False`` (with one warning) where this Ray has no
    execution-callback hook. ``data.idle_backoff=false`` skips the call altogether."""
    if _HOOK is None:
        return False
    return ray_internals.add_execution_callback(context, IdleBackoff)
