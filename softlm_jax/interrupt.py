"""Ctrl-C that stops a training loop at the next step boundary instead of inside a step.

Python delivers SIGINT as a KeyboardInterrupt wherever the main thread happens to be: inside a
jitted step whose input state is donated (the state is then gone), inside an orbax save (a partial
step folder), or in a C call that returns only much later. :class:`StopRequest` replaces that, for
the duration of a ``with`` block (or between :meth:`StopRequest.install` and ``uninstall``), by a
flag the loop reads after each step: the loop saves where it is, says so and raises
KeyboardInterrupt itself. A second Ctrl-C raises KeyboardInterrupt at once.

A process then still spends 10 s (tiny model, load ~17 on 2 cores) to minutes tearing the
interpreter down (garbage-collecting jax/XLA objects), after everything is saved: a command-line
entry point ends with :func:`exit_interrupted` instead, which skips that teardown.
"""
from __future__ import annotations

import os
import signal
import sys
import threading


class StopRequest:
  """Context manager: ``requested`` turns True at the first SIGINT; the second raises KeyboardInterrupt.

  Installed only in the main thread and only over Python's default SIGINT handler (a handler the
  caller set is left alone; so is an ignored SIGINT). ``message`` is printed to stderr at the first
  Ctrl-C."""

  def __init__(self, message: str = "stopping after the current step (Ctrl-C again to quit at once)"):
    self.message = message
    self.requested = False
    self._old = None

  def install(self) -> "StopRequest":
    """Takes over SIGINT (see the class docstring); returns self."""
    if threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler:
      self._old = signal.signal(signal.SIGINT, self._handle)
    return self

  def uninstall(self) -> None:
    """Gives SIGINT back to the handler it replaced (Python's KeyboardInterrupt)."""
    if self._old is not None:
      signal.signal(signal.SIGINT, self._old)
      self._old = None

  def _handle(self, signum, frame):
    if self.requested or self._old is None:
      raise KeyboardInterrupt("second Ctrl-C" if self.requested else "")
    self.requested = True
    print(f"\n[interrupt] {self.message}", file=sys.stderr, flush=True)

  def __enter__(self) -> "StopRequest":
    return self.install()

  def __exit__(self, *exc) -> bool:
    self.uninstall()
    return False


def exit_interrupted(code: int = 130) -> None:
  """Ends the process at once with ``code`` (130: the shell's code for SIGINT), after flushing stdout
  and stderr, without the interpreter's teardown. Only for a command-line entry point, after a
  KeyboardInterrupt, when everything worth keeping is saved (training checkpoints are written
  synchronously, :func:`softlm_jax.train.save_checkpoint`)."""
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # noqa: BLE001 - a closed stream must not keep the process alive
      pass
  os._exit(code)
