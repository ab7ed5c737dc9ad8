"""JAX's persistent compilation cache: later merges load their programs, outputs stay bit-identical, donation holds.

Compiles are counted inside the merge's own process through JAX's monitoring events (a program XLA compiled is a
backend-compile event that was not a cache hit); timings are not asserted.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from helpers import REPO, restore_flat

from openpi_merge import compile_cache

# Runs the CLI as `python -m openpi_merge` does, counting XLA compiles and cache hits into $COUNTS at exit.
_COUNTING_CLI = """
import atexit, json, os, pathlib, sys
from jax._src import monitoring
counts = {"compiles": 0, "cache_hits": 0}
def on_event(event, *args, **kwargs):
    if event == "/jax/compilation_cache/cache_hits":
        counts["cache_hits"] += 1
def on_duration(event, *args, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        counts["compiles"] += 1
monitoring.register_event_listener(on_event)
monitoring.register_event_duration_secs_listener(on_duration)
def write():
    counts["compiles"] -= counts["cache_hits"]  # A hit is timed as a backend compile too.
    pathlib.Path(os.environ["COUNTS"]).write_text(json.dumps(counts))
atexit.register(write)
from openpi_merge.__main__ import cli
sys.argv[0] = "openpi-merge"
cli()
"""

# Donates an input that lives in host memory JAX does not own (as Orbax's restored arrays do), jitted with the
# persistent cache at argv[1], and reports whether the program wrote into that host memory.
_DONATION_PROBE = """
import json, sys
import jax, numpy as np
jax.config.update("jax_enable_compilation_cache", True)
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
from jax._src import monitoring
events = []
monitoring.register_event_listener(lambda event, *a, **k: events.append(event))
host = np.zeros(4096 + 16, np.float32)
start = (-host.ctypes.data) % 64 // 4  # 64-byte aligned: JAX's CPU client then wraps it without copying.
view = host[start:start + 4096]
x = jax.device_put(view, jax.devices()[0])
zero_copy = x.unsafe_buffer_pointer() == view.ctypes.data
y = jax.jit(lambda a: a + 1, donate_argnums=0)(x).block_until_ready()
print(json.dumps({
    "cache_hit": "/jax/compilation_cache/cache_hits" in events,
    "zero_copy": bool(zero_copy),
    "donated": x.is_deleted(),
    "host_written": bool(view.any()),
    "output_in_host_memory": y.unsafe_buffer_pointer() == view.ctypes.data,
    "correct": bool((np.asarray(y) == 1).all()),
}))
"""

SAFE = compile_cache.donation_survives()
_GATE = f"jaxlib {compile_cache.FIRST_SAFE_JAXLIB} and later keep donation in cached executables"


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_ENABLE_COMPILATION_CACHE", "OPENPI_MERGE_TEST_HOOK"):
        env.pop(name, None)
    return env


def _merge(step: pathlib.Path, out: pathlib.Path, cache: str, counts: pathlib.Path, **env: str):
    args = [f"--config.input={step}", f"--config.output={out}", f"--config.compilation_cache={cache}"]
    result = subprocess.run(
        [sys.executable, "-c", _COUNTING_CLI, "--config=configs/pi0_lora.py", *args, "--config.progress=False"],
        cwd=REPO,
        env=_env(COUNTS=str(counts), **env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return result, json.loads(counts.read_text())


def _entries(cache: pathlib.Path) -> set[str]:
    return {p.name for p in cache.iterdir() if not p.name.startswith(".")} if cache.exists() else set()


def _assert_same_output(first: pathlib.Path, second: pathlib.Path) -> None:
    manifest = "openpi_merge_manifest.json"
    assert json.loads((first / manifest).read_text()) == json.loads((second / manifest).read_text())
    one, two = restore_flat(first / "params"), restore_flat(second / "params")
    assert one.keys() == two.keys()
    assert all(one[p].dtype == two[p].dtype and one[p].tobytes() == two[p].tobytes() for p in one)


def test_a_second_merge_loads_every_program_from_the_per_user_cache_and_writes_the_same_bits(tiny_checkpoint, tmp_path):
    # One process: no program donates, so the cache is on under every jaxlib, openpi's pin included.
    step, cache, user = (
        tiny_checkpoint("pi0"),
        tmp_path / "xdg" / "openpi-merge" / "jax",
        {"XDG_CACHE_HOME": str(tmp_path / "xdg")},
    )

    _, first = _merge(step, tmp_path / "first", "", tmp_path / "first.json", **user)
    written = _entries(cache)
    _, second = _merge(step, tmp_path / "second", "", tmp_path / "second.json", **user)

    assert first["compiles"] > 0
    assert len(written) >= first["compiles"], (first, written)
    assert second == {"compiles": 0, "cache_hits": first["compiles"]}
    assert _entries(cache) == written
    _assert_same_output(tmp_path / "first", tmp_path / "second")


# Calls compile_cache.enable as a run of argv[2] ("one" or "several") processes would, with the cache at argv[1] and a
# user's own JAX_COMPILATION_CACHE_DIR in the environment, then compiles a program; reports the cache's state.
_ENABLE_PROBE = """
import json, sys
import jax
from openpi_merge import compile_cache
compile_cache.enable(sys.argv[1], donates=sys.argv[2] == "several")
from jax._src import monitoring
events = []
monitoring.register_event_listener(lambda event, *a, **k: events.append(event))
jax.jit(lambda a: a * 3)(jax.numpy.arange(4.0)).block_until_ready()
try:
    compile_cache.check_donation_safe()
    safe = True
except RuntimeError:
    safe = False
print(json.dumps({"on": bool(jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir),
                  "donation_safe": safe}))
"""


def _enable(cache: pathlib.Path, processes: str, users_cache: pathlib.Path) -> dict:
    probe = subprocess.run(
        [sys.executable, "-c", _ENABLE_PROBE, str(cache), processes],
        env=_env(JAX_COMPILATION_CACHE_DIR=str(users_cache)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert probe.returncode == 0, probe.stderr
    return json.loads(probe.stdout.splitlines()[-1])


@pytest.mark.skipif(SAFE, reason=f"the cache is on for every run on this jaxlib: {_GATE}")
def test_where_cached_programs_lose_donation_a_multi_process_run_keeps_the_cache_off_even_when_jax_is_told_to_use_it(
    tmp_path,
):
    several = _enable(tmp_path / "cache", "several", tmp_path / "users-cache")
    one = _enable(tmp_path / "cache-one", "one", tmp_path / "users-cache-one")

    assert several == {"on": False, "donation_safe": True}
    assert not _entries(tmp_path / "cache")
    assert not _entries(tmp_path / "users-cache")
    assert one == {"on": True, "donation_safe": False}  # One process: on, and a donating program would be refused.
    assert _entries(tmp_path / "cache-one")


def test_a_multi_process_run_uses_the_cache_where_cached_programs_keep_donation(tmp_path):
    several = _enable(tmp_path / "cache", "several", tmp_path / "users-cache")
    assert several == {"on": SAFE, "donation_safe": True}
    assert bool(_entries(tmp_path / "cache")) == SAFE


def test_a_program_loaded_from_the_cache_donates_as_the_gate_says(tmp_path):
    """On a jaxlib the gate passes, a cached donating program copies a host-backed input as a fresh one does; on one
    it fails (jaxlib 0.5.3), the cached program writes its output into host memory JAX does not own: the bug."""
    runs = []
    for _ in range(2):
        probe = subprocess.run(
            [sys.executable, "-c", _DONATION_PROBE, str(tmp_path / "cache")],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert probe.returncode == 0, probe.stderr
        runs.append(json.loads(probe.stdout.splitlines()[-1]))
    fresh, cached = runs

    assert not fresh["cache_hit"]
    assert cached["cache_hit"]
    assert fresh["zero_copy"], "the probe's input must be host memory JAX does not own"
    assert cached["zero_copy"], "the probe's input must be host memory JAX does not own"
    assert fresh["donated"]
    assert not fresh["host_written"]
    assert not fresh["output_in_host_memory"]
    assert fresh["correct"]
    assert cached["donated"]
    assert cached["correct"]
    assert cached["host_written"] == cached["output_in_host_memory"] == (not SAFE), cached


def test_the_gate_opens_at_the_first_jaxlib_measured_good():
    assert not compile_cache.donation_survives("0.5.3")
    assert compile_cache.donation_survives("0.6.0")
    assert compile_cache.donation_survives("0.6.1.dev20250501")
    assert compile_cache.donation_survives("0.10.2")


def test_an_unwritable_cache_dir_still_merges_with_one_line_saying_so(tiny_checkpoint, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a dir")  # A dir cannot be made under a file, even by root.

    result, counts = _merge(tiny_checkpoint("pi0"), tmp_path / "out", str(blocker / "jax"), tmp_path / "counts.json")

    lines = [line for line in result.stderr.splitlines() if "compilation cache" in line]
    assert len(lines) == 1, result.stderr
    assert str(blocker / "jax") in lines[0]
    assert "compiling afresh" in lines[0]
    assert counts["compiles"] > 0
    assert counts["cache_hits"] == 0
    assert (tmp_path / "out" / "params").is_dir()


def test_none_turns_the_cache_off(tiny_checkpoint, tmp_path):
    user = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    result, counts = _merge(tiny_checkpoint("pi0"), tmp_path / "out", "none", tmp_path / "counts.json", **user)
    assert counts["compiles"] > 0
    assert counts["cache_hits"] == 0
    assert not _entries(tmp_path / "xdg" / "openpi-merge" / "jax")
    assert "compilation cache" not in result.stderr
