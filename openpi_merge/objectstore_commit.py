"""Committing a merged step on object storage (``gs://``), where nothing can be renamed into place.

Locally a step dir is written beside its target and renamed over it. A bucket has no rename (a "move" is a copy of
every object), so the output follows Orbax's own object-storage protocol: files go straight into the final prefix and
``commit_success.txt`` is written last. The readers that matter decide by that marker alone: Orbax's
``Checkpointer.restore`` (and so openpi's ``restore_params``) refuses a ``gs://`` params dir without
``params/commit_success.txt`` ("Found incomplete checkpoint"); Orbax's ``CheckpointManager`` lists a step only with
``<step>/commit_success.txt``; openpi-merge reads a ``gs://`` input only with the former.

Names, for an output prefix ``T`` (e.g. ``gs://bucket/run/29999``):

- ``T/.openpi-merge-unfinished``: the claim, written before anything else and removed after the markers. It marks the
  prefix as an unfinished merger output, which a later run may remove; its content is the run's token.
- ``T/params/commit_success.txt`` then ``T/commit_success.txt``: the markers, written when everything else is there.
  Orbax's own params marker is diverted to ``T/.openpi-merge-orbax-commit/`` (``DeferredCommit``), which
  is removed before the markers are written.
- ``<parent>/.<name>.openpi-merge-tmp-<token>``: a staging prefix, used only to overwrite a finished ``T``.

What a reader sees of ``T``, state by state:

1. Absent or empty, claimed (claim only), then written (claim, params objects, assets): not a finished checkpoint
   for any reader. A run that fails here with an error from the merge removes ``T``'s objects; a run killed here, or
   one whose storage failed, leaves them, claimed, and the next run for ``T`` removes them before it starts.
2. ``T/params/commit_success.txt`` written: params complete and restorable, assets complete too (copied before).
3. ``T/commit_success.txt`` written: finished for every reader. Then the claim and nothing else is removed.

``overwrite=False`` refuses a ``T`` that holds either marker, and a non-empty ``T`` without a claim (objects no
merger run wrote: "output prefix not empty"). ``overwrite=True`` on a ``T`` without a marker removes what is there
and writes as above. ``overwrite=True`` on a finished ``T`` never touches it until the new checkpoint is complete:

4. The new step is written into the staging prefix ``S`` as in 1-3 (``S`` ends finished, markers and all). Until
   then ``T`` is the old finished checkpoint, untouched; a failure or kill here leaves it so.
5. Swap: ``T`` is claimed, its step marker then its params marker are deleted (from here ``T`` is unfinished for every
   reader, never a mix accepted as finished), its other objects deleted, ``S``'s objects copied into ``T`` server
   side, ``T``'s markers written, its claim removed, ``S`` removed. A run killed during the swap leaves ``T``
   unfinished and the complete new checkpoint at ``S`` (a failed swap names ``S`` in its error). The next run for
   ``T`` first finishes that swap from ``S`` (``T`` is then the complete checkpoint the killed run wrote, and ``S``
   is removed only after that), then goes on as above: a complete copy is never deleted before another is.

Concurrent runs for one ``T`` are not excluded. A bucket has create-only writes (generation preconditions) but no
lock that is released when its holder dies: exclusion would need leases renewed while the run lives, and a killed
run's lease would then block reruns until it expires. What is checked: at commit the claim must still hold this run's
token, so a run whose prefix another run has since claimed (and cleaned) refuses to commit. Two runs started at once
for the same output can still interleave their objects; schedule one job per output.

Multi-host: every process writes its own shards into the same prefix; process 0 alone inspects, claims, cleans,
copies assets (caller), commits and swaps, between barriers. Which prefix to write into is process 0's decision,
broadcast to the others.
"""

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from openpi_merge import distributed, errors, storage
from openpi_merge.openpi_layout import PARAMS_KEY

CLAIM = ".openpi-merge-unfinished"
_PARAMS_MARKER = f"{PARAMS_KEY}/{storage.COMMIT_FILE}"
_MARKERS = (_PARAMS_MARKER, storage.COMMIT_FILE)  # Written in this order, deleted in the reverse.
_STAGING = ".openpi-merge-tmp-"
# The errors storage clients raise for a missing bucket, a refused permission or a dead connection (gcsfs: OSError
# subclasses; tensorstore through Orbax: ValueError; both wrapped by Orbax's async machinery: RuntimeError).
STORAGE_ERRORS = (OSError, ValueError, RuntimeError, TimeoutError)


