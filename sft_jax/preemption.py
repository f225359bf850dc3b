"""When to save and when to stop: `SavePolicy` (every N steps, every N seconds, the last
step, preemption) over `StopSignal` (SIGTERM — what TPU VMs and most schedulers send
before preemption —, Ctrl-C, or JAX's multi-host preemption sync point).

The train loop asks the policy after each step; on a stop request the loop saves a
checkpoint of that step and returns. Several processes must all save and stop at the same
step, so with more than one process every decision comes from values all hosts share:
the step count, JAX's coordination service (`reached_preemption_sync_point`, which sees a
signal on any host), and process 0's clock, broadcast.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class StopSignal:
    """Context manager: catches SIGTERM/SIGINT while training, restores handlers after."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, agree_every: int = 10):
        self.received: int | None = None
        self.agree_every = agree_every  # steps between cross-process checks of local signals
        self._previous: dict = {}

    def _handle(self, signum, _frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user really wants out now
        self.received = signum
        logging.warning(
            "%s received: finishing the current step, then saving a checkpoint",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> StopSignal:
        # Signal handlers can only be set from the main thread (tests may run elsewhere).
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def stop_requested(self, step: int) -> bool:
        if jax.process_count() > 1:
            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    return True
            except RuntimeError:
                pass  # no preemption service (e.g. CPU clusters): local signals only
            # Agree across processes (a collective, so not every step): stop if any process
            # got a signal.
            if step % self.agree_every:
                return False
            flag = jax.numpy.asarray(1 if self.received is not None else 0)
            return bool(multihost_utils.process_allgather(flag).max())
        return self.received is not None


def due(every: int, step: int, last_step: int) -> bool:
    """Periodic work at `step` (a count of steps done): every `every` steps (0 = never) and
    always at the last step."""
    return step == last_step or (every > 0 and step % every == 0)


class SavePolicy:
    """Whether to save after a step, and whether the run must stop there."""

    def __init__(
        self,
        every_steps: int,
        every_seconds: float,
        last_step: int,
        stop: StopSignal,
        clock: Callable[[], float] = time.monotonic,
        agree_every: int = 10,
    ):
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.last_step = last_step
        self._stop = stop
        self._clock = clock
        self._agree_every = agree_every  # steps between broadcasts of process 0's clock
        self._last_save = clock()

    def decide(self, step: int) -> tuple[bool, bool]:
        """(save now, stop now) after `step` steps, the same on every process."""
        stop = self._stop.stop_requested(step)
        save = stop or due(self.every_steps, step, self.last_step) or self._time_due(step)
        return save, stop

    def saved(self) -> None:
        """A save started now: the seconds count again from here."""
        self._last_save = self._clock()

    def _time_due(self, step: int) -> bool:
        if self.every_seconds <= 0:
            return False
        local = self._clock() - self._last_save >= self.every_seconds
        if jax.process_count() == 1:
            return local
        # Hosts' clocks differ: process 0 decides, on steps every host checks (a collective,
        # so not every step).
        if step % self._agree_every:
            return False
        return bool(multihost_utils.broadcast_one_to_all(np.int32(local)))
