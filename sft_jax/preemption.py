"""Stop cleanly when asked: SIGTERM (what TPU VMs and most schedulers send before
preemption), Ctrl-C, or JAX's multi-host preemption sync point.

The train loop asks `stop_requested(step)` after each step; when it says yes, the loop
saves a checkpoint of that step and returns. Several processes must all stop at the same
step, so with more than one process the decision comes from JAX's coordination service
(`reached_preemption_sync_point`), which sees the signal on any host.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging


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
            from jax.experimental import multihost_utils

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
