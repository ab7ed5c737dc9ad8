"""Committing a step dir so that no instant of a run, SIGKILL included, loses a complete checkpoint at the output,
and two runs for one output never meet.

Names, for an output ``P/T``; all hidden and beside ``T``, so every rename stays within one filesystem:

* ``P/.T.openpi-merge.lock``: the lock file. A live run holds an exclusive ``flock`` on it, which the kernel drops
  when the process ends, however it ends; the run writes its pid, host and start time into it for others to name.
* ``P/.T.openpi-merge-staging-<token>``: where a run writes the new step dir. Hidden and named as staging, so it never
  passes for a finished checkpoint; once its run has ended it is garbage.
* ``P/.T.openpi-merge-previous``: the old output while a two-rename swap has it out of the way (fallback swap only).

States of one run R for output T (``claim``, then ``staged``, then the commit inside ``staged``):

1. Claim. R takes the lock without waiting; if another live run holds it, R stops with OutputError (exit 6) naming
   that run, having touched nothing. Under the lock R repairs what a killed run left: ``previous`` without a T is
   renamed back to T (the killed run never committed, so the old output is the right one to have); ``previous``
   beside a T is removed (its swap had finished); every ``staging-*`` dir is removed (no live run owns one: the lock
   says so). Then T is checked against ``overwrite`` and the free space against the planned bytes.
2. Stage. R makes its staging dir and writes the step into it. Killed here: T is untouched; the staging dir is
   garbage that the next claim removes.
3. Seal. Every file and dir in staging is fsynced, so what the rename publishes is on disk.
4. Commit, still under the lock, after T is checked against ``overwrite`` once more (a T that appeared meanwhile is
   refused, never replaced):

   * no T: ``rename(staging, T)``, then fsync P.
   * T exists: ``renameat2(staging, T, RENAME_EXCHANGE)`` swaps the two names in one step: T is the new output and
     staging holds the old one, which is then removed. Killed in between: T is complete and staging is garbage.
   * where the filesystem cannot exchange names (EINVAL, ENOSYS: some network and FUSE filesystems):
     ``rename(T, previous)``, fsync P, ``rename(staging, T)``, fsync P, remove ``previous``. Killed between the two
     renames: T is missing and ``previous`` holds the old output, complete; the next claim renames it back (1).

   A failure before the commit removes the staging dir, after waiting until no late write recreates it.
5. Release. R unlinks the lock file while still holding it, then closes it. A run that locked the unlinked file in
   the meantime sees that the path no longer names its file and starts over, so two runs never both hold the lock.

At every instant T is the old complete output, the new complete output, or missing with the old complete output in
``previous``, which the next run for T restores. A run on another host cannot see a local ``flock``: for outputs on
filesystems that several hosts mount, run one job per output (multi-process jobs lock from process 0).

Boundary functions raise OutputError (exit 6) for a busy, existing or overlapping output, and EnvironmentFaultError
(exit 7) when the filesystem refuses: no space, no permission, read-only, busy mount point.
"""

import contextlib
import ctypes
import dataclasses
import errno
import os
import pathlib
import shutil
import socket
import time
from collections.abc import Callable, Iterator

from openpi_merge import errors

_LOCK = ".openpi-merge.lock"
_STAGING = ".openpi-merge-staging-"
_PREVIOUS = ".openpi-merge-previous"
_LEGACY_STAGING = ".openpi-merge-tmp-"  # Staging dirs of releases before the lock: removed like ours.
# Beyond the planned array bytes: Orbax's metadata and OCDBT manifests, assets, and filesystem blocks.
_SPACE_MARGIN = 1.05
_SPACE_SLACK = 64 * 2**20
# Test-only: OPENPI_MERGE_TEST_HOOK=<point>:<action>[,<point>:<action>...] runs actions at named points of the
# protocol, so the tests can kill, signal or hold a real run at an exact instant (``test_point``). Unset in real runs.
_HOOK_ENV = "OPENPI_MERGE_TEST_HOOK"


def _hook_action(point: str) -> str | None:
    for entry in filter(None, os.environ.get(_HOOK_ENV, "").split(",")):
        name, _, action = entry.partition(":")
        if name == point:
            return action
    return None


