"""Turning SIGTERM / SIGINT into a stop flag, so a run saves a checkpoint before it exits."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils

from gspo_jax.sharding import all_processes_agree

logger = logging.getLogger(__name__)


class PreemptionGuard:
    """Turns SIGTERM / SIGINT into a flag, so the trainer can save before it exits.

        with PreemptionGuard() as guard:
            for step in ...:
                train_step()
                if guard.should_stop(step):
                    checkpointer.save(step, ...); checkpointer.wait(); break

    SIGTERM or the first SIGINT set `requested`. A second SIGINT only repeats that the run stops
    after the checkpoint (so an impatient Ctrl-C does not lose the save); a third raises
    KeyboardInterrupt at once (an unfinished save is then ignored by resume). Previous handlers
    come back on exit. Handlers can only be installed from the main thread.

    Multi-host: `should_stop(step)` must be called by every process at the same steps; it
    returns True on all of them when any process was signalled or JAX's preemption sync point
    (`multihost_utils.reached_preemption_sync_point`) is reached. When JAX's distributed
    preemption service is on (multi-process with jax_enable_preemption_service), SIGTERM is left
    to that service instead of being caught here.
    """

    def __init__(self, *, use_jax_preemption_service: bool | None = None):
        if use_jax_preemption_service is None:
            use_jax_preemption_service = jax.process_count() > 1 and bool(
                getattr(jax.config, "jax_enable_preemption_service", False)
            )
        self._use_service = use_jax_preemption_service
        self.requested = False
        self._sigints = 0
        self._previous: dict[int, Any] = {}

    def _signals(self) -> tuple[int, ...]:
        return (signal.SIGINT,) if self._use_service else (signal.SIGTERM, signal.SIGINT)

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if signum == signal.SIGINT:
            self._sigints += 1
            if self._sigints >= 3:
                raise KeyboardInterrupt
            if self._sigints == 2:
                logger.warning(
                    "stop already requested: finishing the step and its checkpoint "
                    "save, then exiting. Press Ctrl-C again to abort without saving."
                )
                return
        self.requested = True
        logger.warning(
            "received %s: will save a checkpoint and stop after this step", signal.Signals(signum).name
        )

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "PreemptionGuard must be entered from the main thread (Python only delivers signals there)"
            )
        for signum in self._signals():
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            # None: the old handler was not installed from Python and cannot be put back.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step` (agreed across processes when multi-host)."""
        if jax.process_count() == 1:
            return self.requested
        try:
            reached = bool(multihost_utils.reached_preemption_sync_point(step))
        except RuntimeError:  # preemption service not running
            reached = False
        return reached or not all_processes_agree(not self.requested)
