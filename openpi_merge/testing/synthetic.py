"""Synthetic openpi LoRA fine-tune checkpoints, laid out exactly as openpi training writes them.

The parameter trees are those of openpi's ``Pi0Config(paligemma_variant="gemma_2b_lora",
action_expert_variant="gemma_300m_lora")`` (``pi0``), the same with ``pi05=True`` (``pi05``) and
``Pi0FASTConfig(paligemma_variant="gemma_2b_lora")`` (``pi0_fast``), read off openpi's own models. Dtypes are those a
LoRA fine-tune stores: leaves frozen by openpi's LoRA freeze filter (every ``PaliGemma/llm`` leaf that is not a LoRA
leaf) are bfloat16, everything else (LoRA leaves, SigLIP, projections) float32.

``scale="full"`` gives openpi's real dimensions (about 3.3 B parameters); ``scale="small"`` the same tree at a few
hundred MB, for tests of memory use; ``scale="tiny"`` the same tree with small dimensions, for unit tests.

Values are random and non-zero (no leaf is left at openpi's zero init), drawn from generators seeded by
``(seed, crc32(path), chunk)`` so that a leaf gets the same values whatever else the tree holds; every layer along
the scan axis differs:

* kernels and embeddings: normal with std ``1 / sqrt(fan_in)`` (a LeCun-normal-like init);
* norm scales, biases, ``pos_embedding``: normal with std 0.02;
* LoRA ``A`` and ``B``: normal with std 0.05. openpi initialises both at normal(0.01), whose product is of the order
  of a bfloat16 rounding step of the kernels: with 0.05 the update ``A @ B`` (std ``0.0025 * sqrt(rank)``, 0.01 at
  rank 16) is many bfloat16 ulps of every kernel, so merging visibly changes every paired kernel.
"""

import asyncio
import dataclasses
import json
import pathlib
import weakref
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp

from openpi_merge import memory
from openpi_merge.openpi_layout import MODELS, PARAMS_KEY, is_lora_leaf

SCALES = ("tiny", "small", "full")

TRAIN_STATE_ITEM = "train_state"
ASSETS_DIR = "assets"

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT32 = np.dtype(np.float32)

_LORA_STD = 0.05
_SMALL_STD = 0.02
_CHUNK = 1 << 22  # Elements generated at a time: 16 MiB of float32 scratch.
_LARGE_ARRAY_BYTES = 16 << 20  # Arrays this large are written to disk one at a time.
_CHUNKED_ARRAY_BYTES = 2 << 30  # Arrays larger than this are stored in chunks of _STORAGE_CHUNK_BYTES.
_STORAGE_CHUNK_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class GemmaDims:
    """Dimensions of one Gemma expert of openpi's language model, and its LoRA rank."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rank: int


@dataclasses.dataclass(frozen=True)
class SiglipDims:
    """Dimensions of the SigLIP image encoder (``PaliGemma/img``)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    num_patches: int

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """Everything that sets the shapes of one model's parameter tree."""

    model: str
    scale: str
    paligemma: GemmaDims
    action_expert: GemmaDims | None  # None for pi0-FAST, which has a single expert.
    siglip: SiglipDims
    vocab_size: int
    action_dim: int

    @property
    def experts(self) -> tuple[GemmaDims, ...]:
        return (self.paligemma,) if self.action_expert is None else (self.paligemma, self.action_expert)


_FULL_PALIGEMMA = GemmaDims(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256, rank=16)
_FULL_EXPERT = GemmaDims(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256, rank=32)
_FULL_SIGLIP = SiglipDims(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14, num_patches=256)
_TINY_PALIGEMMA = GemmaDims(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16, rank=16)
# Rank equal to the width on purpose: shapes alone then cannot tell the LoRA axes apart.
_TINY_EXPERT = GemmaDims(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=16, rank=32)
# A few hundred MB: big enough for a streamed merge's memory to show against a whole-tree one, small enough for a test.
_SMALL_PALIGEMMA = GemmaDims(width=1024, depth=18, mlp_dim=2048, num_heads=8, num_kv_heads=1, head_dim=128, rank=16)
_SMALL_EXPERT = GemmaDims(width=512, depth=18, mlp_dim=1024, num_heads=8, num_kv_heads=1, head_dim=128, rank=32)
_TINY_SIGLIP = SiglipDims(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=2, num_patches=16)


