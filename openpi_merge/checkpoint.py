"""Orbax checkpoint I/O in openpi's layout, and an output that appears only once it is complete.

openpi training writes ``<checkpoint_dir>/<step>/`` holding ``params/`` (an Orbax PyTree checkpoint whose single
top-level key is ``params``), ``train_state/``, ``assets/<asset_id>/`` and ``_CHECKPOINT_METADATA``. Serving reads
only ``params/`` and ``assets/``, which is what a merged step dir holds.
"""

import contextlib
import dataclasses
import os
import pathlib
import re
import shutil
from collections.abc import Iterable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from openpi_merge import distributed, errors, objectstore_commit, plan, sharding, storage

PARAMS_KEY = "params"
# nnx.State saves every parameter as {"value": array}; openpi's restore_params strips it only when every path has it.
VALUE_SUFFIX = "value"
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt")
_UNFINISHED = re.compile(r"\.orbax-checkpoint-tmp-\d+$")
_STAGING = ".openpi-merge-tmp-"


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the input checkpoint's parts are; ``assets_dir`` is None for a bare params dir."""

    root: storage.AnyPath  # The dir the user named: a step dir, or the params dir itself (gs://: a prefix).
    params_dir: storage.AnyPath
    assets_dir: storage.AnyPath | None


@dataclasses.dataclass(frozen=True)
class Contents:
    """The input's parameters as its metadata describes them."""

    leaves: dict[plan.Path, plan.Leaf]
    value_suffix: bool


def locate_input(path: str) -> Source:
    """Resolves a training step dir (holding ``params/``) or a bare Orbax params dir, local or on object storage."""
    root = storage.resolve(path)
    if not storage.is_remote(root):
        return _locate(root)
    # Object storage: a missing bucket and an unfinished save (no commit marker) are told apart from other mistakes.
    try:
        if not storage.bucket_exists(root):
            raise errors.InputError(
                f"input bucket {storage.bucket(root)} does not exist (or these credentials cannot see it)"
            )
        source = _locate(root)
        finished = objectstore_commit.is_finished(source.params_dir)
    except objectstore_commit.STORAGE_ERRORS as e:
        raise errors.InputError(f"cannot read input {root}: {storage.reason(e)}") from e
    if not finished:
        raise errors.InputError(
            f"input {source.params_dir} is an unfinished save (no {storage.COMMIT_FILE}): pick a finished step"
        )
    return source


def _locate(root: storage.AnyPath) -> Source:
    if not root.exists():
        raise errors.InputError(f"input {root} does not exist")
    if _UNFINISHED.search(root.name):
        raise errors.InputError(f"input {root} is an unfinished Orbax save: pick a finished step dir next to it")
    if not root.is_dir():
        raise errors.InputError(f"input {root} is not a directory: pass a training step dir or an Orbax params dir")
    if (root / PARAMS_KEY).is_dir():
        assets = root / "assets"
        return Source(root=root, params_dir=root / PARAMS_KEY, assets_dir=assets if assets.is_dir() else None)
    if any((root / marker).exists() for marker in _ORBAX_MARKERS):
        return Source(root=root, params_dir=root, assets_dir=None)
    if steps := sorted((p.name for p in root.iterdir() if p.name.isdigit() and p.is_dir()), key=int):
        raise errors.InputError(
            f"input {root} holds training steps {', '.join(steps)}: pass one, e.g. {root / steps[-1]}"
        )
    raise errors.InputError(f"input {root} is not an Orbax checkpoint: it has no params/ dir and no Orbax metadata")


def _checkpointer(checkpointer_options: dict | None = None, **handler_options) -> ocp.Checkpointer:
    # openpi writes with orbax-checkpoint 0.11.13's defaults (OCDBT, zarr v2); newer releases must write the same.
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=False, **handler_options)
    return ocp.Checkpointer(handler, **(checkpointer_options or {}))


def _unreadable(params_dir: storage.AnyPath, error: Exception) -> errors.InputError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return errors.InputError(f"cannot read checkpoint {params_dir} (truncated or corrupt?): {reason[:300]}")


