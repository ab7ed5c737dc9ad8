"""The input's arrays, opened through TensorStore (the library Orbax stores them with) for slice reads; every read of
the stream goes through here, and every storage error becomes one InputError naming the parameter.

``open_inputs`` opens every parameter of a finished checkpoint as a TensorStore, by the spec Orbax's own restore
builds (``zarr`` over the checkpoint's OCDBT database, or over plain files for a checkpoint written without OCDBT).
``Inputs.read`` reads rows of one (only the zarr chunks the slice touches are read and decoded); ``chunk_rows`` says
how many rows (along the first axis) make whole chunks. A truncated or corrupt chunk file, or zarr metadata that
claims more bytes than a chunk holds, fails that read, and its ``Read.result`` raises InputError (exit 3) naming the
parameter, however TensorStore words it.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np
import tensorstore as ts

from openpi_merge import checkpoint, errors, orbax_compat, plan, storage


@dataclasses.dataclass(frozen=True)
class Read:
    """A read in flight: ``result`` waits for it and raises InputError naming the parameter if it failed."""

    params_dir: storage.AnyPath
    path: plan.Path
    future: ts.Future

    def result(self) -> np.ndarray:
        try:
            return self.future.result()
        except Exception as e:  # TensorStore raises ValueError (OUT_OF_RANGE, DATA_LOSS, ...) for a damaged chunk.
            raise checkpoint.unreadable(self.params_dir, e, at=self.path) from e


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

    def chunk_rows(self, path: plan.Path) -> int:
        """How many rows (along the first axis) one chunk of ``path`` spans: slices of multiples of it decode each
        chunk once. 1 for a scalar."""
        store = self.stores[path]
        if store.rank == 0:
            return 1
        return max(1, int(store.chunk_layout.read_chunk.shape[0] or store.shape[0]))


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
