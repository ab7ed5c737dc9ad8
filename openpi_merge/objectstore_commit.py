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
  Orbax's own params marker is diverted to ``T/.openpi-merge-orbax-commit/`` (``storage._DeferredCommit``), which
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
   unfinished and the complete new checkpoint at ``S`` (a failed swap names ``S`` in its error); the next run
   removes both and merges again.

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
from collections.abc import Iterator

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
    """Whether a params dir on object storage is a finished Orbax save (what Orbax's restore demands)."""
    return (params_dir / storage.COMMIT_FILE).exists()


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
    storage.remove(prefix / storage.ORBAX_COMMIT_DIR)
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


def _prepare(target: epath.Path, token: str) -> bool:
    """Process 0: cleans what earlier runs left, claims the prefix to write; returns whether it is a staging one."""
    for stale in _staging_prefixes(target):
        storage.remove(stale)
    state = read_state(target)
    staged = state.finished  # check_target let it through: overwrite=True.
    if not staged and state.names:
        storage.remove(target)  # A killed run's claimed objects, or anything at all under overwrite=True.
    _write_claim(_staging_prefix(target, token) if staged else target, token)
    return staged


def _agreed(flag: bool) -> bool:
    """Process 0's ``flag``, in every process."""
    return bool(ocp.multihost.broadcast_one_to_all(np.array(flag, np.int32)))


def _staging_prefix(target: epath.Path, token: str) -> epath.Path:
    return target.parent / f".{target.name}{_STAGING}{token}"


@contextlib.contextmanager
def staged(target: epath.Path, *, overwrite: bool) -> Iterator[epath.Path]:
    """Yields the prefix to write the step into; commits it (module docstring) only if the block exits cleanly.

    Storage failures inside the block become one ``EnvironmentFaultError`` (exit 7) naming ``target``; nothing is
    committed.
    """
    check_target(target, overwrite=overwrite)
    primary, token = distributed.is_primary(), distributed.shared_token()
    try:
        staged_flag = _prepare(target, token) if primary else False
    except STORAGE_ERRORS as e:
        raise errors.EnvironmentFaultError(f"cannot prepare output {target}: {storage.reason(e)}") from e
    staged_flag = _agreed(staged_flag)
    prefix = _staging_prefix(target, token) if staged_flag else target
    distributed.barrier("objectstore-claimed")
    try:
        yield prefix
        distributed.barrier("objectstore-written")
    except STORAGE_ERRORS as e:
        raise errors.EnvironmentFaultError(
            f"writing {target} failed: {storage.reason(e)}; nothing was committed (the next run for this output "
            "removes what this one wrote)"
        ) from e
    except BaseException:
        if primary:  # The store answered until now: tidy up. A kill leaves the claim for the next run instead.
            with contextlib.suppress(*STORAGE_ERRORS):
                storage.remove(prefix)
        raise
    if primary:
        _commit(prefix, target, token, swap=staged_flag)
    distributed.barrier("objectstore-committed")


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