def model_dims(model: str, scale: str, *, fused_qkv: bool = False) -> ModelDims:
    """Dimensions of ``model`` at ``scale``.

    ``fused_qkv`` sets ``num_kv_heads = num_heads``, which makes openpi build one ``qkv_einsum`` instead of
    ``q_einsum`` + ``kv_einsum``. openpi's mixture attention asserts that all experts share ``num_kv_heads``, so for
    pi0 and pi0.5 it applies to the action expert as well.
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}: expected one of {MODELS}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}: expected one of {SCALES}")
    full = scale == "full"
    paligemma, expert = {
        "tiny": (_TINY_PALIGEMMA, _TINY_EXPERT),
        "small": (_SMALL_PALIGEMMA, _SMALL_EXPERT),
        "full": (_FULL_PALIGEMMA, _FULL_EXPERT),
    }[scale]
    expert = None if model == "pi0_fast" else expert
    if fused_qkv:
        paligemma = dataclasses.replace(paligemma, num_kv_heads=paligemma.num_heads)
        if expert is not None:
            expert = dataclasses.replace(expert, num_kv_heads=expert.num_heads)
    return ModelDims(
        model=model,
        scale=scale,
        paligemma=paligemma,
        action_expert=expert,
        siglip=_FULL_SIGLIP if full else _TINY_SIGLIP,
        vocab_size=257_152 if full else 128,
        action_dim=32 if full else 8,
    )


@dataclasses.dataclass(frozen=True)
class _Leaf:
    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    std: float


def _is_lora(path: str) -> bool:
    return is_lora_leaf(tuple(path.split("/")))


def _siglip_leaves(dims: ModelDims) -> list[_Leaf]:
    s, width = dims.siglip, dims.paligemma.width
    c, n, h, f, depth = s.width, s.num_heads, s.head_dim, s.mlp_dim, s.depth
    block = "PaliGemma/img/Transformer/encoderblock"
    leaves = [
        ("PaliGemma/img/Transformer/encoder_norm/bias", (c,), None),
        ("PaliGemma/img/Transformer/encoder_norm/scale", (c,), None),
        (f"{block}/LayerNorm_0/bias", (depth, c), None),
        (f"{block}/LayerNorm_0/scale", (depth, c), None),
        (f"{block}/LayerNorm_1/bias", (depth, c), None),
        (f"{block}/LayerNorm_1/scale", (depth, c), None),
        (f"{block}/MlpBlock_0/Dense_0/bias", (depth, f), None),
        (f"{block}/MlpBlock_0/Dense_0/kernel", (depth, c, f), c),
        (f"{block}/MlpBlock_0/Dense_1/bias", (depth, c), None),
        (f"{block}/MlpBlock_0/Dense_1/kernel", (depth, f, c), f),
        (f"{block}/MultiHeadDotProductAttention_0/out/bias", (depth, c), None),
        (f"{block}/MultiHeadDotProductAttention_0/out/kernel", (depth, n, h, c), n * h),
        ("PaliGemma/img/embedding/bias", (c,), None),
        ("PaliGemma/img/embedding/kernel", (s.patch_size, s.patch_size, 3, c), s.patch_size * s.patch_size * 3),
        ("PaliGemma/img/head/bias", (width,), None),
        ("PaliGemma/img/head/kernel", (c, width), c),
        ("PaliGemma/img/pos_embedding", (1, s.num_patches, c), None),
    ]
    for name in ("key", "query", "value"):  # SigLIP really has a module named "value".
        leaves.append((f"{block}/MultiHeadDotProductAttention_0/{name}/bias", (depth, n, h), None))
        leaves.append((f"{block}/MultiHeadDotProductAttention_0/{name}/kernel", (depth, c, n, h), c))
    return [_Leaf(p, shape, FLOAT32, _SMALL_STD if fan_in is None else fan_in**-0.5) for p, shape, fan_in in leaves]


def _einsum_leaves(path: str, depth: int, shape: tuple[int, ...], fan_in: int, rank: int) -> list[_Leaf]:
    # openpi's lora.Einsum with the default axes (-2, -1): A replaces the last kernel axis with the rank, B the
    # second last. The scan's depth axis leads all three.
    shape_a, shape_b = list(shape), list(shape)
    shape_a[-1] = rank
    shape_b[-2] = rank
    return [
        _Leaf(f"{path}/w", (depth, *shape), BFLOAT16, fan_in**-0.5),
        _Leaf(f"{path}/lora_a", (depth, *shape_a), FLOAT32, _LORA_STD),
        _Leaf(f"{path}/lora_b", (depth, *shape_b), FLOAT32, _LORA_STD),
    ]


def _expert_leaves(g: GemmaDims, suffix: str, adarms: bool) -> list[_Leaf]:
    d, depth, f, rank = g.width, g.depth, g.mlp_dim, g.rank
    attn = "PaliGemma/llm/layers/attn"
    leaves = []
    if g.num_kv_heads == g.num_heads:
        leaves += _einsum_leaves(f"{attn}/qkv_einsum{suffix}", depth, (3, g.num_heads, d, g.head_dim), d, rank)
    else:
        leaves += _einsum_leaves(f"{attn}/q_einsum{suffix}", depth, (g.num_heads, d, g.head_dim), d, rank)
        leaves += _einsum_leaves(f"{attn}/kv_einsum{suffix}", depth, (2, g.num_kv_heads, d, g.head_dim), d, rank)
    leaves += _einsum_leaves(
        f"{attn}/attn_vec_einsum{suffix}", depth, (g.num_heads, g.head_dim, d), g.num_heads * g.head_dim, rank
    )
    mlp = f"PaliGemma/llm/layers/mlp{suffix}"
    leaves += [
        _Leaf(f"{mlp}/gating_einsum", (depth, 2, d, f), BFLOAT16, d**-0.5),
        _Leaf(f"{mlp}/gating_einsum_lora_a", (depth, 2, d, rank), FLOAT32, _LORA_STD),
        _Leaf(f"{mlp}/gating_einsum_lora_b", (depth, 2, rank, f), FLOAT32, _LORA_STD),
        _Leaf(f"{mlp}/linear", (depth, f, d), BFLOAT16, f**-0.5),
        _Leaf(f"{mlp}/linear_lora_a", (depth, f, rank), FLOAT32, _LORA_STD),
        _Leaf(f"{mlp}/linear_lora_b", (depth, rank, d), FLOAT32, _LORA_STD),
    ]
    norms = [("PaliGemma/llm/layers/pre_attention_norm", (depth,)), ("PaliGemma/llm/layers/pre_ffw_norm", (depth,))]
    norms.append(("PaliGemma/llm/final_norm", ()))
    for norm, lead in norms:
        if adarms:  # pi0.5's adaptive RMSNorm: a Dense producing scale, shift and gate, and no scale parameter.
            leaves.append(_Leaf(f"{norm}{suffix}/Dense_0/bias", (*lead, 3 * d), BFLOAT16, _SMALL_STD))
            leaves.append(_Leaf(f"{norm}{suffix}/Dense_0/kernel", (*lead, d, 3 * d), BFLOAT16, d**-0.5))
        else:
            leaves.append(_Leaf(f"{norm}{suffix}/scale", (*lead, d), BFLOAT16, _SMALL_STD))
    return leaves


def _projection_leaves(dims: ModelDims) -> list[_Leaf]:
    if dims.action_expert is None:
        return []
    w, a = dims.action_expert.width, dims.action_dim
    linears = [("action_in_proj", a, w), ("action_out_proj", w, a)]
    if dims.model == "pi05":
        linears += [("time_mlp_in", w, w), ("time_mlp_out", w, w)]
    else:
        linears += [("state_proj", a, w), ("action_time_mlp_in", 2 * w, w), ("action_time_mlp_out", w, w)]
    leaves = []
    for name, fan_in, fan_out in linears:
        leaves.append(_Leaf(f"{name}/bias", (fan_out,), FLOAT32, _SMALL_STD))
        leaves.append(_Leaf(f"{name}/kernel", (fan_in, fan_out), FLOAT32, fan_in**-0.5))
    return leaves


def _leaves(model: str, scale: str, *, lora: bool = True, fused_qkv: bool = False) -> list[_Leaf]:
    dims = model_dims(model, scale, fused_qkv=fused_qkv)
    width = dims.paligemma.width
    leaves = _siglip_leaves(dims)
    leaves.append(_Leaf("PaliGemma/llm/embedder/input_embedding", (dims.vocab_size, width), BFLOAT16, width**-0.5))
    for i, expert in enumerate(dims.experts):
        leaves += _expert_leaves(expert, f"_{i}" if i else "", adarms=dims.model == "pi05" and i == 1)
    leaves += _projection_leaves(dims)
    if not lora:
        leaves = [leaf for leaf in leaves if not _is_lora(leaf.path)]
    return sorted(leaves, key=lambda leaf: leaf.path)


def param_specs(
    model: str, scale: str, *, lora: bool = True, fused_qkv: bool = False
) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat '/'-joined path -> shape and dtype of each parameter in a LoRA fine-tune checkpoint.

    Paths carry neither the ``params`` prefix nor the ``value`` suffix. With ``lora=False``, the base (non-LoRA)
    tree: the same leaves minus every LoRA leaf, in the same dtypes (what a merged checkpoint holds).
    """
    return {
        leaf.path: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
        for leaf in _leaves(model, scale, lora=lora, fused_qkv=fused_qkv)
    }


