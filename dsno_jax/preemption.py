"""Stopping for preemption: a SIGTERM stops every process at the same safe point, exit status 75.

A stage asks `reached()` (or `check`) at its safe points: between training steps, generation
rounds, sampling batches and pipeline stages. Every process must ask alike, the same number of
times, because with several processes the answer comes from JAX's preemption sync manager: it
catches SIGTERM on any process and names one call at which all of them answer True.
"""
import contextlib
import signal
import threading

import jax
from absl import logging

# sysexits' EX_TEMPFAIL: the launchers (launch/) relaunch or requeue a run that exits with it.
EXIT_STATUS = 75


class Preempted(Exception):
  """A stage stopped on SIGTERM at a safe point (after its checkpoint, if it has one)."""


_received = threading.Event()
_listeners = 0  # nested `listening` contexts; the outermost installs and restores the handler
_asked = 0  # calls of `reached` in this process: the sync manager's step counter


def _on_sigterm(signum, frame):
  del signum, frame
  logging.warning("SIGTERM: stopping at the next safe point")
  _received.set()


@contextlib.contextmanager
def listening():
  """Within it, a SIGTERM asks for a stop instead of killing this process.

  One process catches SIGTERM here (only the main thread may); with several, JAX's preemption
  service has caught it since jax.distributed started. Leaving the outermost context forgets a
  SIGTERM that no safe point has acted on.
  """
  global _listeners
  install = (_listeners == 0 and jax.process_count() == 1
             and threading.current_thread() is threading.main_thread())
  previous = signal.signal(signal.SIGTERM, _on_sigterm) if install else None
  _listeners += 1
  try:
    yield
  finally:
    _listeners -= 1
    if install:
      signal.signal(signal.SIGTERM, previous)
    if _listeners == 0:
      _received.clear()


def reached(step: int = 0) -> bool:
  """Whether to stop here; the same answer on every process (all must call this alike).

  A training loop passes its step: orbax's saves tell the sync manager that step too, and
  the counter the manager sees must never go down.
  """
  global _asked
  if jax.process_count() == 1:
    return _received.is_set()
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  _asked = max(_asked + 1, step)  # increasing over the whole process, across stages
  return multihost_utils.reached_preemption_sync_point(_asked)


def check(what: str) -> None:
  """Raises Preempted, naming `what` stopped, when `reached()`."""
  if reached():
    raise Preempted(f"{what} stopped on SIGTERM")
