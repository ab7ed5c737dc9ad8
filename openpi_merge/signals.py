"""SIGINT and SIGTERM as a flag that the merge reads at its step boundaries.

Raising from the handler instead would land the exception wherever the main thread happens to be: inside Orbax while
its threads still write (they then recreate what the cleanup removed), or inside a JAX callback that swallows it (and
the merge commits and exits 0). A flag stops the run only where nothing is in flight. This module imports nothing
heavy, so ``__main__`` installs the handlers before it imports JAX: a signal during start-up is kept, not lost.
"""

import signal

from openpi_merge import errors

_received: int | None = None


def _handle(signum: int, frame) -> None:
    global _received
    if _received is None:
        _received = signum


def install() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _handle)


def stop() -> None:
    """Raises InterruptError (exit 130 for SIGINT, 143 for SIGTERM) if a signal has arrived."""
    if _received is not None:
        name = signal.Signals(_received).name
        raise errors.InterruptError(_received, f"interrupted by {name}: nothing was committed")
