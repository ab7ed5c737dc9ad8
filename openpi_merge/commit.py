"""Committing a step dir so that no instant of a run, SIGKILL included, loses a complete checkpoint at the output,
and two runs for one output never meet.

Names, for an output ``P/T``; all hidden and beside ``T``, so every rename stays within one filesystem:

* ``P/.T.openpi-merge.lock``: the lock file. A live run holds an exclusive ``flock`` on it, which the kernel drops
  when the process ends, however it ends; the run writes its pid, host and start time into it for others to name.
* ``P/.T.openpi-merge-staging-<token>``: where a run writes the new step dir. Hidden and named as staging, so it never
  passes for a finished checkpoint; once its run has ended it is garbage.
* ``P/.T.openpi-merge-previous``: the old output while a two-rename swap has it out of the way (fallback swap only).

States of one run R for output T (``claim``, then ``Claim.stage``, then ``Claim.commit``):

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
import hashlib
import os
import pathlib
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from openpi_merge import errors, objectstore_commit, storage
from openpi_merge.openpi_layout import MANIFEST_FILE, PARAMS_KEY, PROVENANCE_FILE

_LOCK = ".openpi-merge.lock"
_STAGING = ".openpi-merge-staging-"
_PREVIOUS = ".openpi-merge-previous"
_LEGACY_STAGING = ".openpi-merge-tmp-"  # Staging dirs of releases before the lock: removed like ours.
_SCRATCH = ".openpi-merge-orbax"  # scratch_target's suffix.
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


_NAME_MAX = 255  # Bytes in one path component on Linux filesystems.
_TOKEN = re.compile(r"[0-9a-f]{8}")  # distributed.shared_token()


def hidden_stem(target: pathlib.Path) -> str:
    """``.<name>`` for the hidden names beside ``target``; a name too long to take a suffix is cut and tagged with a
    hash of the whole name, so every name stays within a path component's 255 bytes and stays unique to ``target``."""
    room = _NAME_MAX - max(len(suffix) for suffix in (_LOCK, _PREVIOUS, _STAGING + "0" * 8, _LEGACY_STAGING))
    encoded = os.fsencode(target.name)
    if 1 + len(encoded) <= room:
        return f".{target.name}"
    tag = hashlib.sha256(encoded).hexdigest()[:8]
    return "." + os.fsdecode(encoded[: room - 10]).encode("utf-8", "ignore").decode() + "~" + tag


def _hidden(target: pathlib.Path, suffix: str) -> pathlib.Path:
    return target.parent / f"{hidden_stem(target)}{suffix}"


def hidden_names(target: pathlib.Path) -> tuple[str, ...]:
    """The names this protocol may give entries beside ``target`` (the staging ones as prefixes)."""
    stem = hidden_stem(target)
    return (*(stem + suffix for suffix in (_LOCK, _PREVIOUS, _STAGING, _LEGACY_STAGING)), "." + stem + _SCRATCH)


def scratch_target(beside: pathlib.Path) -> pathlib.Path:
    """A hidden output beside ``beside`` (an export dir) for a run that writes exports but no Orbax output: its
    Orbax params are claimed and staged there like an output's and never committed, so the claim removes them
    (and the next run for ``beside``, a killed run's)."""
    return _hidden(beside, _SCRATCH)


def _stale_staging(target: pathlib.Path) -> list[pathlib.Path]:
    """The staging dirs of ``target``'s earlier runs, matched literally: a name is never a glob pattern (an output
    named ``ckpt[1]`` must not match ``ckpt1``'s), and only ``<stem><staging suffix><token>`` counts."""
    stem = hidden_stem(target)
    stale = []
    for entry in target.parent.iterdir():
        for suffix in (_STAGING, _LEGACY_STAGING):
            rest = entry.name.removeprefix(stem + suffix)
            if rest != entry.name and (_TOKEN.fullmatch(rest) or suffix == _LEGACY_STAGING):
                stale.append(entry)
    return stale