def _fill_chunk(flat: np.ndarray, leaf: _Leaf, seed: int, index: int) -> None:
    # Each chunk has its own generator: a leaf's values depend only on the seed and its path.
    rng = np.random.default_rng([seed, zlib.crc32(leaf.path.encode()), index])
    start = index * _CHUNK
    target = flat[start : start + _CHUNK]
    chunk = target if target.dtype == FLOAT32 else np.empty(target.shape, FLOAT32)
    rng.standard_normal(dtype=np.float32, out=chunk)
    chunk *= np.float32(leaf.std)
    if chunk is not target:
        target[...] = chunk  # float32 -> bfloat16, rounding to nearest even.


def _random(leaf: _Leaf, seed: int) -> np.ndarray:
    # Drawn in float32 chunks of at most _CHUNK elements, scaled in place and cast into the output: no full-size
    # float64 or float32 temporary. (numpy holds the GIL while drawing normals, so threads would not help.)
    out = np.empty(leaf.shape, leaf.dtype)
    flat = out.reshape(-1)
    for index in range(-(-flat.size // _CHUNK)):
        _fill_chunk(flat, leaf, seed, index)
    return out


def make_params(model: str, scale: str, *, seed: int = 0, fused_qkv: bool = False) -> dict:
    """Nested dict of random, non-zero numpy arrays with the tree, shapes and dtypes of ``param_specs``."""
    params: dict = {}
    for leaf in _leaves(model, scale, fused_qkv=fused_qkv):
        *parents, name = leaf.path.split("/")
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[name] = _random(leaf, seed)
    return params


def _with_value_suffix(tree: dict) -> dict:
    return {k: _with_value_suffix(v) if isinstance(v, dict) else {"value": v} for k, v in tree.items()}


def _norm_stats(seed: int) -> dict:
    # openpi's normalize.save: {"norm_stats": {key: {"mean", "std", "q01", "q99"}}}, arrays as lists, indent 2.
    rng = np.random.default_rng([seed, zlib.crc32(b"norm_stats")])
    stats = {}
    for key, dim in (("state", 8), ("actions", 7)):
        mean = rng.standard_normal(dim)
        std = rng.uniform(0.1, 1.0, dim)
        stats[key] = {
            "mean": mean.tolist(),
            "std": std.tolist(),
            "q01": (mean - 2.3 * std).tolist(),
            "q99": (mean + 2.3 * std).tolist(),
        }
    return {"norm_stats": stats}


def _train_state(step: int) -> dict:
    # Stand-in for openpi's TrainState minus its params: a step counter and a small optimizer-state-like tree.
    return {
        "step": np.asarray(step, np.int32),
        "opt_state": {
            "count": np.asarray(step, np.int32),
            "mu": {"action_in_proj": {"kernel": {"value": np.zeros((4, 4), np.float32)}}},
            "nu": {"action_in_proj": {"kernel": {"value": np.full((4, 4), 1e-8, np.float32)}}},
        },
    }


class _SharedArray(np.ndarray):
    """An ndarray whose deepcopy is itself: Orbax's NumpyHandler deep-copies every array before an async save."""

    def __deepcopy__(self, memo: dict) -> "_SharedArray":
        return self


class _LowMemoryNumpyHandler(ocp.type_handlers.NumpyHandler):
    """Orbax's NumpyHandler, writing without a second copy of the tree and one large array at a time.

    Stock Orbax deep-copies every numpy array, then compresses all of them at once, holding each compressed
    array until written: about 2.5x the tree in peak memory. Here arrays are not copied (nothing mutates them),
    and arrays of ``_LARGE_ARRAY_BYTES`` or more are written one after another, so peak memory is the tree plus
    one compressed large array. What lands on disk is unchanged: same typestr, specs and compression.
    """

    def __init__(self) -> None:
        super().__init__()
        self._locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    async def serialize(self, values: Sequence[np.ndarray], infos: Sequence[Any], args: Any = None) -> Any:
        return await super().serialize([np.asarray(v).view(_SharedArray) for v in values], infos, args)

    async def _open_and_write(self, value: np.ndarray, tspec: dict[str, Any], ts_context: Any) -> Any:
        if value.nbytes < _LARGE_ARRAY_BYTES:
            return await super()._open_and_write(value, tspec, ts_context)
        lock = self._locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())
        async with lock:
            result = await super()._open_and_write(value, tspec, ts_context)
            # Tensorstore compresses on several threads, so glibc keeps the freed buffers of one array in per-thread
            # arenas where the next array's buffers often cannot reuse them; hand them back to the OS.
            memory.release_free()
            return result


CHUNKINGS = ("fsdp", "orbax", "layer", "quarters")
_QUARTERS = 4


def _save_args(x: np.ndarray, *, chunking: str) -> ocp.SaveArgs:
    if chunking == "quarters" and x.ndim >= 2:
        return ocp.SaveArgs(chunk_byte_size=max(x.nbytes // _QUARTERS, x.itemsize))
    if chunking == "layer" and x.ndim >= 3:
        return ocp.SaveArgs(chunk_byte_size=max(x.nbytes // x.shape[0], x.itemsize), shard_axes=(0,))
    if chunking == "fsdp" and x.nbytes > _CHUNKED_ARRAY_BYTES:
        return ocp.SaveArgs(chunk_byte_size=_STORAGE_CHUNK_BYTES)
    return ocp.SaveArgs()


def write_checkpoint(
    directory: str | pathlib.Path,
    model: str = "pi0",
    scale: str = "tiny",
    *,
    step: int = 1000,
    value_suffix: bool = True,
    seed: int = 0,
    fused_qkv: bool = False,
    asset_id: str = "example_robot",
    jax_arrays: bool = False,
    chunking: str = "fsdp",
) -> pathlib.Path:
    """Writes ``<directory>/<step>/`` as openpi training does and returns that step dir.

    The step dir holds ``params/`` (Orbax PyTree checkpoint, single top-level key ``params``, every leaf path ending
    in ``value`` when ``value_suffix``, as an ``nnx.State`` saves it), ``train_state/``,
    ``assets/<asset_id>/norm_stats.json`` and Orbax's ``_CHECKPOINT_METADATA``.

    By default params are written from numpy arrays without the copies Orbax makes by default, so peak memory stays
    near 1.25x the tree's size at full scale; Orbax then records ``value_type: np.ndarray`` for each. openpi saves
    ``jax.Array`` values (``value_type: jax.Array`` and a ``_sharding`` file), which ``jax_arrays=True`` reproduces
    through Orbax's stock path, at about 2.8x the tree's size in peak memory. Unlike openpi (``max_to_keep=1``),
    other steps already in ``directory`` are kept.

    ``chunking`` is how the arrays are stored. ``"fsdp"``: an array over 2 GiB (only the paligemma gating_einsum at
    full scale) in 256 MiB chunks, as an FSDP-sharded openpi save would chunk it, every other array one chunk.
    ``"orbax"``: Orbax's own defaults for a single-device save, what openpi's single-GPU LoRA configs write (one
    chunk per array; Orbax splits an array over 2 GiB along its last axis), at about 1.7x the largest array on top of
    the tree while saving. ``"layer"``: every array of three or more axes one layer (first-axis index) per chunk, as
    Orbax stores an array sharded over its first axis: a merge can then read such a kernel a layer at a time.
    ``"quarters"``: every array of two or more axes in chunks of a quarter of its bytes, as Orbax splits one over its
    chunk byte size (halving its largest axes: ``"orbax"``'s full-scale gating_einsum, at any scale).
    """
    if chunking not in CHUNKINGS:
        raise ValueError(f"unknown chunking {chunking!r}: expected one of {CHUNKINGS}")
    directory = pathlib.Path(directory).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    params = make_params(model, scale, seed=seed, fused_qkv=fused_qkv)
    if value_suffix:
        params = _with_value_suffix(params)
    save_args = jax.tree.map(lambda x: _save_args(x, chunking=chunking), {PARAMS_KEY: params})
    if jax_arrays:
        params = jax.device_put(params)  # On CPU this usually shares the numpy buffers.
        params_handler = ocp.PyTreeCheckpointHandler()
    else:
        registry = ocp.type_handlers.create_type_handler_registry((np.ndarray, _LowMemoryNumpyHandler()))
        params_handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
    manager = ocp.CheckpointManager(
        directory,
        item_handlers={TRAIN_STATE_ITEM: ocp.PyTreeCheckpointHandler(), PARAMS_KEY: params_handler},
        options=ocp.CheckpointManagerOptions(max_to_keep=None, create=False),
    )
    try:
        manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    TRAIN_STATE_ITEM: ocp.args.PyTreeSave(_train_state(step)),
                    PARAMS_KEY: ocp.args.PyTreeSave({PARAMS_KEY: params}, save_args=save_args),
                }
            ),
        )
        manager.wait_until_finished()
    finally:
        manager.close()
    del params
    step_dir = directory / str(step)
    # openpi writes assets through a callback item of the same save; written after the save here, same result on disk.
    assets = step_dir / ASSETS_DIR / asset_id
    assets.mkdir(parents=True, exist_ok=True)
    (assets / "norm_stats.json").write_text(json.dumps(_norm_stats(seed), indent=2))
    return step_dir
