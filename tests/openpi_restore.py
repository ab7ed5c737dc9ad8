"""Restores a merged step dir exactly as openpi's ``model.restore_params`` does; prints shape, dtype, sha256 per leaf.

Run by the end-to-end tests under the *other* stack's python (openpi's pinned one, or the latest releases), so it
imports nothing from openpi_merge.
"""

import hashlib
import json
import pathlib
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util


def main(step_dir: str) -> None:
    # gs:// as openpi passes it (an epath); a local step dir as before.
    params_path = epath.Path(step_dir) / "params" if "://" in step_dir else pathlib.Path(step_dir).resolve() / "params"
    with ocp.PyTreeCheckpointer() as ckptr:
        metadata = ckptr.metadata(params_path)
        # openpi's exact call under orbax-checkpoint 0.11.13; newer releases wrap the tree in item_metadata.
        metadata = metadata if ocp.__version__.startswith("0.11.") else metadata.item_metadata
        item = {"params": metadata["params"]}
        params = ckptr.restore(
            params_path,
            ocp.args.PyTreeRestore(
                item=item,
                restore_args=jax.tree.map(lambda _: ocp.ArrayRestoreArgs(restore_type=np.ndarray), item),
            ),
        )["params"]
    flat = traverse_util.flatten_dict(params)
    if all(kp[-1] == "value" for kp in flat):
        flat = {kp[:-1]: v for kp, v in flat.items()}
    print(
        json.dumps(
            {
                "/".join(kp): [list(v.shape), v.dtype.name, hashlib.sha256(v.tobytes()).hexdigest()]
                for kp, v in flat.items()
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
