"""Progress of a long merge: a bar on a terminal, a log line every so often otherwise (batch jobs, CI logs)."""

import sys
import time
from typing import TextIO


class Progress:
    """Counts finished steps of one phase out of ``total``."""

    def __init__(self, label: str, total: int, *, stream: TextIO = sys.stderr, interval: float = 10.0) -> None:
        self._label, self._total, self._stream, self._interval = label, total, stream, interval
        self._done = 0
        self._start = self._last_line = time.monotonic()
        self._tty = stream.isatty()

    def advance(self, detail: str) -> None:
        self._done += 1
        now = time.monotonic()
        if self._tty:
            filled = round(30 * self._done / self._total)
            bar = "#" * filled + "." * (30 - filled)
            self._stream.write(f"\r{self._label} [{bar}] {self._done}/{self._total} {detail[:60]:<60}")
            if self._done == self._total:
                self._stream.write("\n")
        elif now - self._last_line >= self._interval or self._done == self._total:
            self._stream.write(
                f"{self._label}: {self._done}/{self._total} done in {now - self._start:.1f} s (last: {detail})\n"
            )
            self._last_line = now
        self._stream.flush()