def _metadata_tree(params_dir: storage.AnyPath) -> dict:
    try:
        with _checkpointer() as checkpointer:
            metadata = checkpointer.metadata(params_dir)
    except Exception as e:  # Orbax and tensorstore raise many types for a damaged checkpoint.
        raise _unreadable(params_dir, e) from e
    # orbax-checkpoint 0.11 returns the tree itself, later releases a StepMetadata holding it.
    tree = getattr(metadata, "item_metadata", metadata)
    if tree is None or not hasattr(tree, "keys"):  # Newer Orbax logs a damaged tree and returns None.
        raise errors.InputError(
            f"cannot read checkpoint {params_dir}: no readable PyTree metadata (truncated, corrupt, or not a PyTree)"
        )
    if list(tree.keys()) != [PARAMS_KEY]:
        raise errors.InputError(
            f"{params_dir} has top-level keys {list(tree.keys())}; openpi params have only 'params'"
        )
    return tree


def read_contents(params_dir: storage.AnyPath) -> Contents:
    """Reads shapes and dtypes of every parameter, no array data."""
    flat = traverse_util.flatten_dict(dict(_metadata_tree(params_dir)[PARAMS_KEY]))
    value_suffix = bool(flat) and all(path[-1] == VALUE_SUFFIX for path in flat)
    leaves = {}
    for path, meta in flat.items():
        path = path[:-1] if value_suffix else path
        if getattr(meta, "shape", None) is None or getattr(meta, "dtype", None) is None:
            raise errors.InputError(f"{params_dir}: parameter {'/'.join(path)} is not an array")
        leaves[path] = plan.Leaf(path=path, shape=tuple(meta.shape), dtype=np.dtype(meta.dtype))
    return Contents(leaves=leaves, value_suffix=value_suffix)


def _nested(params: dict[plan.Path, object], value_suffix: bool) -> dict:
    suffix = (VALUE_SUFFIX,) if value_suffix else ()
    return {PARAMS_KEY: traverse_util.unflatten_dict({path + suffix: v for path, v in params.items()})}


def restore(
    params_dir: storage.AnyPath,
    contents: Contents,
    layout: sharding.Layout,
    paths: Iterable[plan.Path] | None = None,
    *,
    committed: bool = True,
) -> dict[plan.Path, jax.Array]:
    """Restores the parameters at ``paths`` (default: all) in their stored dtype, placed as ``layout`` says.

    With a mesh over several processes, each process reads only the shards its devices hold. ``committed=False``
    reads a save not committed yet (the reload check on object storage, where the marker comes last).
    """
    leaves = contents.leaves if paths is None else {path: contents.leaves[path] for path in paths}
    item = _nested(leaves, contents.value_suffix)
    restore_args = _nested(
        {path: ocp.ArrayRestoreArgs(sharding=layout.sharding(leaf)) for path, leaf in leaves.items()},
        contents.value_suffix,
    )
    # Transforms (none) make Orbax restore the item's structure, a part of the tree: its partial restore in 0.11.13.
    partial = {} if paths is None else {"transforms": {}}
    try:
        with _checkpointer() as checkpointer:
            # Checkpointer.restore refuses an object-storage save without its commit marker; its handler does not.
            reader = checkpointer if committed else ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=False)
            restored = reader.restore(
                params_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, **partial)
            )
    except Exception as e:  # As in _metadata_tree: a damaged file surfaces as any of many exception types.
        raise _unreadable(params_dir, e) from e
    flat = traverse_util.flatten_dict(restored[PARAMS_KEY])
    return {path[:-1] if contents.value_suffix else path: array for path, array in flat.items()}


def save(
    params_dir: storage.AnyPath,
    params: dict[plan.Path, object],
    *,
    value_suffix: bool,
    type_handler_registry: ocp.type_handlers.TypeHandlerRegistry | None = None,
) -> None:
    """Writes ``params`` as openpi does: one top-level ``params`` key, with the input's ``value`` convention.

    Leaves are jax.Arrays, or any type ``type_handler_registry`` has a handler for (see ``stream``).
    """
    options = {} if type_handler_registry is None else {"type_handler_registry": type_handler_registry}
    with _checkpointer(storage.checkpointer_options(params_dir), **options) as checkpointer:
        checkpointer.save(params_dir, args=ocp.args.PyTreeSave(_nested(params, value_suffix)))


def _same_bits(got: jax.Array, want: jax.Array) -> bool:
    """Whether two arrays placed alike hold the same bits, compared shard by shard on this process's devices."""
    if (got.dtype, got.shape) != (want.dtype, want.shape):
        return False
    shards = [sorted(x.addressable_shards, key=lambda shard: shard.device.id) for x in (got, want)]
    return all(np.asarray(a.data).tobytes() == np.asarray(b.data).tobytes() for a, b in zip(*shards, strict=True))


