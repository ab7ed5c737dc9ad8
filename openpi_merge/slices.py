"""Slices of an Orbax checkpoint's arrays, read and written through TensorStore, the library Orbax stores them with.

Reading. ``open_inputs`` opens every parameter of a finished checkpoint as a TensorStore, by the spec Orbax's own
restore builds (``zarr`` over the checkpoint's OCDBT database, or over plain files for a checkpoint written without
OCDBT). Indexing one and reading reads and decodes only the zarr chunks the slice touches; ``read_rows`` says how
many rows (along the first axis) make whole chunks.

Writing. ``writing`` is a context manager with these states:

- opening: Orbax's own PyTree save of the output tree runs in a thread of its own. It writes everything but the array
  data itself (the tree metadata, the OCDBT database, the zarr metadata, the commit) as it does for any tree; the
  leaves are placeholders, taken by a ``TypeHandler`` that presents itself as Orbax's ``ArrayHandler`` (so the tree
  metadata names ``jax.Array``). That handler opens each output array by the write spec Orbax's ``ArrayHandler``
  builds for an array written in pieces of ``write_shape``: that is how Orbax stores an array sharded over its first
  axis, one zarr chunk per piece (or smaller, by Orbax's own chunk choice).
- open: the block receives the opened arrays (``Output.arrays``) and writes every element of every array, in slices
  that cover whole pieces, while Orbax waits.
- finishing: leaving the block without an exception lets the handler return; Orbax then completes its save (OCDBT
  merge, metadata, commit) and the block's exit returns once it has.
- aborted: an exception in the block (or in Orbax's thread) makes the handler raise; Orbax's save fails without
  committing, and the block's exit re-raises the first exception after Orbax's thread has ended.

One optional record of Orbax's is left out: its per-host array metadata (``array_metadatas/``), which Orbax reads
checkpoints without, as it reads those of its earlier releases; and the ``_sharding`` file, which only restores
that pass no sharding of their own consult (openpi's loader passes one).
"""

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import math
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
from orbax.checkpoint._src.serialization import type_handlers as orbax_type_handlers

from openpi_merge import checkpoint, errors, plan, storage
from openpi_merge.openpi_layout import PARAMS_KEY, VALUE_SUFFIX


def array_name(path: plan.Path, value_suffix: bool) -> str:
    """The array's key in the checkpoint, as Orbax names it: the tree path joined by dots."""
    return ".".join((PARAMS_KEY, *path, *((VALUE_SUFFIX,) if value_suffix else ())))


# --- Orbax compatibility: the specs Orbax's ArrayHandler builds, from the function each release keeps them in. ---


def _process_index_for_subdir(use_ocdbt: bool):
    """The per-process OCDBT subdir Orbax writes into (merged into the root database when the save finishes)."""
    try:  # orbax-checkpoint 0.12 and later
        from orbax.checkpoint._src.serialization import ocdbt_utils

        return ocdbt_utils.get_process_index_for_subdir(use_ocdbt)
    except ImportError:  # 0.11.x
        return orbax_type_handlers.get_process_index_for_subdir(use_ocdbt)


def _write_spec(info, shape: tuple[int, ...], write_shape: tuple[int, ...], dtype: np.dtype) -> dict:
    build = getattr(ts_utils, "build_array_write_spec", None)  # 0.12 and later
    if build is None:
        build = orbax_type_handlers._build_array_write_spec  # 0.11.x: the same builder, under this name.
    spec = build(
        info=info,
        arg=ocp.SaveArgs(),
        global_shape=shape,
        local_shape=write_shape,
        dtype=dtype,
        use_ocdbt=info.is_ocdbt_checkpoint,
        process_index=_process_index_for_subdir(info.is_ocdbt_checkpoint),
    )
    return spec.json


def _read_spec(params_dir: storage.AnyPath, name: str, *, use_ocdbt: bool) -> dict:
    return {
        "driver": "zarr",  # openpi's checkpoints are zarr v2 (see checkpoint._checkpointer).
        "kvstore": ts_utils.build_kvstore_tspec(params_dir.as_posix(), name=name, use_ocdbt=use_ocdbt),
        "recheck_cached_data": False,
        "recheck_cached_metadata": False,
    }


# --- Reading ---


