"""Stopping a run cleanly, at the same step on every process.

A preemption notice is a SIGTERM to *some* of the processes of a run. Every
process must save the same step (orbax's save is collective) and exit, or the
ones still stepping wait forever in their next collective.

* One process: a Python SIGTERM handler sets a flag, checked after every step.
* Several processes (``jax.distributed``): JAX's preemption service. At
  ``jax.distributed.initialize`` it installs its own SIGTERM handler, which
  reports the notice to the coordinator; the coordinator picks the step after
  the furthest any process has reported, and
  ``multihost_utils.reached_preemption_sync_point`` (here through orbax's
  ``CheckpointManager.reached_preemption``) returns True at that step on every
  process. No Python handler is installed then: it would replace JAX's.
"""
from __future__ import annotations

import signal
from typing import Callable

import jax


class Stopper:
  """Answers, after every step, whether this process stops at it.

  Args:
    reached_sync_point: ``step -> bool``, JAX's multi-process preemption sync
      point (`checkpointing.Checkpointer.reached_preemption`); only consulted
      with more than one process. It must be called at every step, by every
      process, with the same steps (`should_stop` is).
  """

  def __init__(self, reached_sync_point: Callable[[int], bool]):
    self._reached = reached_sync_point
    self._multi = jax.process_count() > 1
    self.requested = False
    self._previous = None if self._multi else signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self, step: int) -> bool:
    """Call after every step, with the number of steps done."""
    return self._reached(step) if self._multi else self.requested

  def restore(self):
    """Puts back the SIGTERM handler found at construction (one process)."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