def test_point(point: str) -> None:
    """Runs the test hook's action for ``point``, if any: ``kill`` (SIGKILL), ``term``, ``int`` (send that signal to
    this process), or ``wait:<file>`` (create ``<file>.reached``, then block until ``<file>`` exists, at most 120 s).
    """
    action = _hook_action(point)
    if action in ("kill", "term", "int"):
        import signal  # Only tests get here.

        os.kill(os.getpid(), {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}[action])
        time.sleep(1)  # Let the signal arrive: a Python handler runs at the next bytecode, SIGKILL never returns.
    elif action is not None and action.startswith("wait:"):
        gate = pathlib.Path(action.removeprefix("wait:"))
        gate.with_name(gate.name + ".reached").touch()
        deadline = time.monotonic() + 120
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.02)


def _hidden(target: pathlib.Path, suffix: str) -> pathlib.Path:
    return target.parent / f".{target.name}{suffix}"


def fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: pathlib.Path) -> None:
    """fsyncs every file and directory under ``root``, deepest first, and ``root`` itself."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(pathlib.Path(dirpath))


def remove_settled(path: pathlib.Path, *, quiet_s: float = 0.5, limit_s: float = 30.0) -> None:
    """Removes ``path`` and waits until it stays gone for ``quiet_s``: after a failed save, TensorStore threads that
    were still writing recreate the dirs they write into."""
    deadline = time.monotonic() + limit_s
    while True:
        shutil.rmtree(path, ignore_errors=True)
        quiet_until = time.monotonic() + quiet_s
        while time.monotonic() < quiet_until and not path.exists():
            time.sleep(0.05)
        if not path.exists() or time.monotonic() > deadline:
            return


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Swaps two paths atomically (Linux ``renameat2``); False where this system or filesystem cannot."""
    if _hook_action("swap") == "fallback":  # Test-only: take the two-rename path on a filesystem that can exchange.
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # Not glibc >= 2.28, or not Linux.
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


@dataclasses.dataclass
class Claim:
    """A run's exclusive hold on one output; see the module docstring for the states it moves through."""

    target: pathlib.Path
    overwrite: bool
    notes: list[str]  # What the claim repaired, for the summary.
    _fd: int | None  # The locked lock file; None in processes other than the one that commits.

    @property
    def lock_path(self) -> pathlib.Path:
        return _hidden(self.target, _LOCK)

    def staging_path(self, token: str) -> pathlib.Path:
        return _hidden(self.target, _STAGING + token)

    def refuse_existing(self) -> None:
        if self.target.exists() and not self.overwrite:
            raise errors.OutputError(f"output {self.target} already exists: remove it or pass --config.overwrite=True")


def _holder(lock_path: pathlib.Path) -> str:
    try:
        text = lock_path.read_text().strip()
    except OSError:
        text = ""
    return f"another openpi-merge run ({text})" if text else "another openpi-merge run"


def _lock(lock_path: pathlib.Path) -> int:
    """Opens and locks ``lock_path``; raises OutputError if a live run holds it."""
    import fcntl  # POSIX only; imported here so the rest of the package still imports elsewhere.

    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            target = lock_path.parent / lock_path.name.removeprefix(".").removesuffix(_LOCK)
            raise errors.OutputError(
                f"output {target} is being written by {_holder(lock_path)}: wait for it to finish or choose "
                "another output"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # The holder we waited for unlinked this file on release: lock the current one.


def _write_holder(fd: int) -> None:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode(), 0)


def _repair(target: pathlib.Path) -> list[str]:
    """Under the lock: undoes what killed runs left (module docstring, state 1); returns what it did."""
    notes = []
    previous = _hidden(target, _PREVIOUS)
    if previous.exists():
        if target.exists():
            shutil.rmtree(previous)
        else:
            os.replace(previous, target)
            fsync_dir(target.parent)
            notes.append(f"restored {target} from {previous.name}, left by a run killed while committing")
    for pattern in (_STAGING, _LEGACY_STAGING):
        for stale in target.parent.glob(f".{target.name}{pattern}*"):
            shutil.rmtree(stale)
    return notes


