"""The one writer of a merged params dir: Orbax's own PyTree save of the output tree, whose leaves are placeholders
that this module fills, either a slice at a time (``slices``: one process streams) or a group at a time (``groups``:
several processes, each writing its shards).

Orbax writes everything but the array data (the tree metadata, the OCDBT database, the zarr metadata, the commit) as
for any tree. Its leaves are ``Placeholder``s, taken by ``_PlaceholderHandler``, a ``TypeHandler`` that presents
itself as Orbax's ``ArrayHandler`` (so the tree metadata names ``jax.Array``) and is never asked to read. When Orbax
asks it to write the placeholders, it hands the writing to its filler:

- ``slices`` (a context manager, Orbax's save in a thread of its own), in these states:
  opening: the handler opens each output array by the spec Orbax's ``ArrayHandler`` builds for an array written in
  pieces of ``OutputArray.write_shape`` (how Orbax stores an array sharded over its first axis: one zarr chunk per
  piece) and hands them to the block; open: the block writes every element of every array, in slices that cover
  whole pieces, while Orbax waits; finishing: leaving the block lets the handler return, Orbax completes its save
  and the block's exit returns once it has; aborted: an exception in the block (or in Orbax's thread) makes the
  handler raise, Orbax's save fails without committing, and the exit re-raises the first exception after Orbax's
  thread has ended.
- ``groups`` (a call, Orbax's save in this thread): for each group in order, the handler calls ``produce(group)``
  for the group's arrays (jax.Arrays placed on the job's mesh), hands them to a fresh ``ArrayHandler``, which writes
  this process's shards, and waits until that write is committed to the OCDBT database before the next group.

Everything on disk is Orbax's own; only the order in which leaves are produced differs from a whole-tree save. One
optional record of Orbax's is left out: its per-host array metadata (``array_metadatas/``; orbax 0.11.13's store
rewrites that file on every write call instead of adding to it), which Orbax reads checkpoints without, as it reads
those of its earlier releases; and, for ``slices``, the ``_sharding`` file, which only restores that pass no sharding
of their own consult (openpi's loader passes one).

Both raise what Orbax's save raises (OSError, ValueError, RuntimeError from TensorStore), or the filler's exception.
"""

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import math
import threading
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from openpi_merge import checkpoint, orbax_compat, plan, storage


@dataclasses.dataclass(frozen=True)
class OutputArray:
    """An output parameter: its shape and dtype, the pieces it is written in (a zarr chunk each, or finer), and for
    ``groups`` the group that produces it."""

    path: plan.Path
    shape: tuple[int, ...]
    dtype: np.dtype
    write_shape: tuple[int, ...] = ()
    group: int = 0


@dataclasses.dataclass(frozen=True)
class Placeholder:
    """An output leaf in the tree handed to Orbax's save."""

    array: OutputArray


class _PlaceholderHandler(ocp.type_handlers.TypeHandler):
    """Takes the placeholders that Orbax's save writes as arrays and hands them to the filler (module docstring)."""

    def __init__(self, fill) -> None:
        self._fill = fill

    def typestr(self) -> str:
        return orbax_compat.ARRAY_TYPESTR

    async def metadata(self, infos):
        raise NotImplementedError("placeholders are only written")

    async def deserialize(self, infos, args=None):
        raise NotImplementedError("placeholders are only written")

    async def serialize(self, values: Sequence[Placeholder], infos, args=None):
        await self._fill(values, infos, args or [ocp.SaveArgs()] * len(values))
        return []


def _save(
    params_dir: storage.AnyPath, arrays: Sequence[OutputArray], fill, *, value_suffix: bool, save_options: dict
) -> None:
    registry = ocp.type_handlers.create_type_handler_registry((Placeholder, _PlaceholderHandler(fill)))
    tree = {array.path: Placeholder(array) for array in arrays}
    checkpoint.save(params_dir, tree, value_suffix=value_suffix, type_handler_registry=registry, options=save_options)


class AbortedError(Exception):
    """Handed to Orbax's save to fail it when the block that writes the arrays raised."""


@contextlib.contextmanager
def slices(
    params_dir: storage.AnyPath, arrays: Sequence[OutputArray], *, value_suffix: bool, save_options: dict
) -> Iterator[dict[plan.Path, ts.TensorStore]]:
    """Writes a checkpoint of ``arrays`` at ``params_dir`` whose data the block writes into the TensorStores it gets
    (module docstring)."""
    opened: concurrent.futures.Future = concurrent.futures.Future()
    finished: concurrent.futures.Future = concurrent.futures.Future()

    async def open_and_wait(values, infos, args) -> None:
        try:
            stores = {}
            for value, info in zip(values, infos, strict=True):
                if hasattr(info, "await_path_creation"):  # 0.12 and later create the dir asynchronously.
                    await info.await_path_creation()
                array = value.array
                spec = orbax_compat.write_spec(info, array.shape, array.write_shape, array.dtype)
                stores[array.path] = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
        except BaseException as e:
            opened.set_exception(e)
            raise
        opened.set_result(stores)
        await asyncio.wrap_future(finished)  # Raises what aborted the block.

    failure: list[BaseException] = []

    def save() -> None:
        try:
            _save(params_dir, arrays, open_and_wait, value_suffix=value_suffix, save_options=save_options)
        except BaseException as e:
            failure.append(e)
            if not opened.done():
                opened.set_exception(e)

    thread = threading.Thread(target=save, name="openpi-merge-orbax-save", daemon=True)
    thread.start()
    try:
        stores = opened.result()
    except BaseException:
        thread.join()
        raise
    try:
        yield stores
    except BaseException as e:
        finished.set_exception(AbortedError(str(e)))
        thread.join()
        raise
    finished.set_result(None)
    thread.join()
    if failure:
        raise failure[0]


def groups(
    params_dir: storage.AnyPath,
    arrays: Sequence[OutputArray],
    produce: Callable[[int], dict[plan.Path, jax.Array]],
    *,
    value_suffix: bool,
    save_options: dict,
) -> None:
    """Writes a checkpoint of ``arrays`` at ``params_dir``, calling ``produce(group)`` for the arrays of each group
    (``OutputArray.group``) only when Orbax writes it; a group's arrays are committed before the next is produced."""

    async def write_groups(values, infos, args) -> None:
        by_group = collections.defaultdict(list)
        for value, info, arg in zip(values, infos, args, strict=True):
            by_group[value.array.group].append((value.array.path, info, arg))
        for group in sorted(by_group):
            produced = produce(group)
            paths, group_infos, group_args = zip(*by_group[group], strict=True)
            # A fresh handler per group: it keeps per-call state (array metadata) that must not mix groups.
            futures = await ocp.type_handlers.ArrayHandler().serialize(
                [produced.pop(path) for path in paths], group_infos, group_args
            )
            for committed in futures:
                await asyncio.to_thread(committed.result)

    _save(params_dir, arrays, write_groups, value_suffix=value_suffix, save_options=save_options)


def write_shape(shape: tuple[int, ...], rows: int) -> tuple[int, ...]:
    """Pieces of ``rows`` along the first axis (the whole array for a scalar)."""
    if not shape:
        return shape
    return (min(rows, shape[0]), *shape[1:])


def nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize
