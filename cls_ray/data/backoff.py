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
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ray.data._internal.execution.execution_callback import ExecutionCallback

if TYPE_CHECKING:
    from ray.data import DataContext
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

MIN_SLEEP_S = 0.001
MAX_SLEEP_S = 0.05

_PROGRESS_METRICS = (
    "num_inputs_received",
    "num_tasks_submitted",
    "num_tasks_finished",
    "num_task_outputs_generated",
    "num_outputs_taken",
    "num_external_inqueue_blocks",
    "num_external_outqueue_blocks",
)
"""Operator counters that move whenever the pipeline makes progress (read directly: a rename in Ray fails loudly)."""


class IdleBackoff(ExecutionCallback):
    """Sleep after scheduling steps that made no progress (see the module docstring)."""

    def __init__(self) -> None:  # Ray Data makes one instance per execution (each epoch)
        self._last: tuple[int, ...] | None = None
        self._sleep = 0.0

    def on_execution_step(self, executor: StreamingExecutor) -> None:
        topology = executor._topology
        if not topology:
            return
        state = tuple(getattr(op.metrics, name) for op in topology for name in _PROGRESS_METRICS)
        if state != self._last:
            self._last, self._sleep = state, 0.0
            return
        self._sleep = min(MAX_SLEEP_S, max(MIN_SLEEP_S, 2 * self._sleep))
        time.sleep(self._sleep)


def install(context: DataContext) -> None:
    """Add :class:`IdleBackoff` to a dataset's context (once)."""
    if IdleBackoff not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(IdleBackoff)
