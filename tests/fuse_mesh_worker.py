"""Fuses random-shaped LoRA pairs on one device and on device meshes, and prints where the merged kernels differ.

Run as a script in a process whose XLA_FLAGS force at least 8 CPU devices (JAX reads them once, at import, so a test
starts one such process for all draws): ``python fuse_mesh_worker.py SEED DRAWS``. Prints one JSON object: the draws
(shapes, kind, rank, scale) and, for every draw and mesh, the number of stored elements that differ bit-wise from the
1-device merge.
"""

import dataclasses
import json
import sys

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from openpi_merge import config, fuse, lora, openpi_layout, plan, sharding

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
MESH_SIZES = (2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Draw:
    """One random pair: its module kind, expert, per-layer kernel shape, rank, depth and LoRA settings."""

    kind: str
    suffix: str
    layer_shape: tuple[int, ...]
    rank: int
    depth: int
    alpha: float
    rslora: bool
    verify: bool


def _layer_shape(kind: str, rng: np.random.Generator) -> tuple[int, ...]:
    """A per-layer kernel shape of ``kind`` from random heads, head_dim, width and MLP width (openpi's axis order)."""
    heads = int(rng.choice([1, 3, 8, 16, 32, 64]))
    head_dim = int(rng.choice([4, 8, 12, 16, 32]))
    width = int(rng.choice([8, 24, 48, 64, 128, 256]))
    mlp = int(rng.choice([16, 24, 48, 64, 128]))
    return {
        "q_einsum": (heads, width, head_dim),
        "kv_einsum": (2, int(rng.choice([1, 2])), width, head_dim),
        "qkv_einsum": (3, heads, width, head_dim),
        "attn_vec_einsum": (heads, head_dim, width),
        "mlp/gating_einsum": (2, width, mlp),
        "mlp/linear": (mlp, width),
    }[kind]


def draws(seed: int, count: int) -> list[Draw]:
    """``count`` draws that cycle through every module kind, from ``seed`` alone."""
    rng = np.random.default_rng(seed)
    kinds = [kind.name for kind in openpi_layout.MODULE_KINDS]
    return [
        Draw(
            kind=kinds[i % len(kinds)],
            suffix=str(rng.choice(["", "_1"])),
            layer_shape=_layer_shape(kinds[i % len(kinds)], rng),
            rank=int(rng.choice([2, 4, 8, 16, 32])),
            depth=int(rng.integers(1, 4)),
            alpha=float(rng.choice([3.0, 16.0, 32.0, 48.0])),
            rslora=bool(rng.integers(2)),
            verify=bool(rng.integers(2)),
        )
        for i in range(count)
    ]


def make_pair(draw: Draw, seed: int) -> tuple[plan.Pair, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The planned pair of ``draw`` and its random arrays: a bfloat16 kernel and float32 factors, as openpi stores."""
    kind = next(k for k in openpi_layout.MODULE_KINDS if k.name == draw.kind)
    cfg = config.make_config("pi0")
    cfg.input, cfg.output = "in", "out"
    for expert in ("paligemma", "action_expert"):
        cfg[expert].alpha, cfg[expert].rslora = draw.alpha, draw.rslora
    settings = config.read_settings(cfg)
    axes = (-2, -1)  # openpi's default for Einsum; FeedForward's are fixed to the same.
    shape_a, shape_b = lora.factor_shapes(draw.layer_shape, axes, draw.rank)
    rng = np.random.default_rng(seed)
    fan_in = int(np.prod(draw.layer_shape[:-1]))
    arrays = (
        (rng.standard_normal((draw.depth, *draw.layer_shape), np.float32) * fan_in**-0.5).astype(BFLOAT16),
        rng.standard_normal((draw.depth, *shape_a), np.float32) * np.float32(0.05),
        rng.standard_normal((draw.depth, *shape_b), np.float32) * np.float32(0.05),
    )
    module, group = (draw.kind.split("/")[0], "mlp") if draw.kind.startswith("mlp") else (draw.kind, "attn")
    root = ("PaliGemma", "llm", "layers", group, module + draw.suffix)
    names = (kind.kernel, kind.lora_a, kind.lora_b)
    leaves = {(*root, n): plan.Leaf((*root, n), a.shape, a.dtype) for n, a in zip(names, arrays, strict=True)}
    merge_plan = plan.make_plan(leaves, settings)
    (pair,) = merge_plan.pairs
    return pair, arrays


# Mesh shapes that shard different array axes (see sharding.partition_spec): every device on one axis; 2-way fsdp
# with the rest on tp; 4-way tp (as much of it as fits) with the rest on fsdp.
FAMILIES = ("fsdp=-1", "fsdp=2,tp=-1", "tp=4,fsdp=-1")


def _mesh_axes(family: str, size: int) -> tuple[tuple[str, int], ...]:
    first, second = family.split(",") if "," in family else (family, None)
    name, fixed = first.split("=")
    lead = size if fixed == "-1" else min(int(fixed), size)
    return ((name, lead),) if second is None else ((name, lead), (second.split("=")[0], size // lead))


def mesh_layouts() -> dict[tuple[str, int], sharding.Layout]:
    """A layout per (family, size) over the first ``size`` devices; the fusing device is always the first."""
    devices = jax.devices()
    layouts = {}
    for family in FAMILIES:
        for size in MESH_SIZES:
            axes = _mesh_axes(family, size)
            grid = np.asarray(devices[:size]).reshape(tuple(n for _, n in axes))
            mesh = Mesh(grid, tuple(name for name, _ in axes))
            layouts[family, size] = sharding.Layout(mesh=mesh, device=devices[0])
    return layouts


def _bits(x: jax.Array) -> np.ndarray:
    return np.asarray(jax.device_get(x)).view(np.uint16)


def run(seed: int, count: int) -> dict:
    """Every draw fused on one device, then on a mesh of each size (the family rotating with the draw, so the draws
    cover every family at every size); the differing stored elements per draw and mesh."""
    layouts = mesh_layouts()
    results = []
    for i, draw in enumerate(draws(seed, count)):
        pair, arrays = make_pair(draw, seed + i)
        want = _bits(fuse.fuse_pair(pair, *arrays, sharding.single_device(), verify=draw.verify, seed=i)[0])
        differing = {}
        rotation = i + i // len(openpi_layout.MODULE_KINDS)  # Each kind's next draw takes the families in turn.
        for j, size in enumerate(MESH_SIZES):
            layout = layouts[FAMILIES[(rotation + j) % len(FAMILIES)], size]
            got = fuse.fuse_pair(pair, *arrays, layout, verify=draw.verify, seed=i)[0]
            axes = ",".join(f"{name}={n}" for name, n in layout.mesh.shape.items())
            differing[f"{axes} {layout.sharding(pair.kernel).spec}"] = int(np.sum(_bits(got) != want))
        results.append({"draw": dataclasses.asdict(draw), "elements": want.size, "differing": differing})
    return {"devices": jax.device_count(), "results": results}


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]), int(sys.argv[2]))))
