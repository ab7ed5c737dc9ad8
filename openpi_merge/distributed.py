"""Multi-host merges on JAX's multi-controller runtime: every process runs the same merge on its own devices.

The I/O is Orbax's: parameters are global ``jax.Array``s on a mesh over all processes' devices (``sharding``), so each
process restores and writes only the shards its devices hold, and Orbax's primary process finalizes the checkpoint.
What is left here is starting the runtime and the few points where processes must agree: the staging dir's name and
the barriers around the commit, which only process 0 performs.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from openpi_merge import config, errors


def initialize(settings: config.DistributedSettings | None) -> None:
    """Joins the job's processes; must run before anything touches a JAX backend."""
    if settings is None:
        return
    # CPU processes reach each other's devices through gloo; jax 0.5.3 has no CPU collectives unless asked.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=settings.coordinator_address,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
        )
    except (RuntimeError, ValueError) as e:  # No cluster detected, a bad address, or a coordinator that never came up.
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise errors.ConfigError(f"jax.distributed.initialize failed (check distributed.*): {reason[:300]}") from e


def is_single_process() -> bool:
    return jax.process_count() == 1


def is_primary() -> bool:
    """Whether this is process 0, the one that commits the output and reports."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process gets here; a no-op in a single process."""
    ocp.multihost.sync_global_processes(f"openpi-merge:{name}")


def shared_token() -> str:
    """Eight random hex digits, process 0's in every process."""
    token = np.frombuffer(os.urandom(4), np.uint32)
    return f"{int(ocp.multihost.broadcast_one_to_all(token)[0]):08x}"
