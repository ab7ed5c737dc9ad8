"""How much memory a run may use, and how much it did: the ``memory_budget_gb=auto`` budget and peak RSS; and how
glibc's malloc serves the run's large buffers.

``restart_with_huge_pages`` runs first of all, in the command-line program only: the fuse and TensorStore allocate
and free buffers of tens to hundreds of MB for every layer, which glibc maps afresh each time, so the kernel zeroes
and maps them 4 KiB page by page. On a full pi0 merge the kernel's share of the main and XLA threads, mostly those
page faults, took 19 of its 88 CPU seconds. Restarted with glibc's ``glibc.malloc.hugetlb=1`` tunable, malloc asks
for transparent huge pages (``madvise``), 2 MiB a fault: the merge took 4 s less wall time and 10 s less system
time. A tunable is read only when a process starts, hence the restart (``execv``: the same process id, arguments and
environment, plus the tunable). It is skipped where it cannot help (not Linux with glibc 2.35 or later, huge pages
off or already ``always``) and when ``GLIBC_TUNABLES`` already names the tunable: ``GLIBC_TUNABLES=
glibc.malloc.hugetlb=0`` turns it off.

``release_free`` trims malloc's free memory before the stream reads a slice over its budget (``stream``).

``limit_arenas`` is called once at start, before any thread exists: glibc gives each thread that contends for malloc
an arena of its own (up to 8 per core), and TensorStore's and XLA's worker threads then keep freed chunk buffers in
arenas where later buffers cannot reuse them. On a streamed merge of a 263 MB checkpoint that cost 180 MB of peak RSS.
"""

import contextlib
import ctypes
import ctypes.util
import functools
import os
import pathlib
import re
import resource
import sys

GB = 1e9  # The unit of memory_budget_gb and of every size the summary prints.
_AUTO_SHARE = 0.5  # memory_budget_gb=auto: this share of the memory available when the run starts...
_AUTO_CAP = 4 * 10**9  # ...at most this: beyond a few blocks in flight, more memory buys no speed (README, Scale).
_M_ARENA_MAX = -8  # glibc's mallopt parameter number.
_ARENAS = 2


_HUGETLB = "glibc.malloc.hugetlb"
_THP_MODE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _glibc_version() -> tuple[int, int] | None:
    with contextlib.suppress(ValueError, OSError, AttributeError):
        match = re.fullmatch(r"glibc (\d+)\.(\d+).*", os.confstr("CS_GNU_LIBC_VERSION") or "")
        if match:
            return int(match[1]), int(match[2])
    return None


def huge_pages_would_help() -> bool:
    """Whether ``restart_with_huge_pages`` would restart: glibc 2.35+, THP in ``madvise`` mode, tunable not set."""
    if sys.platform != "linux" or _HUGETLB in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if (_glibc_version() or (0, 0)) < (2, 35):
        return False
    try:
        return "[madvise]" in _THP_MODE.read_text()
    except OSError:
        return False


def restart_with_huge_pages() -> None:
    """Restarts this program with malloc on transparent huge pages (module docstring); returns if it does not."""
    if not huge_pages_would_help():
        return
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
    os.environ["GLIBC_TUNABLES"] = ":".join([*tunables, f"{_HUGETLB}=1"])
    with contextlib.suppress(OSError):  # Cannot exec (a frozen or embedded interpreter): run on without.
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, if it is found (``find_library`` runs ``ldconfig``: once per process)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def limit_arenas() -> None:
    """Caps glibc's malloc arenas (module docstring); a no-op off glibc."""
    libc = _libc()
    with contextlib.suppress(AttributeError):  # Not glibc (musl, macOS): nothing to cap.
        if libc is not None:
            libc.mallopt(_M_ARENA_MAX, _ARENAS)


def release_free() -> None:
    """Hands the memory malloc holds free back to the OS (glibc's ``malloc_trim``); a no-op off glibc.

    Freed buffers under malloc's mmap threshold (32 MiB at most) stay resident where they were, in the holes between
    live ones; on a full pi0 merge they were 0.5 GB of resident memory when its largest array was read.
    """
    libc = _libc()
    with contextlib.suppress(AttributeError):  # Not glibc: nothing to trim.
        if libc is not None:
            libc.malloc_trim(ctypes.c_size_t(0))


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
