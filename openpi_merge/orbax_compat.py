"""Orbax's private pieces the merger builds on, in one place: the TensorStore specs Orbax's ``ArrayHandler`` builds for
reading and writing an array, the per-process OCDBT subdir, and the TensorStore context. Each is taken from the
module each release keeps it in (orbax-checkpoint 0.11.13, openpi's pin, through 0.12.x); pyproject.toml bounds
Orbax below the next minor release, where these private modules may move.
"""

import orbax.checkpoint as ocp
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
from orbax.checkpoint._src.serialization import type_handlers as orbax_type_handlers

from openpi_merge import plan, storage
from openpi_merge.openpi_layout import PARAMS_KEY, VALUE_SUFFIX

# Orbax's ArrayHandler type string, written into the tree metadata for every array leaf.
ARRAY_TYPESTR = ocp.type_handlers.ArrayHandler().typestr()


def array_name(path: plan.Path, value_suffix: bool) -> str:
    """The array's key in the checkpoint, as Orbax names it: the tree path joined by dots."""
    return ".".join((PARAMS_KEY, *path, *((VALUE_SUFFIX,) if value_suffix else ())))


def ts_context(use_ocdbt: bool):
    return ts_utils.get_ts_context(use_ocdbt=use_ocdbt)


def _process_index_for_subdir(use_ocdbt: bool):
    """The per-process OCDBT subdir Orbax writes into (merged into the root database when the save finishes)."""
    try:  # orbax-checkpoint 0.12 and later
        from orbax.checkpoint._src.serialization import ocdbt_utils

        return ocdbt_utils.get_process_index_for_subdir(use_ocdbt)
    except ImportError:  # 0.11.x
        return orbax_type_handlers.get_process_index_for_subdir(use_ocdbt)


def write_spec(info, shape: tuple[int, ...], write_shape: tuple[int, ...], dtype) -> dict:
    """The spec Orbax's ArrayHandler opens an array with when it is written in pieces of ``write_shape``."""
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


def read_spec(params_dir: storage.AnyPath, name: str, use_ocdbt: bool) -> dict:
    """The spec Orbax's restore reads array ``name`` of the checkpoint at ``params_dir`` with."""
    return {
        "driver": "zarr",  # openpi's checkpoints are zarr v2 (see checkpoint._checkpointer).
        "kvstore": ts_utils.build_kvstore_tspec(params_dir.as_posix(), name=name, use_ocdbt=use_ocdbt),
        "recheck_cached_data": False,
        "recheck_cached_metadata": False,
    }