# Where Orbax writes its commit marker instead, so that the merger writes the real one last (``DeferredCommit``).
ORBAX_COMMIT_DIR = ".openpi-merge-orbax-commit"


class DeferredCommit(ocp.path.atomicity.CommitFileTemporaryPath):
    """Orbax's object-storage save (files straight into the final prefix), minus two things, for two reasons.

    1. orbax-checkpoint 0.11.13 (openpi's pin) fails to save to gs:// at all: right after its ``mkdir`` (which makes
       nothing on GCS) it writes ``_CHECKPOINT_METADATA`` through a check that the dir exists, which stays false until
       an object is written (google/orbax#1652, fixed in 0.11.14). That early write only records a start timestamp; with
       no metadata store given here, Orbax skips it and its commit-timestamp update, and still writes the step metadata
       after the arrays, when the prefix exists. The least invasive fix: one constructor argument, Orbax's own
       extension point (``Checkpointer(temporary_path_class=...)``), no patched Orbax code. The output lacks only
       ``init_timestamp_nsecs``/``commit_timestamp_nsecs`` in ``_CHECKPOINT_METADATA``, which no reader needs.
    2. Orbax writes ``commit_success.txt`` into the params dir as soon as its save ends, which would make ``params/``
       restorable before ``assets/`` is copied. Its marker goes to a side prefix (``ORBAX_COMMIT_DIR``) instead, and
       ``Claim.commit`` writes the real one when the whole step is complete.
    """

    @classmethod
    def from_final(cls, final_path: epath.Path, **kwargs) -> "DeferredCommit":
        kwargs["checkpoint_metadata_store"] = None
        return cls(final_path, final_path.parent / ORBAX_COMMIT_DIR, **kwargs)


@dataclasses.dataclass(frozen=True)
class TargetState:
    """What is under an output prefix: its object names, relative to it."""

    names: tuple[str, ...]

    @property
    def finished(self) -> bool:
        return any(marker in self.names for marker in _MARKERS)

    @property
    def claimed(self) -> bool:
        return CLAIM in self.names


def read_state(target: epath.Path) -> TargetState:
    return TargetState(names=tuple(storage.objects(target)))


def is_finished(params_dir: epath.Path) -> bool:
    """Whether a params dir on object storage is a finished Orbax save: saved there by Orbax, or uploaded.

    Orbax saving to a bucket writes into the final prefix, in this order (orbax-checkpoint 0.11.13 and 0.12,
    ``Checkpointer.save``): ``_CHECKPOINT_METADATA`` with ``commit_timestamp_nsecs: null``, the per-process OCDBT
    databases, ``_METADATA``, the root ``manifest.ocdbt`` (the merge of the per-process databases, one transaction),
    the commit timestamp, and ``commit_success.txt`` last. A checkpointer's step dir holds ``_CHECKPOINT_METADATA``,
    its ``params/`` item dir none. A local save copied up file by file (how openpi checkpoints reach buckets) has no
    ``commit_success.txt`` under orbax 0.11 (whose local saves commit by rename), but its commit timestamp is set:
    the rename came after it. So a params dir is finished when it holds Orbax's marker, or when its tree metadata,
    its root OCDBT manifest and a per-process database are there and the nearest ``_CHECKPOINT_METADATA`` (its
    own, else its step dir's) records a commit time: every interrupted save lacks one of those. Our own unfinished
    outputs carry a claim and are refused too.
    """
    if (params_dir / storage.COMMIT_FILE).exists():
        return True
    names = set(storage.objects(params_dir))
    if (params_dir.parent / CLAIM).exists() or not {"_METADATA", "manifest.ocdbt"} <= names:
        return False
    if not any(name.startswith("ocdbt.process_") and name.endswith("/manifest.ocdbt") for name in names):
        return False
    for metadata in (params_dir / "_CHECKPOINT_METADATA", params_dir.parent / "_CHECKPOINT_METADATA"):
        if metadata.exists():
            try:
                document = json.loads(metadata.read_text())
            except ValueError:
                return False
            return isinstance(document, dict) and isinstance(document.get("commit_timestamp_nsecs"), int)
    return False


