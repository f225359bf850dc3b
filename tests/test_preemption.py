"""The save policy alone: every N steps, every N seconds, the last step, and a stop
request; and the stop signal it asks."""

import os
import signal

import pytest

from sft_jax import preemption


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_due_every_n_steps_and_at_the_last():
    assert [s for s in range(1, 11) if preemption.due(4, s, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if preemption.due(0, s, 10)] == [10]


def test_saves_on_steps_seconds_and_the_last_step():
    clock = Clock()
    with preemption.StopSignal() as stop:
        policy = preemption.SavePolicy(5, 30.0, last_step=12, stop=stop, clock=clock)
        decisions = []
        for step in range(1, 13):
            clock.now += 10.0  # 10 s per step: 30 s pass every third step since a save
            save, stopping = policy.decide(step)
            assert not stopping
            if save:
                policy.saved()
                decisions.append(step)
    # Seconds at 3 and 8 (the clock restarts at every save), steps at 5 and 10, the last 12.
    assert decisions == [3, 5, 8, 10, 12]


def test_a_signal_saves_and_stops_at_once():
    with preemption.StopSignal() as stop:
        policy = preemption.SavePolicy(100, 0.0, last_step=1000, stop=stop)
        assert policy.decide(1) == (False, False)
        os.kill(os.getpid(), signal.SIGTERM)  # caught: the step finishes, then save and stop
        assert policy.decide(2) == (True, True)
    # The previous handler is back once the loop is left.
    assert signal.getsignal(signal.SIGTERM) is not stop._handle


def test_one_process_catches_both_signals_and_a_second_ctrl_c_interrupts():
    with preemption.StopSignal() as stop:
        assert not stop.via_jax  # no JAX preemption service in one process: both are ours
        assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGINT) == stop._handle
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.stop_requested(1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