def _remove_stale(path: pathlib.Path) -> str | None:
    """Removes a dir that a killed or finished run left; returns what could not be removed (nothing depends on it)."""
    failed: list[tuple[str, BaseException]] = []
    shutil.rmtree(path, onerror=lambda _, name, info: failed.append((name, info[1])))  # onexc: Python 3.12 and later
    if not failed:
        return None
    name, error = failed[0]
    return f"could not remove {path} ({name}: {getattr(error, 'strerror', None) or error}): remove it by hand"


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
    """A run's exclusive hold on one output: the local committer (``committer``'s interface), moved through the
    module docstring's states by ``claim`` (1, 5), ``stage`` (2) and ``commit`` (3, 4)."""

    target: pathlib.Path
    overwrite: bool
    notes: list[str]  # What the claim repaired and the commit left, for the summary.
    _fd: int | None  # The locked lock file; None in processes other than the one that commits.
    barrier: Callable[[str], None] = lambda name: None
    role: str = "output"  # What the target is, in messages: "output", or an export's field.
    staging: pathlib.Path | None = None  # Set by stage().
    committed: bool = False
    # The staged params dir is a finished Orbax save (Orbax renamed its own tmp dir inside the staging dir), so
    # Orbax's Checkpointer restores it before the commit.
    staged_readable_by_orbax: bool = True
    save_options: dict = dataclasses.field(default_factory=dict)  # Extra ocp.Checkpointer arguments: none here.

    @property
    def primary(self) -> bool:
        return self._fd is not None

    @property
    def lock_path(self) -> pathlib.Path:
        return _hidden(self.target, _LOCK)

    def staging_path(self, token: str) -> pathlib.Path:
        return _hidden(self.target, _STAGING + token)

    def refuse_existing(self) -> None:
        if self.target.exists() and not self.overwrite:
            raise errors.OutputError(
                f"{self.role} {self.target} already exists: remove it or pass --config.overwrite=True"
            )

    def stage(self, token: str) -> pathlib.Path:
        """State 2: makes the staging dir (process 0) and returns it once every process may write into it.

        Raises EnvironmentFaultError if the filesystem refuses.
        """
        staging = self.staging_path(token)
        if self.primary:
            try:
                staging.mkdir()
            except OSError as e:
                raise errors.os_fault(e, staging.parent, "cannot create a staging dir in") from e
        self.staging = staging
        self.barrier("staging-ready")
        test_point("staging-ready" if self.role == "output" else f"{self.role}-staging-ready")
        return staging

    def commit(self, stop: Callable[[], None] = lambda: None) -> None:
        """States 3 and 4, once every process has written: ``stop`` is called last before the commit, so an
        interrupt that it raises commits nothing. Raises OutputError for an output that appeared meanwhile,
        EnvironmentFaultError if the filesystem refuses."""
        assert self.staging is not None, "stage() first"
        stop()
        self.barrier("staging-written")
        if self.primary:
            test_point("before-commit")
            stop()
            try:
                fsync_tree(self.staging)
            except OSError as e:
                raise errors.os_fault(e, self.staging, "cannot flush") from e
            self.refuse_existing()
            if note := _commit(self.staging, self.target):
                self.notes.append(note)
        self.committed = True
        self.barrier("committed")

    def write_fault(self, error: BaseException) -> errors.MergeError | None:
        """A failure while writing the staged step, as an environment fault naming the output's dir, if it is one."""
        return errors.environment_fault(error, self.target.parent, "cannot write the output in")


def _holder(lock_path: pathlib.Path) -> str:
    try:
        text = lock_path.read_text().strip()
    except OSError:
        text = ""
    return f"another openpi-merge run ({text})" if text else "another openpi-merge run"


