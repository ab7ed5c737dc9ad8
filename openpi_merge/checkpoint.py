"""Orbax checkpoint I/O in openpi's layout: finding a finished input, reading metadata and arrays, writing params and
assets. Committing the written step dir is ``commit``'s.

openpi training writes ``<checkpoint_dir>/<step>/`` holding ``params/`` (an Orbax PyTree checkpoint whose single
top-level key is ``params``), ``train_state/``, ``assets/<asset_id>/`` and ``_CHECKPOINT_METADATA``. Serving reads
only ``params/`` and ``assets/``, which is what a merged step dir holds.
"""

import dataclasses
import os
import pathlib
import re
import shutil
import stat
from collections.abc import Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from openpi_merge import errors, objectstore_commit, plan, sharding, storage
from openpi_merge.openpi_layout import ASSETS_DIR, PARAMS_KEY, VALUE_SUFFIX

_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt")
# An Orbax save that did not finish: orbax-checkpoint 0.11.x names it <name>.orbax-checkpoint-tmp-<N>, 0.12 and later
# <name>.orbax-checkpoint-tmp. On object storage it is a prefix without commit_success.txt (see ``storage``).
_UNFINISHED = re.compile(r"\.orbax-checkpoint-tmp(-\d+)?$")


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


def _refuse_unfinished(path: storage.AnyPath, role: str) -> None:
    if _UNFINISHED.search(path.name):
        raise errors.InputError(
            f"{role} {path} is an unfinished Orbax save (a run that did not finish writing it): pick a finished step "
            "dir, or let that run finish"
        )


def locate_input(path: str, *, role: str = "input") -> Source:
    """Resolves a training step dir (holding ``params/``) or a bare Orbax params dir, local or on object storage;
    ``role`` names it in errors.

    Raises InputError for a missing path or bucket, an unfinished Orbax save, or a dir that is no Orbax checkpoint.
    """
    root = storage.resolve(path)
    if not storage.is_remote(root):
        return _locate(root, role)
    # Object storage: a missing bucket and an unfinished save (no commit marker) are told apart from other mistakes.
    try:
        if not storage.bucket_exists(root):
            raise errors.InputError(
                f"{role} bucket {storage.bucket(root)} does not exist (or these credentials cannot see it)"
            )
        source = _locate(root, role)
        finished = objectstore_commit.is_finished(source.params_dir)
    except objectstore_commit.STORAGE_ERRORS as e:
        raise errors.InputError(f"cannot read {role} {root}: {storage.reason(e)}") from e
    if not finished:
        raise errors.InputError(
            f"{role} {source.params_dir} is an unfinished save (no {storage.COMMIT_FILE}, and no commit time in its "
            "Orbax metadata): pick a finished step, or upload the whole step dir again"
        )
    return source


def _locate(root: storage.AnyPath, role: str) -> Source:
    if not root.exists():
        raise errors.InputError(f"{role} {root} does not exist")
    _refuse_unfinished(root, role)
    if not root.is_dir():
        raise errors.InputError(f"{role} {root} is not a directory: pass a training step dir or an Orbax params dir")
    if (root / PARAMS_KEY).is_dir():
        assets = root / ASSETS_DIR
        return Source(root=root, params_dir=root / PARAMS_KEY, assets_dir=assets if assets.is_dir() else None)
    for child in root.iterdir():
        if child.name.startswith(PARAMS_KEY):
            _refuse_unfinished(child, role)
    if any((root / marker).exists() for marker in _ORBAX_MARKERS):
        return Source(root=root, params_dir=root, assets_dir=None)
    if steps := sorted((p.name for p in root.iterdir() if p.name.isdigit() and p.is_dir()), key=int):
        raise errors.InputError(
            f"{role} {root} holds training steps {', '.join(steps)}: pass one, e.g. {root / steps[-1]}"
        )
    if unfinished := sorted(p.name for p in root.iterdir() if _UNFINISHED.search(p.name)):
        raise errors.InputError(
            f"{role} {root} holds only unfinished Orbax saves ({', '.join(unfinished)}): let the run finish"
        )
    raise errors.InputError(f"{role} {root} is not an Orbax checkpoint: it has no params/ dir and no Orbax metadata")


def _checkpointer(checkpointer_options: dict | None = None, **handler_options) -> ocp.Checkpointer:
    # openpi writes with orbax-checkpoint 0.11.13's defaults (OCDBT, zarr v2); newer releases must write the same.
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=False, **handler_options)
    return ocp.Checkpointer(handler, **(checkpointer_options or {}))


# TensorStore names an array by its key in the OCDBT database, e.g. "params.PaliGemma.llm.embedder.value/.zarray".
_ARRAY_KEY = re.compile(r"\b(params(?:\.[\w-]+)+)/")
_REPR = re.compile(r"(TensorStore|Spec)\(\{.*?\}\)")


def unreadable(params_dir: storage.AnyPath, error: Exception, at: plan.Path | None = None) -> errors.InputError:
    """A read failure as one line: the parameter it hit (``at``, or where the text names one), and no TensorStore
    spec dumps."""
    text = str(error).strip()
    reason = _REPR.sub(r"\1(...)", text.splitlines()[0]) if text else type(error).__name__
    where = f" at parameter {'/'.join(at)}" if at else ""
    if not at and (match := _ARRAY_KEY.search(text)):
        parts = match[1].split(".")[1:]
        where = f" at parameter {'/'.join(parts[:-1] if parts[-1] == VALUE_SUFFIX else parts)}"
    return errors.InputError(f"cannot read checkpoint {params_dir}{where} (truncated or corrupt?): {reason[:300]}")


