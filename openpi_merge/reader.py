"""The input's arrays, opened through TensorStore (the library Orbax stores them with) for slice reads; every read of
the stream goes through here, and every storage error becomes one InputError naming the parameter.

``open_inputs`` opens every parameter of a finished checkpoint as a TensorStore, by the spec Orbax's own restore
builds (``zarr`` over the checkpoint's OCDBT database, or over plain files for a checkpoint written without OCDBT).
``Inputs.read`` reads rows of one (only the zarr chunks the slice touches are read and decoded); ``chunk_rows`` says
how many rows (along the first axis) make whole chunks. ``Inputs.read_by_chunk`` reads the same rows one zarr chunk
after another, as ``Pieces``: TensorStore holds each chunk it decodes three times over while it reads it (its encoded
bytes, the decoded chunk, the copy it returns), so rows spanning the two 1.2 GB chunks of a single-device save's
largest array, read at once, peak at 2.7 times their size (pinned TensorStore 0.1.74; 2.0 times on 0.1.86), and one
chunk at a time at 1.9 times (1.5). A truncated or corrupt chunk file, or zarr metadata that
claims more bytes than a chunk holds, fails that read, and its ``Read.result`` raises InputError (exit 3) naming the
parameter, however TensorStore words it.
"""

import concurrent.futures
import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np
import tensorstore as ts

from openpi_merge import checkpoint, errors, orbax_compat, plan, storage

Region = tuple[slice, ...]


@dataclasses.dataclass(frozen=True)
class Pieces:
    """Rows of an array held as the pieces they were read in (``read_by_chunk``): ``regions[i]`` (relative to the
    rows' first) holds ``arrays[i]``. Indexing the leading axes with integers gives that sub-array: a view of the piece
    that holds it whole, else assembled from the pieces it spans."""

    shape: tuple[int, ...]
    dtype: np.dtype
    regions: tuple[Region, ...]
    arrays: tuple[np.ndarray, ...]

    def __getitem__(self, index: tuple[int, ...]) -> np.ndarray:
        inner = self.shape[len(index) :]
        parts = []
        for region, array in zip(self.regions, self.arrays, strict=True):
            leading = region[: len(index)]
            if all(axis.start <= i < axis.stop for axis, i in zip(leading, index, strict=True)):
                local = tuple(i - axis.start for axis, i in zip(leading, index, strict=True))
                parts.append((region[len(index) :], array[local]))
        if len(parts) == 1 and parts[0][1].shape == inner:  # Within one piece: a view of it, not a copy.
            return parts[0][1]
        out = np.empty(inner, self.dtype)
        for region, part in parts:
            out[region] = part
        return out


@dataclasses.dataclass(frozen=True)
class Read:
    """A read in flight: ``result`` waits for it and raises InputError naming the parameter if it failed."""

    params_dir: storage.AnyPath
    path: plan.Path
    future: ts.Future | concurrent.futures.Future
    pieces: tuple[tuple[int, ...], tuple[Region, ...]] | None = None  # read_by_chunk: the rows' shape and regions.

    def result(self) -> np.ndarray | Pieces:
        try:
            arrays = self.future.result()
        except Exception as e:  # TensorStore raises ValueError (OUT_OF_RANGE, DATA_LOSS, ...) for a damaged chunk.
            raise checkpoint.unreadable(self.params_dir, e, at=self.path) from e
        if self.pieces is None:
            return arrays
        shape, regions = self.pieces
        return Pieces(shape, np.dtype(arrays[0].dtype), regions, tuple(arrays))