def _lock(target: pathlib.Path, role: str) -> int:
    """Opens and locks ``target``'s lock file; raises OutputError if a live run holds it."""
    lock_path = _hidden(target, _LOCK)
    import fcntl  # POSIX only; imported here so the rest of the package still imports elsewhere.

    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise errors.OutputError(
                f"{role} {target} is being written by {_holder(lock_path)}: wait for it to finish or choose "
                f"another {role}"
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
            notes.append(_remove_stale(previous))
        else:
            os.replace(previous, target)
            fsync_dir(target.parent)
            notes.append(f"restored {target} from {previous.name}, left by a run killed while committing")
    notes += [_remove_stale(stale) for stale in _stale_staging(target)]  # No live run owns one: we hold the lock.
    return [note for note in notes if note]


def _is_checkpoint(path: pathlib.Path) -> bool:
    """Whether ``path`` is a dir that ``overwrite`` may replace: an openpi step (``params/``), ours, or empty."""
    if (path / PARAMS_KEY).is_dir() or any((path / name).is_file() for name in (PROVENANCE_FILE, MANIFEST_FILE)):
        return True
    return next(path.iterdir(), None) is None


def _refuse_unusable(target: pathlib.Path, overwrite: bool, role: str = "output") -> None:
    """Raises OutputError when ``target`` cannot be written or replaced: a non-directory above it; anything at it
    without ``overwrite``; a non-directory or a directory that is no checkpoint at it (``overwrite`` replaces
    checkpoints only)."""
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise errors.OutputError(
                    f"{role} {target} lies under {parent}, which is a file, not a directory: choose another {role}"
                )
            break
    if not target.exists():
        return
    if not overwrite:
        raise errors.OutputError(f"{role} {target} already exists: remove it or pass --config.overwrite=True")
    if not target.is_dir():
        raise errors.OutputError(f"{role} {target} exists and is not a directory: remove it or write elsewhere")
    if not _is_checkpoint(target):
        raise errors.OutputError(
            f"{role} {target} is a directory that holds no checkpoint (no params/ dir, no openpi-merge files): "
            "overwrite replaces checkpoints only; choose another output or remove it yourself"
        )


def _check_space(target: pathlib.Path, needed_bytes: int, role: str) -> None:
    need = int(needed_bytes * _SPACE_MARGIN) + _SPACE_SLACK
    free = shutil.disk_usage(target.parent).free
    if free < need:
        raise errors.EnvironmentFaultError(
            f"not enough free space for {role} {target}: the merge writes about {needed_bytes / 1e9:.3g} GB and "
            f"needs {need / 1e9:.3g} GB with margin, {free / 1e9:.3g} GB are free there: free space or write elsewhere"
        )


@contextlib.contextmanager
def claim(
    target: pathlib.Path,
    *,
    overwrite: bool,
    needed_bytes: int,
    primary: bool = True,
    barrier: Callable[[str], None] = lambda name: None,
    role: str = "output",
) -> Iterator[Claim]:
    """Holds the output's lock for the block (module docstring, states 1 and 5); a staging dir that the block made
    and did not commit is removed when it ends. ``primary``: this process commits; other processes of a
    multi-process job get a Claim without a lock, for the staging dir's name; ``barrier`` waits for all of them.
    ``role`` names the target in messages (an export's field)."""
    if not primary:
        yield Claim(target, overwrite, [], None, barrier, role)
        return
    _refuse_unusable(target, overwrite, role)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = _lock(target, role)
    except OSError as e:
        raise errors.os_fault(e, target.parent, "cannot write in the output's directory") from e
    held = Claim(target, overwrite, [], fd, barrier, role)
    try:
        try:
            _write_holder(fd)
            held.notes += _repair(target)
        except OSError as e:
            raise errors.os_fault(e, target.parent, "cannot prepare the output beside") from e
        _refuse_unusable(target, overwrite, role)
        if target.exists() and os.path.ismount(target):  # Renaming a mount point fails with EBUSY at the commit.
            raise errors.EnvironmentFaultError(
                f"{role} {target} is a mount point and cannot be replaced: write into a directory inside it instead"
            )
        _check_space(target, needed_bytes, role)
        yield held
    finally:
        if held.staging is not None and not held.committed:
            remove_settled(held.staging)
        with contextlib.suppress(OSError):
            os.unlink(held.lock_path)
        os.close(fd)


def _commit(staging: pathlib.Path, target: pathlib.Path) -> str | None:
    """State 4 of the module docstring; returns a note if the old output could not be removed. Raises
    EnvironmentFaultError if the filesystem refuses a rename."""
    parent = target.parent
    try:
        if not target.exists():
            os.rename(staging, target)
            fsync_dir(parent)
            return None
        if _exchange(staging, target):
            fsync_dir(parent)
            test_point("after-exchange")
            return _remove_stale(staging)  # Now the old output; the next claim retries what is left.
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
        return _remove_stale(previous)
    except OSError as e:
        raise errors.os_fault(e, target, "cannot replace output") from e


class Committer(Protocol):
    """What the merge needs of an output's commit protocol, local (``Claim``) or on object storage
    (``objectstore_commit.Claim``); ``claim_output`` picks one for the target, once."""

    target: storage.AnyPath
    notes: list[str]  # Repairs and leftovers worth telling the user.
    staged_readable_by_orbax: bool  # Whether Orbax's Checkpointer restores the staged params before the commit.
    save_options: dict  # Extra ``ocp.Checkpointer`` arguments for the save into the staged params dir.

    def stage(self, token: str) -> storage.AnyPath: ...

    def commit(self, stop: Callable[[], None] = ...) -> None: ...

    def write_fault(self, error: BaseException) -> errors.MergeError | None: ...


def claim_output(
    target: storage.AnyPath, *, overwrite: bool, needed_bytes: int, primary: bool, barrier: Callable[[str], None]
) -> contextlib.AbstractContextManager[Committer]:
    """The output's committer, held for the block: this module's protocol for a local dir, ``objectstore_commit``'s
    for a bucket prefix. Raises OutputError or EnvironmentFaultError as those do."""
    if storage.is_remote(target):
        return objectstore_commit.claim(target, overwrite=overwrite, primary=primary)
    return claim(target, overwrite=overwrite, needed_bytes=needed_bytes, primary=primary, barrier=barrier)