def check_target(target: epath.Path, *, overwrite: bool) -> None:
    """Refuses an output prefix the merge must not write: bucket missing, finished (without overwrite), foreign."""
    try:
        if not storage.bucket_exists(target):
            raise errors.OutputError(
                f"output bucket {storage.bucket(target)} does not exist (or these credentials cannot see it): "
                "create it or fix output"
            )
        state = read_state(target)
    except STORAGE_ERRORS as e:
        raise errors.EnvironmentFaultError(f"cannot list output {target}: {storage.reason(e)}") from e
    if state.finished and not overwrite:
        raise errors.OutputError(
            f"output {target} already holds a finished checkpoint: pass --config.overwrite=True or choose another"
        )
    if state.names and not state.finished and not state.claimed and not overwrite:
        raise errors.OutputError(
            f"output prefix {target} is not empty: it holds {len(state.names)} objects that no openpi-merge run "
            f"wrote (e.g. {state.names[0]}); remove them, choose another output, or pass --config.overwrite=True"
        )


def _staging_prefixes(target: epath.Path) -> list[epath.Path]:
    """Staging prefixes of earlier runs for ``target`` (one level listing of its parent)."""
    stem = f".{target.name}{_STAGING}"
    return [p for p in target.parent.iterdir() if p.name.startswith(stem)] if target.parent.exists() else []


def _write_claim(prefix: epath.Path, token: str) -> None:
    (prefix / CLAIM).write_text(token)


def _commit_in_place(prefix: epath.Path, token: str) -> None:
    """States 2-3 for ``prefix``: the markers, then the claim removed. Refuses if another run claimed the prefix."""
    claim = prefix / CLAIM
    if not claim.exists() or claim.read_text() != token:
        raise errors.OutputError(
            f"output {prefix} was claimed by another openpi-merge run while this one wrote it: nothing committed; "
            "run one merge per output"
        )
    storage.remove(prefix / ORBAX_COMMIT_DIR)
    storage.write_marker(prefix / PARAMS_KEY)
    storage.write_marker(prefix)
    storage.remove(prefix, [CLAIM])


def _swap(staging: epath.Path, target: epath.Path, token: str) -> None:
    """State 5: replaces the finished ``target`` with the finished ``staging``; see the module docstring."""
    _write_claim(target, token)
    names = storage.objects(target)
    for marker in reversed(_MARKERS):  # Step marker first: from here no reader takes T as finished.
        storage.remove(target, [marker] if marker in names else [])
    storage.remove(target, [name for name in storage.objects(target) if name != CLAIM])
    storage.copy_objects(staging, target, [name for name in storage.objects(staging) if name not in (*_MARKERS, CLAIM)])
    _commit_in_place(target, token)
    storage.remove(staging)


def _finish_killed_swap(target: epath.Path, stale: list[epath.Path]) -> list[str]:
    """Under an unfinished ``target``: a finished staging prefix is a swap that a killed run did not finish (state 5);
    finishing it makes ``target`` that complete checkpoint again. Returns what it did, for the summary."""
    if read_state(target).finished:
        return []
    for prefix in stale:
        if read_state(prefix).finished:
            token = prefix.name.rsplit(_STAGING, 1)[-1]
            _swap(prefix, target, token)
            return [f"restored {target} from {prefix}, the complete checkpoint a run killed while replacing it wrote"]
    return []


def _prepare(target: epath.Path, token: str, *, overwrite: bool) -> tuple[bool, list[str]]:
    """Process 0: repairs and cleans what earlier runs left, claims the prefix to write; returns whether it is a
    staging one, and notes on what it repaired."""
    stale = _staging_prefixes(target)
    notes = _finish_killed_swap(target, stale)
    for prefix in _staging_prefixes(target):
        storage.remove(prefix)
    state = read_state(target)
    if state.finished and not overwrite:  # A swap finished just now: the output exists again.
        raise errors.OutputError(
            f"output {target} already holds a finished checkpoint ({notes[0] if notes else 'written meanwhile'}): "
            "pass --config.overwrite=True or choose another"
        )
    staged = state.finished  # check_target let it through: overwrite=True.
    if not staged and state.names:
        storage.remove(target)  # A killed run's claimed objects, or anything at all under overwrite=True.
    _write_claim(_staging_prefix(target, token) if staged else target, token)
    return staged, notes