def _chunk_regions(origin: tuple[int, ...], shape: tuple[int, ...], chunk: tuple[int, ...]) -> tuple[Region, ...]:
    """The parts of the chunk grid's cells (cells of ``chunk`` from 0) within the box at ``origin`` of ``shape``, as
    regions relative to ``origin``, in C order."""
    axes = []
    for start, n, c in zip(origin, shape, chunk, strict=True):
        cuts = sorted({start, start + n, *range((start // c + 1) * c, start + n, c)}) if n else [start, start]
        axes.append([slice(a - start, b - start) for a, b in itertools.pairwise(cuts)])
    return tuple(itertools.product(*axes))


def _read_in_turn(views: Sequence[ts.TensorStore]) -> concurrent.futures.Future:
    """Reads each of ``views`` once the one before it is read; the future gives their arrays or the first error."""
    done: concurrent.futures.Future = concurrent.futures.Future()
    arrays: list[np.ndarray] = []

    def start(i: int) -> None:
        if i == len(views):
            done.set_result(arrays)
            return
        try:
            views[i].read().add_done_callback(lambda future: collect(i, future))
        except Exception as e:  # Handed to whoever waits on ``done``.
            done.set_exception(e)

    def collect(i: int, future: ts.Future) -> None:
        try:
            arrays.append(future.result())
        except Exception as e:  # Handed to whoever waits on ``done``.
            done.set_exception(e)
            return
        start(i + 1)

    start(0)
    return done


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The opened arrays of one checkpoint, by parameter path."""

    params_dir: storage.AnyPath
    stores: dict[plan.Path, ts.TensorStore]

    def read(self, path: plan.Path, rows: slice | None = None) -> Read:
        """Starts reading rows ``rows`` of parameter ``path`` (all of it for None)."""
        store = self.stores[path]
        try:
            future = (store if rows is None else store[rows]).read()
        except Exception as e:  # An index TensorStore refuses at once: the metadata disagrees with the tree.
            raise checkpoint.unreadable(self.params_dir, e, at=path) from e
        return Read(self.params_dir, path, future)

    def read_by_chunk(self, path: plan.Path, rows: slice | None = None) -> Read:
        """Starts reading rows ``rows`` of ``path`` (all of it for None) one zarr chunk at a time (module docstring);
        its result is ``Pieces``."""
        store = self.stores[path]
        try:
            view = store if rows is None or store.rank == 0 else store[rows]
            origin = tuple(int(i) for i in view.domain.inclusive_min)
            regions = _chunk_regions(origin, tuple(view.shape), _chunk_shape(store))
            views = [
                store[tuple(slice(o + r.start, o + r.stop) for o, r in zip(origin, region, strict=True))]
                for region in regions
            ]
        except Exception as e:  # An index TensorStore refuses at once: the metadata disagrees with the tree.
            raise checkpoint.unreadable(self.params_dir, e, at=path) from e
        return Read(self.params_dir, path, _read_in_turn(views), (tuple(view.shape), regions))

    def chunk_rows(self, path: plan.Path) -> int:
        """How many rows (along the first axis) one chunk of ``path`` spans: slices of multiples of it decode each
        chunk once. 1 for a scalar."""
        store = self.stores[path]
        return _chunk_shape(store)[0] if store.rank else 1


def _chunk_shape(store: ts.TensorStore) -> tuple[int, ...]:
    """The shape of ``store``'s read chunks, an axis TensorStore leaves unchunked taking its whole extent."""
    return tuple(max(1, int(c or n)) for c, n in zip(store.chunk_layout.read_chunk.shape, store.shape, strict=True))


def open_inputs(params_dir: storage.AnyPath, leaves: Sequence[plan.Leaf], *, value_suffix: bool) -> Inputs:
    """Opens ``leaves`` of the checkpoint at ``params_dir`` for slice reads.

    Raises InputError naming the parameter if an array is missing or its metadata does not match the tree's.
    """
    use_ocdbt = (params_dir / "manifest.ocdbt").exists()
    context = orbax_compat.ts_context(use_ocdbt)
    opening = {
        leaf.path: ts.open(
            ts.Spec(orbax_compat.read_spec(params_dir, orbax_compat.array_name(leaf.path, value_suffix), use_ocdbt)),
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
    return Inputs(params_dir, stores)