def _metadata_tree(params_dir: storage.AnyPath) -> dict:
    try:
        with _checkpointer() as checkpointer:
            metadata = checkpointer.metadata(params_dir)
    except Exception as e:  # Orbax and tensorstore raise many types for a damaged checkpoint.
        raise unreadable(params_dir, e) from e
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
        raise unreadable(params_dir, e) from e
    flat = traverse_util.flatten_dict(restored[PARAMS_KEY])
    return {path[:-1] if contents.value_suffix else path: array for path, array in flat.items()}


def save(
    params_dir: storage.AnyPath,
    params: dict[plan.Path, object],
    *,
    value_suffix: bool,
    type_handler_registry: ocp.type_handlers.TypeHandlerRegistry | None = None,
    options: dict | None = None,
) -> None:
    """Writes ``params`` as openpi does: one top-level ``params`` key, with the input's ``value`` convention.

    Leaves are jax.Arrays, or any type ``type_handler_registry`` has a handler for (see ``writer``); ``options``:
    extra ``ocp.Checkpointer`` arguments (the committer's ``save_options``).
    """
    handler_options = {} if type_handler_registry is None else {"type_handler_registry": type_handler_registry}
    with _checkpointer(options, **handler_options) as checkpointer:
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
    committed: bool,
) -> None:
    """Re-reads a written checkpoint; raises NumericsError unless it holds exactly ``leaves``, bit-identical to
    ``merged`` (the written arrays, a dict at a time: one group after another). ``committed``: whether Orbax's
    Checkpointer may read it (see ``restore``)."""
    contents = read_contents(params_dir)
    if contents.value_suffix != value_suffix or contents.leaves != {leaf.path: leaf for leaf in leaves}:
        raise errors.NumericsError(f"{params_dir} does not hold the tree that was written")
    for params in merged:
        for path, array in restore(params_dir, contents, layout, paths=params, committed=committed).items():
            if not _same_bits(array, params[path]):
                raise errors.NumericsError(f"{params_dir}: {'/'.join(path)} reads back different from what was written")


def copy_assets(source: Source, step_dir: storage.AnyPath) -> list[str]:
    """Copies ``assets/`` (norm stats that serving needs) byte for byte, regular files and dirs only; returns the
    asset ids carried (the dirs in it, as ``assets/<asset_id>/`` names them), [] for an input without ``assets/``.

    Raises InputError for a symlink or special file inside it: a link could point anywhere on the machine (a file,
    a whole repo), and the merge reads nothing outside its input.
    """
    if source.assets_dir is None:
        return []
    if storage.is_remote(source.assets_dir) or storage.is_remote(step_dir):  # Object storage has no links.
        storage.copy_tree(source.assets_dir, step_dir / ASSETS_DIR)
        return sorted({name.split("/")[0] for name in storage.files(source.assets_dir) if "/" in name})
    refuse_links(source.assets_dir, "assets/ must hold regular files only")
    shutil.copytree(source.assets_dir, step_dir / ASSETS_DIR, symlinks=True)
    return sorted(p.name for p in source.assets_dir.iterdir() if p.is_dir())


def refuse_links(root: pathlib.Path, rule: str) -> None:
    """Raises InputError naming the first symbolic link or special file under ``root`` (``rule`` says why not)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = pathlib.Path(dirpath, name)
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise errors.InputError(
                    f"{path} is a symbolic link: {rule}; replace the link by a copy of what it points to"
                )
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise errors.InputError(f"{path} is not a regular file: {rule}")


def resolve_output(output: str, source: Source, role: str = "output") -> storage.AnyPath:
    """Resolves the output step dir (``role``: or an export's, named so); raises OutputError if it lies inside,
    contains or is the input."""
    if storage.is_remote(output):
        return _resolve_remote_output(storage.resolve(output), source)
    target = pathlib.Path(output).expanduser().resolve()
    if storage.is_remote(source.root):
        return target
    if target == source.root or source.root in target.parents:
        raise errors.OutputError(f"{role} {target} lies inside the input {source.root}: write it elsewhere")
    if target in source.root.parents:
        raise errors.OutputError(f"{role} {target} contains the input {source.root}: write it elsewhere")
    if target.exists() and os.path.samefile(target, source.root):  # A bind mount of the input, say.
        raise errors.OutputError(f"{role} {target} is the input {source.root} under another name: write elsewhere")
    return target


def _resolve_remote_output(target: storage.AnyPath, source: Source) -> storage.AnyPath:
    """resolve_output for an output on object storage: overlap compared as path strings."""
    root, out = str(source.root), str(target)
    if out == root or out.startswith(root + "/"):
        raise errors.OutputError(f"output {target} lies inside the input {source.root}: write it elsewhere")
    if root.startswith(out + "/"):
        raise errors.OutputError(f"output {target} contains the input {source.root}: write it elsewhere")
    return target