def _agreed(flag: bool) -> bool:
    """Process 0's ``flag``, in every process."""
    return bool(ocp.multihost.broadcast_one_to_all(np.array(flag, np.int32)))


def _staging_prefix(target: epath.Path, token: str) -> epath.Path:
    return target.parent / f".{target.name}{_STAGING}{token}"


@dataclasses.dataclass
class Claim:
    """The object-storage committer (``committer``'s interface): ``claim`` checks ``T``, ``stage`` cleans and claims
    the prefix to write (states 1 and 4), ``commit`` writes the markers and swaps (states 2, 3, 5)."""

    target: epath.Path
    overwrite: bool
    notes: list[str] = dataclasses.field(default_factory=list)
    primary: bool = True
    staging: epath.Path | None = None
    committed: bool = False
    _token: str = ""
    _swap: bool = False
    # Orbax's Checkpointer refuses a bucket params dir without its commit marker, which comes last: before the
    # commit the staged params are read back through Orbax's handler instead.
    staged_readable_by_orbax: bool = False

    @property
    def save_options(self) -> dict:
        """Extra ``ocp.Checkpointer`` arguments for the save into the staged params dir: the deferred commit."""
        return {"temporary_path_class": DeferredCommit}

    def stage(self, token: str) -> epath.Path:
        """Returns the prefix to write the step into, once process 0 has cleaned and claimed it.

        Raises EnvironmentFaultError if the store fails, OutputError if a repair finished the output meanwhile.
        """
        try:
            staged, notes = _prepare(self.target, token, overwrite=self.overwrite) if self.primary else (False, [])
        except STORAGE_ERRORS as e:
            raise errors.EnvironmentFaultError(f"cannot prepare output {self.target}: {storage.reason(e)}") from e
        self.notes += notes
        self._swap, self._token = _agreed(staged), token
        self.staging = _staging_prefix(self.target, token) if self._swap else self.target
        distributed.barrier("objectstore-claimed")
        return self.staging

    def commit(self, stop: Callable[[], None] = lambda: None) -> None:
        """Commits the staged prefix (module docstring) once every process has written; ``stop`` is called last
        before it. Raises EnvironmentFaultError if the store fails."""
        assert self.staging is not None, "stage() first"
        stop()
        distributed.barrier("objectstore-written")
        if self.primary:
            stop()
            _commit(self.staging, self.target, self._token, swap=self._swap)
        self.committed = True
        distributed.barrier("objectstore-committed")

    def write_fault(self, error: BaseException) -> errors.MergeError | None:
        """A storage failure while writing the staged step, as one line naming ``target``."""
        if not isinstance(error, STORAGE_ERRORS):
            return None
        return errors.EnvironmentFaultError(
            f"writing {self.target} failed: {storage.reason(error)}; nothing was committed (the next run for this "
            "output removes what this one wrote)"
        )


@contextlib.contextmanager
def claim(target: epath.Path, *, overwrite: bool, primary: bool = True) -> Iterator[Claim]:
    """Holds ``target`` for the block: checks it first (``check_target``); a staged prefix that the block did not
    commit is removed when the block fails with an error of the merge (a kill leaves it, claimed, for the next run)."""
    if primary:
        check_target(target, overwrite=overwrite)
    held = Claim(target, overwrite, primary=primary)
    try:
        yield held
    except BaseException:
        if primary and held.staging is not None and not held.committed:  # The store answered until now: tidy up.
            with contextlib.suppress(*STORAGE_ERRORS):
                storage.remove(held.staging)
        raise


def _commit(prefix: epath.Path, target: epath.Path, token: str, *, swap: bool) -> None:
    """Process 0: commits ``prefix`` in place, then, if it is a staging prefix, swaps it into ``target``."""
    try:
        _commit_in_place(prefix, token)
    except STORAGE_ERRORS as e:
        raise errors.EnvironmentFaultError(
            f"committing {target} failed: {storage.reason(e)}; nothing was committed"
        ) from e
    if swap:
        try:
            _swap(prefix, target, token)
        except STORAGE_ERRORS as e:
            raise errors.EnvironmentFaultError(
                f"replacing {target} failed: {storage.reason(e)}; it is left unfinished and the complete new "
                f"checkpoint is at {prefix} (the next run for this output removes both and merges again)"
            ) from e