def check_written(
    params_dir: storage.AnyPath,
    leaves: Iterable[plan.Leaf],
    merged: Iterable[dict[plan.Path, jax.Array]],
    *,
    value_suffix: bool,
    layout: sharding.Layout,
) -> None:
    """Re-reads a written checkpoint; raises NumericsError unless it holds exactly ``leaves``, bit-identical to
    ``merged`` (the written arrays, a dict at a time: the whole tree, or one streamed group after another)."""
    contents = read_contents(params_dir)
    if contents.value_suffix != value_suffix or contents.leaves != {leaf.path: leaf for leaf in leaves}:
        raise errors.NumericsError(f"{params_dir} does not hold the tree that was written")
    for params in merged:
        committed = not storage.is_remote(params_dir)
        for path, array in restore(params_dir, contents, layout, paths=params, committed=committed).items():
            if not _same_bits(array, params[path]):
                raise errors.NumericsError(f"{params_dir}: {'/'.join(path)} reads back different from what was written")


def copy_assets(source: Source, step_dir: storage.AnyPath) -> None:
    """Copies ``assets/`` (norm stats that serving needs) byte for byte; object by object if either is remote."""
    if source.assets_dir is None:
        return
    if storage.is_remote(source.assets_dir) or storage.is_remote(step_dir):
        storage.copy_tree(source.assets_dir, step_dir / "assets")
    else:
        shutil.copytree(source.assets_dir, step_dir / "assets")


def check_output(output: str, source: Source, *, overwrite: bool) -> storage.AnyPath:
    """Resolves the output step dir, refusing one that exists (unless overwrite) or that overlaps the input."""
    if storage.is_remote(output):
        return _check_remote_output(storage.resolve(output), source, overwrite=overwrite)
    target = pathlib.Path(output).expanduser().resolve()
    if target == source.root or source.root in target.parents:
        raise errors.OutputError(f"output {target} lies inside the input {source.root}: write it elsewhere")
    if target in source.root.parents:
        raise errors.OutputError(f"output {target} contains the input {source.root}: write it elsewhere")
    if target.exists() and not overwrite:
        raise errors.OutputError(f"output {target} already exists: remove it or pass --config.overwrite=True")
    if target.exists() and not target.is_dir():
        raise errors.OutputError(f"output {target} exists and is not a directory")
    return target


def _check_remote_output(target: storage.AnyPath, source: Source, *, overwrite: bool) -> storage.AnyPath:
    """check_output for an output on object storage: overlap compared as path strings."""
    root, out = str(source.root), str(target)
    if out == root or out.startswith(root + "/"):
        raise errors.OutputError(f"output {target} lies inside the input {source.root}: write it elsewhere")
    if root.startswith(out + "/"):
        raise errors.OutputError(f"output {target} contains the input {source.root}: write it elsewhere")
    objectstore_commit.check_target(target, overwrite=overwrite)
    return target


@contextlib.contextmanager
def staged_output(target: storage.AnyPath, *, overwrite: bool = False) -> Iterator[storage.AnyPath]:
    """Yields a hidden staging dir beside ``target`` that becomes ``target`` only if the block completes.

    A failed or interrupted run removes the staging dir; a killed one leaves a hidden ``.<name>.openpi-merge-tmp-*``
    dir, never anything at ``target``, and the next run for the same target removes it. In a multi-process run every
    process writes into the same staging dir and process 0 alone prepares, commits and removes it, between barriers.
    On object storage the commit is ``objectstore_commit.staged`` instead.
    """
    if storage.is_remote(target):
        with objectstore_commit.staged(target, overwrite=overwrite) as prefix:
            yield prefix
        return
    primary = distributed.is_primary()
    staging = target.parent / f".{target.name}{_STAGING}{distributed.shared_token()}"
    if primary:
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".{target.name}{_STAGING}*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir()
    distributed.barrier("staging-ready")
    try:
        yield staging
        distributed.barrier("staging-written")
        if primary:
            if target.exists():
                retired = staging.with_name(staging.name + "-old")
                os.replace(target, retired)
                os.replace(staging, target)
                shutil.rmtree(retired)
            else:
                os.replace(staging, target)
        distributed.barrier("committed")
    finally:
        if primary and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
