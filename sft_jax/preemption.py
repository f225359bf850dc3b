"""When to save and when to stop: `SavePolicy` (every N steps, every N seconds, the last
step, preemption) over `StopSignal` (SIGTERM — what TPU VMs and most schedulers send
before preemption —, Ctrl-C, or JAX's multi-host preemption sync point).

The train loop asks the policy after each step; on a stop request the loop saves a
checkpoint of that step and returns. Several processes must all save and stop at the same
step, so with more than one process every decision comes from values all hosts share:
the step count, JAX's preemption sync point, and process 0's clock, broadcast.

Under distributed JAX, `jax.distributed.initialize` starts JAX's preemption service: a C++
SIGTERM handler on each host tells the coordination service, which picks one step (the
largest step any host has reported, plus one) at which `reached_preemption_sync_point` is
True on every host; asking it is a local check, made every step. Found on CPU (JAX 0.10.2,
2 processes over gloo on loopback): SIGTERM to one process makes the sync point fire at the
same step on both, about a second later; a Python handler for SIGTERM (`signal.signal`)
replaces JAX's, and then the sync point never fires. So with the service, SIGTERM is left
to JAX, and Ctrl-C, still caught here (a second one interrupts at once), is passed on to
it as a SIGTERM to this process (also checked: both processes stop at one step). JAX's
handler swallows SIGTERM outside the train loop too: the process does not die of it.
The service keeps only the step last asked about, so nothing else may ask: Orbax's
CheckpointManager would, from its finalize thread with an older step (setting a sync point
already passed, and the run would never stop); `checkpoint.Checkpointer`'s manager answers
Orbax's question itself.

Without the service (one process, or `jax_enable_preemption_service` off), our handlers
take both signals; several processes then agree by a collective every `agree_every` steps
(an allgather of "got a signal"), so a stop comes at most that many steps late.

Large runs and short notices. A checkpoint that cannot be written before the process is
killed (a 70B model's ~850 GB in a 30 s notice) is never committed, and restore skips it
for the last committed one (`Checkpointer.restore_latest_good`): what a preemption costs is
then the steps since the last periodic save. `checkpoint.save_every_seconds` bounds that by
time, with asynchronous saves and `checkpoint.keep` bounding the disk. Orbax 0.12.8's
emergency checkpointing (`orbax.checkpoint.experimental.emergency.CheckpointManager`:
frequent saves to each host's local disk or RAM disk, rare ones to persistent storage) is
not used. It needs at least two replicas of the whole state on disjoint sets of processes
along one mesh axis (here `mesh.data` ≥ 2 across hosts; with one replica it is a plain
CheckpointManager): a lost host's local copy comes back from a surviving replica, so it
helps when some hosts fail, not when a preemption takes back every VM and their local
disks with it. It also saves one PyTree only (our meta JSON would need its second manager),
wants each host's local folder made beforehand, and Orbax marks it experimental, "do not
use without specific approval".
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


def jax_preemption_service() -> bool:
    """Whether JAX's preemption service runs: several processes, and the sync manager that
    `jax.distributed.initialize` creates unless `jax_enable_preemption_service` is off."""
    if jax.process_count() == 1:
        return False
    from jax._src import distributed  # where reached_preemption_sync_point looks too

    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class StopSignal:
    """Context manager: catches the stop signals while training, restores handlers after.

    SIGTERM and SIGINT; with JAX's preemption service, SIGINT only (SIGTERM is JAX's)."""

    def __init__(self, agree_every: int = 10):
        self.received: int | None = None
        self.agree_every = agree_every  # steps between cross-process checks of local signals
        self.via_jax = jax_preemption_service()
        # JAX's sync point counts calls, not training steps: a notice before the first call
        # picks call 1. The loop asks once per step on every host, so a count of the calls
        # agrees across hosts where the global step of a resumed run would never match.
        self._calls = 0
        self.signals = (signal.SIGINT,) if self.via_jax else (signal.SIGTERM, signal.SIGINT)
        self._previous: dict = {}

    def _handle(self, signum, _frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user really wants out now
        self.received = signum
        logging.warning(
            "%s received: finishing the current step, then saving a checkpoint%s",
            signal.Signals(signum).name,
            " (at the step JAX's preemption service picks for every process)"
            if self.via_jax
            else "",
        )
        if self.via_jax:  # JAX's SIGTERM handler is how the service hears of a stop
            os.kill(os.getpid(), signal.SIGTERM)

    def __enter__(self) -> StopSignal:
        # Signal handlers can only be set from the main thread (tests may run elsewhere).
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def stop_requested(self, step: int) -> bool:
        """Whether to stop after `step` steps; the same on every process. Ask every step:
        JAX's sync point is True at one step only."""
        if self.via_jax:
            self._calls += 1
            return multihost_utils.reached_preemption_sync_point(self._calls)
        if jax.process_count() == 1:
            return self.received is not None
        # Agree across processes (a collective, so not every step): stop if any process
        # got a signal.
        if step % self.agree_every:
            return False
        flag = jax.numpy.asarray(1 if self.received is not None else 0)
        return bool(multihost_utils.process_allgather(flag).max())


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
