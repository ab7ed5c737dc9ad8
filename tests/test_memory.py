"""The program's start: restarted once with glibc's malloc on transparent huge pages (memory.restart_with_huge_pages);
and malloc's free memory handed back to the OS (memory.release_free).

Real processes: each scenario runs a small program that imports openpi_merge.__main__ the way the console script
does, prints a line per start, and reports its environment and how much of a large touched malloc buffer the kernel
backs with huge pages (/proc/self/smaps_rollup).
"""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO

from openpi_merge import memory

_PROGRAM = """
import ctypes, json, os, pathlib, sys
print("start", os.getpid(), flush=True)
sys.argv[0] = {argv0!r}
import openpi_merge.__main__
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
buffer = libc.malloc(256 * 2**20)  # 256 MiB from malloc itself (numpy asks for huge pages on its own), touched
ctypes.memset(buffer, 1, 256 * 2**20)
rollup = pathlib.Path("/proc/self/smaps_rollup").read_text()
huge = next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("AnonHugePages:")) * 1024
print(json.dumps({{"pid": os.getpid(), "tunables": os.environ.get("GLIBC_TUNABLES"), "huge_bytes": huge}}))
"""


def _run(argv0: str, tunables: str | None) -> tuple[list[str], dict]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {"PYTHONPATH": str(REPO)}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    program = _PROGRAM.format(argv0=argv0)
    done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    return [line for line in lines if line.startswith("start")], json.loads(lines[-1])


def _huge_pages_can_help() -> bool:
    saved = os.environ.pop("GLIBC_TUNABLES", None)
    try:
        return memory.huge_pages_would_help()
    finally:
        if saved is not None:
            os.environ["GLIBC_TUNABLES"] = saved


needs_huge_pages = pytest.mark.skipif(
    not _huge_pages_can_help(), reason="needs Linux, glibc 2.35+ and transparent huge pages in madvise mode"
)


@needs_huge_pages
def test_the_program_restarts_once_in_place_with_malloc_on_huge_pages():
    starts, seen = _run("openpi-merge", None)
    assert len(starts) == 2, starts  # Restarted exactly once...
    assert starts[0] == starts[1] == f"start {seen['pid']}"  # ...as the same process.
    assert seen["tunables"] == "glibc.malloc.hugetlb=1"
    assert seen["huge_bytes"] >= 128 * 2**20  # Most of the 256 MiB buffer is on 2 MiB pages.


@needs_huge_pages
def test_the_restart_keeps_the_users_other_glibc_tunables():
    starts, seen = _run("openpi-merge", "glibc.malloc.arena_max=4")
    assert len(starts) == 2
    assert seen["tunables"] == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"


@needs_huge_pages
def test_glibc_tunables_hugetlb_0_keeps_the_program_from_restarting():
    starts, seen = _run("openpi-merge", "glibc.malloc.hugetlb=0")
    assert len(starts) == 1
    assert seen["tunables"] == "glibc.malloc.hugetlb=0"
    assert seen["huge_bytes"] < 128 * 2**20


@needs_huge_pages
def test_a_program_that_imports_the_cli_module_is_not_restarted():
    starts, seen = _run("some-other-program", None)
    assert len(starts) == 1
    assert seen["tunables"] is None


# Frees all but the last of 256 malloc'd MiB (each touched; under the mmap threshold set here, so from the heap, and
# the live last one keeps the heap's top from being trimmed on free), then reports RSS before and after release_free.
_TRIM_PROGRAM = """
import ctypes, json, pathlib
from openpi_merge import memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD: a MiB block comes from the heap.
libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: free() alone trims nothing.
def rss():
    line = next(l for l in pathlib.Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS"))
    return int(line.split()[1]) * 1024
blocks = [libc.malloc(1 << 20) for _ in range(257)]
for block in blocks:
    ctypes.memset(block, 1, 1 << 20)
for block in blocks[:-1]:
    libc.free(block)
before = rss()
memory.release_free()
print(json.dumps({"before": before, "after": rss()}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc_trim")
def test_release_free_hands_freed_heap_memory_back_to_the_os():
    env = {**os.environ, "PYTHONPATH": str(REPO), "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    result = subprocess.run([sys.executable, "-c", _TRIM_PROGRAM], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rss = json.loads(result.stdout.splitlines()[-1])
    assert rss["before"] - rss["after"] > 200 << 20, rss  # Of the 256 MiB freed, held resident until trimmed.
