"""Progress of a long merge on stderr: a bar on a terminal, a plain line every so often otherwise (batch jobs, CI logs).

``Progress`` counts the fuse's pairs, weighted by their bytes, with elapsed time and an ETA from the bytes done so far.
``PhaseTicker`` covers the phases that are one long library call (Orbax's restore and save, the reload check): it
shows the running phase and its elapsed time from a daemon thread; no ETA, since Orbax reports no progress of its own.
Nothing is printed with ``--config.progress=False``.
"""

import sys
import threading
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


class Progress:
    """Counts finished steps of one phase, each weighing ``weight`` (e.g. bytes) out of ``total``."""

    def __init__(
        self, label: str, total: float, *, stream: TextIO = sys.stderr, interval: float = 10.0, enabled: bool = True
    ) -> None:
        self._label, self._total, self._stream, self._interval = label, max(total, 1e-30), stream, interval
        self._enabled = enabled
        self._done = 0.0
        self._start = self._last_line = time.monotonic()
        self._tty = stream.isatty()

    def advance(self, detail: str, weight: float = 1.0) -> None:
        if not self._enabled:
            return
        self._done += weight
        now = time.monotonic()
        elapsed = now - self._start
        share = min(self._done / self._total, 1.0)
        finished = share >= 1.0
        eta = "" if finished else f", ETA {_duration(elapsed * (1 - share) / max(share, 1e-9))}"
        if self._tty:
            filled = round(30 * share)
            bar = "#" * filled + "." * (30 - filled)
            status = f"{share:4.0%} {_duration(elapsed)}{eta}"
            self._stream.write(f"\r{self._label} [{bar}] {status} {detail[:50]:<50}")
            if finished:
                self._stream.write("\n")
        elif now - self._last_line >= self._interval or finished:
            self._stream.write(f"{self._label}: {share:.0%} after {_duration(elapsed)}{eta} (last: {detail})\n")
            self._last_line = now
        self._stream.flush()


class PhaseTicker:
    """Shows the innermost running phase and its elapsed time while phases run (``push``/``pop``, from Stopwatch).

    Phases in ``quiet`` (the fuse, which has its own ``Progress``; the plan, which is quick) show nothing.
    """

    def __init__(
        self,
        *,
        stream: TextIO = sys.stderr,
        interval: float = 10.0,
        tty_interval: float = 0.5,
        quiet: tuple[str, ...] = ("plan", "fuse"),
    ) -> None:
        self._stream, self._quiet = stream, quiet
        self._tty = stream.isatty()
        self._interval = tty_interval if self._tty else interval
        self._min_elapsed = 1.0 if self._tty else interval  # Phases shorter than this show nothing.
        self._stack: list[tuple[str, float]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def push(self, name: str) -> None:
        with self._lock:
            self._stack.append((name, time.monotonic()))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="openpi-merge-progress", daemon=True)
                self._thread.start()

    def pop(self, name: str) -> None:
        with self._lock:
            if self._stack and self._stack[-1][0] == name:
                phase, start = self._stack.pop()
                if phase not in self._quiet and time.monotonic() - start >= self._min_elapsed:
                    self._line(f"{phase}: done in {_duration(time.monotonic() - start)}", final=True)
            if not self._stack:
                self._wake.set()

    def _line(self, text: str, *, final: bool = False) -> None:
        if self._tty:
            self._stream.write(f"\r{text:<70}" + ("\n" if final else ""))
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval)
            with self._lock:
                self._wake.clear()
                if not self._stack:
                    self._thread = None
                    return
                phase, start = self._stack[-1]
                if phase not in self._quiet and time.monotonic() - start >= self._min_elapsed:
                    self._line(f"{phase}: running for {_duration(time.monotonic() - start)}")
