"""How much memory a run may use, and how much it did: the ``memory_budget_gb=auto`` budget and peak RSS.

``limit_arenas`` is called once at start, before any thread exists: glibc gives each thread that contends for malloc
an arena of its own (up to 8 per core), and TensorStore's and XLA's worker threads then keep freed chunk buffers in
arenas where later buffers cannot reuse them. On a streamed merge of a 263 MB checkpoint that cost 180 MB of peak RSS.
"""

import contextlib
import ctypes
import ctypes.util
import os
import pathlib
import resource

GB = 1e9
_AUTO_SHARE = 0.5  # memory_budget_gb=auto: this share of the memory available when the run starts...
_AUTO_CAP = 4 * 10**9  # ...at most this: beyond a few blocks in flight, more memory buys no speed (README, Scale).
_M_ARENA_MAX = -8  # glibc's mallopt parameter number.
_ARENAS = 2


def limit_arenas() -> None:
    """Caps glibc's malloc arenas (module docstring); a no-op off glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # Not glibc (musl, macOS): nothing to cap.
        ctypes.CDLL(name).mallopt(_M_ARENA_MAX, _ARENAS)


def _cgroup_free() -> int | None:
    """Bytes the cgroup (v2, then v1) still lets this process use, if it is limited."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = pathlib.Path(limit_file).read_text().strip()
            usage = int(pathlib.Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # v1 reports "no limit" as a huge number, v2 as "max".
            return max(0, int(limit) - usage)
    return None


def available_bytes() -> int:
    """Memory this run can use: the smaller of the kernel's MemAvailable and what the cgroup leaves."""
    meminfo = pathlib.Path("/proc/meminfo")
    candidates = []
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    if (free := _cgroup_free()) is not None:
        candidates.append(free)
    if not candidates:  # Not Linux: the physical memory.
        candidates.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return min(candidates)


def auto_budget() -> tuple[int, str]:
    """The budget of ``memory_budget_gb=auto``, and how it was derived."""
    available = available_bytes()
    budget = min(int(available * _AUTO_SHARE), _AUTO_CAP)
    return budget, f"auto: {available / GB:.3g} GB available"


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far: Linux's VmHWM. (``getrusage``'s ru_maxrss would do off Linux,
    but on Linux it carries over the parent's peak through fork and exec, so a run started by a large process
    would report that process's memory.)"""
    status = pathlib.Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Kilobytes on Linux, bytes on macOS.
