"""SIGINT and SIGTERM as a flag that the merge reads at its step boundaries.

Raising from the handler instead would land the exception wherever the main thread happens to be: inside Orbax while
its threads still write (they then recreate what the cleanup removed), or inside a JAX callback that swallows it (and
the merge commits and exits 0). A flag stops the run only where nothing is in flight. This module imports nothing
heavy, so ``__main__`` installs the handlers before it imports JAX: a signal during start-up is kept, not lost.
"""

import contextlib
import signal
from collections.abc import Iterator

import openpi_merge
from openpi_merge import errors

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: int | None = None


def _handle(signum: int, frame) -> None:
    global _received
    if _received is None:
        _received = signum


def install() -> None:
    """Sets the handlers, then unblocks the two signals: one that came while they were blocked (``held``, across the
    huge-pages restart) is delivered now, to the handler."""
    for signum in _SIGNALS:
        if signal.getsignal(signum) != signal.SIG_IGN:  # Ignored when the program started: left so (openpi_merge).
            signal.signal(signum, _handle)
    for signum in openpi_merge.early_signals[:1]:  # Came while the package's own early handler was in place.
        _handle(signum, None)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


def received() -> bool:
    return _received is not None


def hold() -> None:
    """Ignores the two signals from now on: once the run's outcome is decided, the process exits with its own code.
    Python resets the handlers it set to the kernel's default while it shuts down (and TensorStore's and XLA's
    threads take signals too, so blocking them in this thread would not do), which let a signal there kill a run
    that had committed; an ignored signal it leaves ignored."""
    for signum in _SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Blocks the two signals in this thread for the block (at start-up: the only thread). The mask survives
    ``execv``: a signal during the huge-pages restart stays pending until the restarted program's ``install``
    unblocks it, instead of meeting Python's default handler (a KeyboardInterrupt traceback) while the new
    interpreter starts."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


def stop() -> None:
    """Raises InterruptError (exit 130 for SIGINT, 143 for SIGTERM) if a signal has arrived."""
    if _received is not None:
        name = signal.Signals(_received).name
        raise errors.InterruptError(_received, f"interrupted by {name}: nothing was committed")