def open_inputs(
    params_dir: storage.AnyPath, leaves: Sequence[plan.Leaf], *, value_suffix: bool
) -> dict[plan.Path, ts.TensorStore]:
    """Opens ``leaves`` of the checkpoint at ``params_dir`` for slice reads.

    Raises InputError naming the parameter if an array is missing or its metadata does not match the tree's.
    """
    use_ocdbt = (params_dir / "manifest.ocdbt").exists()
    context = ts_utils.get_ts_context(use_ocdbt=use_ocdbt)
    opening = {
        leaf.path: ts.open(
            ts.Spec(_read_spec(params_dir, array_name(leaf.path, value_suffix), use_ocdbt=use_ocdbt)),
            open=True,
            read=True,
            context=context,
        )
        for leaf in leaves
    }
    stores = {}
    for leaf in leaves:
        try:
            store = opening[leaf.path].result()
        except Exception as e:  # TensorStore raises ValueError and others for a damaged or missing array.
            raise checkpoint.unreadable(params_dir, e, at=leaf.path) from e
        if tuple(store.shape) != leaf.shape or np.dtype(store.dtype.numpy_dtype) != leaf.dtype:
            raise errors.InputError(
                f"cannot read checkpoint {params_dir}: {leaf.name} is stored as {tuple(store.shape)} "
                f"{store.dtype.name}, its tree metadata says {leaf.shape} {leaf.dtype.name} (a damaged checkpoint?)"
            )
        stores[leaf.path] = store
    return stores


def read_rows(store: ts.TensorStore) -> int:
    """How many rows (along the first axis) one chunk of ``store`` spans: slices of multiples of it decode each chunk
    once. 1 for a scalar."""
    if store.rank == 0:
        return 1
    return max(1, int(store.chunk_layout.read_chunk.shape[0] or store.shape[0]))


# --- Writing ---


@dataclasses.dataclass(frozen=True)
class OutputArray:
    """An output parameter: its shape and dtype, and the pieces it is written in (a zarr chunk each, or finer)."""

    path: plan.Path
    shape: tuple[int, ...]
    dtype: np.dtype
    write_shape: tuple[int, ...]


class _Placeholder:
    """An output leaf in the tree handed to Orbax; ``_SliceHandler`` opens it for the block to write."""

    def __init__(self, array: OutputArray):
        self.array = array


class WriteOnlyArrayHandler(ocp.type_handlers.TypeHandler):
    """A handler of placeholder leaves that Orbax's save writes as arrays: it presents itself as Orbax's
    ``ArrayHandler`` (so the tree metadata names ``jax.Array``) and is never asked to read."""

    _TYPESTR = ocp.type_handlers.ArrayHandler().typestr()

    def typestr(self) -> str:
        return self._TYPESTR

    async def metadata(self, infos):
        raise NotImplementedError("placeholders are only written")

    async def deserialize(self, infos, args=None):
        raise NotImplementedError("placeholders are only written")


class _SliceHandler(WriteOnlyArrayHandler):
    """Opens the placeholders' arrays when Orbax asks to write them, hands them over, and waits (module docstring)."""

    def __init__(self, opened: concurrent.futures.Future, finished: concurrent.futures.Future):
        self._opened, self._finished = opened, finished

    async def serialize(self, values: Sequence[_Placeholder], infos, args=None):
        try:
            stores = {}
            for value, info in zip(values, infos, strict=True):
                if hasattr(info, "await_path_creation"):  # 0.12 and later create the dir asynchronously.
                    await info.await_path_creation()
                array = value.array
                spec = _write_spec(info, array.shape, array.write_shape, array.dtype)
                stores[array.path] = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
        except BaseException as e:
            self._opened.set_exception(e)
            raise
        self._opened.set_result(stores)
        await asyncio.wrap_future(self._finished)  # Raises what aborted the block.
        return []


class AbortedError(Exception):
    """Handed to Orbax's save to fail it when the block that writes the arrays raised."""


@dataclasses.dataclass(frozen=True)
class Output:
    arrays: dict[plan.Path, ts.TensorStore]


@contextlib.contextmanager
def writing(params_dir: storage.AnyPath, arrays: Sequence[OutputArray], *, value_suffix: bool) -> Iterator[Output]:
    """Writes a checkpoint of ``arrays`` at ``params_dir`` whose data the block writes (module docstring).

    Raises what Orbax's save raises (OSError, ValueError, RuntimeError from TensorStore), or the block's exception.
    """
    opened: concurrent.futures.Future = concurrent.futures.Future()
    finished: concurrent.futures.Future = concurrent.futures.Future()
    handler = _SliceHandler(opened, finished)
    registry = ocp.type_handlers.create_type_handler_registry((_Placeholder, handler))
    tree = {array.path: _Placeholder(array) for array in arrays}
    failure: list[BaseException] = []

    def save() -> None:
        try:
            checkpoint.save(params_dir, tree, value_suffix=value_suffix, type_handler_registry=registry)
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
        yield Output(stores)
    except BaseException as e:
        finished.set_exception(AbortedError(str(e)))
        thread.join()
        raise
    finished.set_result(None)
    thread.join()
    if failure:
        raise failure[0]


def write_shape(shape: tuple[int, ...], rows: int) -> tuple[int, ...]:
    """Pieces of ``rows`` along the first axis (the whole array for a scalar)."""
    if not shape:
        return shape
    return (min(rows, shape[0]), *shape[1:])


def nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize
