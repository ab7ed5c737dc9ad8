"""Where every array lives: one device, or a named device mesh over all processes' devices.

``--config.mesh`` names the mesh axes and their sizes, e.g. ``fsdp=-1`` (every device on one axis) or ``fsdp=4,tp=2``;
``-1`` takes the devices the other axes leave. The rule for a parameter's ``PartitionSpec``:

* each mesh axis, in the order given, shards the largest array axis whose size it divides and that no earlier mesh
  axis took (the later one on a tie); a leaf without such an axis is replicated over that mesh axis;
* LoRA factors are replicated: they are small, and only the fuse reads them, whole, on one device.

The merged kernel keeps its input kernel's sharding. The mesh decides where arrays are stored, never what is
computed: the fuse gathers each layer of a kernel onto one device of each process, fuses it there with the program a
single-device run uses, and copies the stored layer's blocks back into the sharded kernel (``fuse``), so the merged
values are bit-identical to a single-device merge's on any mesh and process count.
"""

import dataclasses
import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from openpi_merge import config, errors, plan
from openpi_merge.openpi_layout import is_lora_leaf


def _resolve_sizes(spec: config.MeshSpec, num_devices: int) -> tuple[int, ...]:
    known = math.prod(size for _, size in spec if size != -1)
    text = ",".join(f"{name}={size}" for name, size in spec)
    if num_devices % known:
        raise errors.ConfigError(f"mesh={text!r} needs a multiple of {known} devices; there are {num_devices}")
    sizes = tuple(num_devices // known if size == -1 else size for _, size in spec)
    if math.prod(sizes) != num_devices:
        raise errors.ConfigError(f"mesh={text!r} spans {math.prod(sizes)} devices; there are {num_devices}")
    return sizes


def partition_spec(shape: tuple[int, ...], mesh_axes: tuple[tuple[str, int], ...]) -> PartitionSpec:
    """The module docstring's rule: each mesh axis shards the largest free array axis it divides."""
    assigned: list[str | None] = [None] * len(shape)
    for name, size in mesh_axes:
        free = [i for i, dim in enumerate(shape) if assigned[i] is None and dim % size == 0]
        if size > 1 and free:
            assigned[max(free, key=lambda i: (shape[i], i))] = name
    return PartitionSpec(*assigned)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Shardings of a merge's arrays; ``mesh`` is None when everything sits on one device."""

    mesh: jax.sharding.Mesh | None
    device: jax.Device

    @property
    def replicated(self) -> jax.sharding.Sharding:
        return SingleDeviceSharding(self.device) if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())

    def sharding(self, leaf: plan.Leaf) -> jax.sharding.Sharding:
        """Where ``leaf`` is restored (and, if written, written from): see the module docstring."""
        if self.mesh is None or is_lora_leaf(leaf.path):
            return self.replicated
        return NamedSharding(self.mesh, partition_spec(leaf.shape, tuple(self.mesh.shape.items())))

    def layer_sharding(self, leaf: plan.Leaf, batch_ndim: int) -> jax.sharding.Sharding:
        """Where one layer of a stacked leaf lives: the leaf's sharding without its ``batch_ndim`` leading axes."""
        stacked = self.sharding(leaf)
        if not isinstance(stacked, NamedSharding):
            return stacked
        spec = tuple(stacked.spec) + (None,) * (len(leaf.shape) - len(stacked.spec))
        return NamedSharding(self.mesh, PartitionSpec(*spec[batch_ndim:]))

    def describe(self) -> str:
        devices = f"{jax.device_count()} {self.device.platform} devices in {jax.process_count()} processes"
        if self.mesh is None:
            return f"1 {self.device.platform} device ({self.device.device_kind})"
        axes = ", ".join(f"{name}={size}" for name, size in self.mesh.shape.items())
        return f"mesh {axes} over {devices} ({self.device.device_kind})"


def make_layout(spec: config.MeshSpec) -> Layout:
    """Places arrays on JAX's default backend: its first device, or a mesh over all its devices (every process's)."""
    device = jax.devices()[0]
    if not spec:
        return Layout(mesh=None, device=device)
    sizes = _resolve_sizes(spec, jax.device_count())
    devices = mesh_utils.create_device_mesh(sizes, jax.devices())
    return Layout(mesh=jax.sharding.Mesh(np.asarray(devices), tuple(name for name, _ in spec)), device=device)


def single_device() -> Layout:
    return make_layout(())
