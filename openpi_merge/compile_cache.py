"""JAX's persistent compilation cache, so that a merge after the first loads its programs instead of compiling them.

Contract of ``enable(setting)``, called once per process before anything is compiled:

- ``setting`` is the ``compilation_cache`` config field: ``""`` (the default) caches in a per-user dir,
  ``$XDG_CACHE_HOME/openpi-merge/jax`` or else ``~/.cache/openpi-merge/jax``; a path caches there; ``none`` turns the
  cache off.
- When on, every program is cached however small or quick to compile: JAX's defaults skip programs that compile in
  under a second, which most of ours do, and they are most of a small merge's time (entries are about 14 kB each).
- ``donates`` says whether the run compiles programs that donate their inputs: only a multi-process merge does
  (``fuse.fuse_all`` writes each layer into its stacked kernel in place); one process streams through programs that
  donate nothing. Where JAX loses buffer donation in executables loaded from the cache (``donation_survives``), the
  cache is on only for runs that donate nothing, and off for those that do, whatever ``setting`` and JAX's own
  environment variables say. ``check_donation_safe`` raises before a donating program is built with the cache on
  where that is unsafe, should a future path forget this.
- It never fails a merge: a cache dir that cannot be created or written is reported in one line on stderr and the run
  compiles afresh.
- A cached program is the same executable XLA would compile, so outputs are bit-identical with and without the cache.
"""

import os
import pathlib
import sys
import tempfile

import jax
import jaxlib

OFF = "none"
# The first jaxlib whose executables loaded from the cache honour donation of host-backed inputs (see below).
FIRST_SAFE_JAXLIB = (0, 6, 0)


def default_dir() -> pathlib.Path:
    """``$XDG_CACHE_HOME/openpi-merge/jax``, else ``~/.cache/openpi-merge/jax`` (the XDG base-dir convention)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path("~/.cache").expanduser())
    return pathlib.Path(base) / "openpi-merge" / "jax"


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("."):
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def donation_survives(jaxlib_version: str | None = None) -> bool:
    """Whether executables this jaxlib loads from the persistent cache keep buffer donation intact.

    jaxlib 0.5.3 (openpi's pin) on CPU: an executable loaded from the cache that donates an input backed by host memory
    it does not own (Orbax restores arrays zero-copy from tensorstore's numpy buffers) writes its output into that host
    memory instead of copying it first, as the freshly compiled executable does; the host buffer is freed later and the
    merged kernel with it. Reproduced with jax/jaxlib 0.5.3 (bad) and 0.6.0, 0.6.2, 0.10.2 (good) by
    tests/test_compile_cache.py's donation probe; JAX's changelog and issue tracker name no fix for it, so the gate is
    the first release measured good. Not reproduced without the cache on any of them.
    """
    return _version(jaxlib_version or jaxlib.version.__version__) >= FIRST_SAFE_JAXLIB


def _resolve(setting: str) -> pathlib.Path | None:
    if setting.strip().lower() == OFF:
        return None
    return pathlib.Path(setting).expanduser() if setting.strip() else default_dir()


def _writable(directory: pathlib.Path) -> OSError | None:
    """None if a file can be created in ``directory`` (made if missing), else the error."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".openpi-merge-probe-"):
            pass
    except OSError as e:
        return e
    return None


def _switch_off() -> None:
    jax.config.update("jax_enable_compilation_cache", False)


def enable(setting: str, *, donates: bool) -> None:
    """Switches JAX's persistent compilation cache on or off for this process as ``setting``, ``donates`` and the
    gate say (module docstring)."""
    directory = _resolve(setting)
    if directory is None:
        _switch_off()
        return
    if donates and not donation_survives():
        # Also overrides a user's JAX_COMPILATION_CACHE_DIR: with it this jaxlib corrupts donated fuse outputs.
        _switch_off()
        return
    error = _writable(directory)
    if error is not None:
        _switch_off()
        reason = f"{directory} is not writable ({error.strerror or error}): compiling afresh"
        print(f"openpi-merge: compilation cache off: {reason}", file=sys.stderr)
        return
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # By default JAX caches only programs that took over a second to compile (most of ours take less), and a backend
    # may raise the minimum entry size (0 lets it); -1 caches entries of any size.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def check_donation_safe() -> None:
    """Raises RuntimeError (a bug, not a user's error) if a program that donates is about to be built while the
    cache is on under a jaxlib whose cached programs lose donation."""
    on = jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir
    if on and not donation_survives():
        raise RuntimeError(
            f"bug: a donating program under jaxlib {jaxlib.version.__version__} with the compilation cache on "
            "(compile_cache.enable was called with donates=False)"
        )