def _check_space(target: pathlib.Path, needed_bytes: int) -> None:
    need = int(needed_bytes * _SPACE_MARGIN) + _SPACE_SLACK
    free = shutil.disk_usage(target.parent).free
    if free < need:
        raise errors.EnvironmentFaultError(
            f"not enough free space for output {target}: the merge writes about {needed_bytes / 1e9:.3g} GB and "
            f"needs {need / 1e9:.3g} GB with margin, {free / 1e9:.3g} GB are free there: free space or write elsewhere"
        )


@contextlib.contextmanager
def claim(target: pathlib.Path, *, overwrite: bool, needed_bytes: int, primary: bool = True) -> Iterator[Claim]:
    """Holds the output's lock for the block (module docstring, states 1 and 5). ``primary``: this process commits;
    other processes of a multi-process job get a Claim without a lock, for the staging dir's name."""
    if not primary:
        yield Claim(target, overwrite, [], None)
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = _lock(_hidden(target, _LOCK))
    except OSError as e:
        raise errors.os_fault(e, target.parent, "cannot write in the output's directory") from e
    held = Claim(target, overwrite, [], fd)
    try:
        try:
            _write_holder(fd)
            held.notes += _repair(target)
        except OSError as e:
            raise errors.os_fault(e, target.parent, "cannot prepare the output beside") from e
        held.refuse_existing()
        if target.exists() and not target.is_dir():
            raise errors.OutputError(f"output {target} exists and is not a directory: remove it or write elsewhere")
        if target.exists() and os.path.ismount(target):  # Renaming a mount point fails with EBUSY at the commit.
            raise errors.EnvironmentFaultError(
                f"output {target} is a mount point and cannot be replaced: write into a directory inside it instead"
            )
        _check_space(target, needed_bytes)
        yield held
    finally:
        with contextlib.suppress(OSError):
            os.unlink(held.lock_path)
        os.close(fd)


@contextlib.contextmanager
def staged(
    held: Claim,
    token: str,
    *,
    barrier: Callable[[str], None] = lambda name: None,
    stop: Callable[[], None] = lambda: None,
) -> Iterator[pathlib.Path]:
    """Yields the staging dir (state 2); seals and commits it if the block completes (states 3 and 4), removes it
    if not. ``stop`` is called last before the commit: an interrupt that it raises commits nothing. In a
    multi-process job every process writes into it; ``barrier`` waits for all of them, and only the process that
    holds the lock makes, commits or removes it."""
    primary = held._fd is not None
    staging = held.staging_path(token)
    if primary:
        try:
            staging.mkdir()
        except OSError as e:
            raise errors.os_fault(e, staging.parent, "cannot create a staging dir in") from e
    barrier("staging-ready")
    committed = False
    try:
        test_point("staging-ready")
        yield staging
        stop()
        barrier("staging-written")
        if primary:
            test_point("before-commit")
            stop()
            try:
                fsync_tree(staging)
            except OSError as e:
                raise errors.os_fault(e, staging, "cannot flush") from e
            held.refuse_existing()
            _commit(staging, held.target)
        committed = True
        barrier("committed")
    finally:
        if primary and not committed:
            remove_settled(staging)


def _commit(staging: pathlib.Path, target: pathlib.Path) -> None:
    """State 4 of the module docstring; raises EnvironmentFaultError if the filesystem refuses a rename."""
    parent = target.parent
    try:
        if not target.exists():
            os.rename(staging, target)
            fsync_dir(parent)
            return
        if _exchange(staging, target):
            fsync_dir(parent)
            test_point("after-exchange")
            shutil.rmtree(staging, ignore_errors=True)  # Now the old output; the next claim removes what is left.
            return
        previous = _hidden(target, _PREVIOUS)
        os.rename(target, previous)
        fsync_dir(parent)
        test_point("after-retire")
        try:
            os.rename(staging, target)
        except OSError:
            os.rename(previous, target)  # Put the old output back before reporting.
            raise
        fsync_dir(parent)
        shutil.rmtree(previous, ignore_errors=True)
    except OSError as e:
        raise errors.os_fault(e, target, "cannot replace output") from e
