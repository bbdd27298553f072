"""Tests for gspo_jax.preemption: signals become a stop flag, handlers are restored."""

import os
import signal

import pytest

from gspo_jax.preemption import PreemptionGuard


def test_preemption_guard_turns_signals_into_a_flag():
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with PreemptionGuard() as guard:
        assert not guard.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # second Ctrl-C: still saving, no exception
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert {s: signal.getsignal(s) for s in previous} == previous
