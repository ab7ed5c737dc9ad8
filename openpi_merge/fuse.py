"""Folds LoRA factors into their kernels in float32 under ``jax.jit``, a layer at a time, on one device.

``LayerFuser`` (made by ``layer_fuser``) is the unit: it takes one layer's kernel, A and B (numpy or jax.Array),
returns the stored layer (``kernel + scale * dW`` in the output dtype) on its device without waiting for it, and keeps
the layer's figures on the device; ``finish`` fetches them all at once and raises NumericsError as ``fuse_pair`` does.
``fuse_pair`` runs a stacked kernel through one LayerFuser and writes each stored layer into the target in place;
the streaming pipeline calls LayerFuser itself on the slices it reads.

With verification on, the same compiled step also checks what it stored (see ``_verify_layer``): random probe inputs
go through the update it added (one product with a layer-sized operand) and through openpi's LoRA path (A, then B),
and the stored kernel is compared element by element with the merged float32 sum, each against what rounding
explains. Probes are drawn on the host from ``np.random.default_rng(seed)`` over all of the pair's layers at once and
indexed by layer.

Whether or not it verifies, the step also measures how much of the LoRA update survived rounding to the output dtype
(``_rounding_stats``): openpi's adapters start at normal(0.01), so an update can sit below a bfloat16 ulp of its
kernel, and rounding the merged kernel to bfloat16 then erases it. That costs a few reductions over one layer.

Bit-identical on any mesh, by construction. Every layer is fused by the same single-device program
(``_fuse_program``, one per pair kind and layer shape) whatever the mesh or the number of processes: on a mesh
(``sharding``) the layer is gathered whole onto one device of this process, fused there, and its blocks are then
copied into the sharded target, which moves bits and computes nothing. With several processes each process fuses the
same layer from the same inputs on its own first device and places its own blocks. The merged values therefore
equal the 1-device values bit for bit on any mesh and process count, on every backend whose compiler is
deterministic for one program. (Compiling the fuse for the mesh instead, as this module once did, lets XLA's SPMD
partitioner change the arithmetic; see ``_fuse_program``.)
"""

import dataclasses
import functools
import math
import string
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from openpi_merge import compile_cache, errors, lora, plan, sharding

Params = dict[plan.Path, jax.Array]
_F32_UNIT_ROUNDOFF = 2.0**-24
_PROBE_TOKENS = 4  # Probe inputs per layer: each spans every input direction of the kernel.


@dataclasses.dataclass(frozen=True)
class Check:
    """What the fuse measured for one pair: verification (None when off) and what rounding left of the update."""

    pair: plan.Pair
    relative_error: float | None  # max |x.U - s (x.A).B| / max |s (x.A).B|: the update's error, all probes and layers.
    bound_ratio: float | None  # Worst error / the error rounding explains, probes and store alike; above 1 fails.
    changed_fraction: float = 0.0  # Share of kernel elements whose stored value the merge changed.
    # ||stored - (W + s dW)|| / ||s dW||: the rounding error of the stored kernel against the update itself. 0: the
    # update survived exactly; 1 or more: rounding erased as much as the update (e.g. an update below one ulp).
    rounding_loss: float = 0.0

    @property
    def verified(self) -> bool:
        return self.relative_error is not None


def _unit_roundoff(dtype: np.dtype) -> float:
    return float(ml_dtypes.finfo(dtype).eps) / 2


def _gamma(terms: int) -> float:
    """Higham's gamma_k: the relative error bound of a float32 sum or dot product of ``terms`` terms, in any order."""
    return terms * _F32_UNIT_ROUNDOFF / (1 - terms * _F32_UNIT_ROUNDOFF)


def _probe_shape(lhs: str, kernel_dims: dict[str, int]) -> tuple[int, ...]:
    """Shape of probe inputs: the kernel's sizes on shared axes; batch 1 and ``_PROBE_TOKENS`` on the last free axis."""
    free = [c for c in lhs if c not in kernel_dims]
    return tuple(kernel_dims.get(c, _PROBE_TOKENS if c == free[-1] else 1) for c in lhs)


def _probe_equations(pair: plan.Pair) -> tuple[str, tuple[str, str]]:
    """The module's forward and LoRA equations, with the kernel's output blocks as probe axes too.

    A kernel axis that the output keeps and the input lacks (gating's 2, q_einsum's heads) becomes an axis of the
    probes as well, so each block is probed by inputs of its own: the same check, but XLA's CPU dot then runs as one
    batched matmul instead of transposing the whole kernel first (30x faster for gating_einsum at pi0 scale).
    """
    lhs, rhs, out = lora.split_equation(pair.kind.equation)
    eqn_a, eqn_b = pair.lora_equations
    _, a_rhs, a_out = lora.split_equation(eqn_a)
    blocks = "".join(c for c in rhs[:-1] if c in out and c not in lhs and c in a_out)
    return f"{blocks}{lhs},{rhs}->{out}", (f"{blocks}{lhs},{a_rhs}->{a_out}", eqn_b)


def _dims(equation: str, *shapes: tuple[int, ...]) -> dict[str, int]:
    """Every operand label's size, from the operands' shapes."""
    labels = lora.split_equation(equation)[:2]
    return {c: n for operand, shape in zip(labels, shapes, strict=True) for c, n in zip(operand, shape, strict=True)}


def _contracted(equation: str, dims: dict[str, int]) -> int:
    """How many products each output of ``equation`` sums."""
    lhs, rhs, out = lora.split_equation(equation)
    return math.prod(dims[c] for c in set(lhs) & set(rhs) - set(out))


# The partial sums of a blocked contraction hold blocks x outputs floats: at most this many (4 MiB).
_MAX_PARTIALS = 1 << 20


@dataclasses.dataclass(frozen=True)
class _Blocked:
    """A contraction summed in two stages: ``blocks`` partial sums over one contracted axis, then their sum.

    Why: a float32 dot of n terms is only known to within gamma_n of the sum of the terms' magnitudes, and XLA picks
    the order. Summing sqrt(n) blocks of sqrt(n) terms, kept apart by an optimisation barrier, bounds it by
    gamma_(2 sqrt(n)): 64x tighter for pi0's mlp/linear (n = 16384), which is what lets the one-product check below
    fail a 1% error there. Without the barrier XLA (jax 0.10's CPU backend) fuses the partial dot and its sum back
    into one dot.
    """

    equation: str
    axis: str  # The contracted label split into (blocks, its size / blocks); "" for a plain einsum.
    blocks: int
    terms: int  # The longest sum an output goes through: in a block plus across blocks.


def _blocked(equation: str, dims: dict[str, int]) -> _Blocked:
    """How to block ``equation``: its longest contracted axis split into the divisor of its size nearest sqrt(n)
    blocks that keeps the partials under ``_MAX_PARTIALS``; a plain einsum when no split shortens the sums."""
    lhs, rhs, out = lora.split_equation(equation)
    n = _contracted(equation, dims)
    axis = max(sorted(set(lhs) & set(rhs) - set(out)), key=dims.__getitem__, default="")
    outputs = math.prod(dims[c] for c in out)
    size = dims.get(axis, 1)
    fits = [k for k in range(2, size + 1) if size % k == 0 and k * outputs <= _MAX_PARTIALS]
    blocks = min(fits, key=lambda k: n // k + k, default=1)
    if blocks == 1 or n // blocks + blocks - 1 >= n:
        return _Blocked(equation, "", 1, n)
    return _Blocked(equation, axis, blocks, n // blocks + blocks - 1)


def _blocked_einsum(blocked: _Blocked, x, y):
    """``einsum(blocked.equation, x, y)`` in float32, summed as ``blocked`` says."""
    if not blocked.axis:
        return _einsum(blocked.equation, x, y)
    lhs, rhs, out = lora.split_equation(blocked.equation)
    outer, inner = [c for c in string.ascii_letters if c not in blocked.equation][:2]

    def split(labels: str, operand):
        at = labels.index(blocked.axis)
        shape = (*operand.shape[:at], blocked.blocks, operand.shape[at] // blocked.blocks, *operand.shape[at + 1 :])
        return labels.replace(blocked.axis, outer + inner), operand.reshape(shape)

    (lhs, x), (rhs, y) = split(lhs, x), split(rhs, y)
    partials = jax.lax.optimization_barrier(_einsum(f"{lhs},{rhs}->{outer}{out}", x, y))
    return jnp.sum(partials, axis=0)


@dataclasses.dataclass(frozen=True)
class _Step:
    """Static description of one pair's fuse, the key of its compiled function."""

    update_equation: str
    forward: _Blocked  # The probe of the update: the module's forward equation, blocked.
    lora_a: _Blocked  # The LoRA path's first product, x . A, blocked alike.
    lora_equations: tuple[str, str]
    scale: float
    out_dtype: np.dtype
    probe_shape: tuple[int, ...] | None  # None: no verification.
    tolerance: float  # Rounding budget of the probe outputs, relative to s (|x| . |A|) . |B|.


def _make_step(pair: plan.Pair, *, verify: bool) -> _Step:
    forward_equation, (eqn_a, eqn_b) = _probe_equations(pair)
    lhs, rhs, _ = lora.split_equation(forward_equation)
    layer_shape, a_shape, b_shape = (leaf.shape[pair.batch_ndim :] for leaf in (pair.kernel, pair.lora_a, pair.lora_b))
    probe_shape = _probe_shape(lhs, dict(zip(rhs, layer_shape, strict=True)))
    forward = _blocked(forward_equation, _dims(forward_equation, probe_shape, layer_shape))
    a_dims = _dims(eqn_a, probe_shape, a_shape)
    lora_a = _blocked(eqn_a, a_dims)
    b_terms = _contracted(eqn_b, {**a_dims, **dict(zip(lora.split_equation(eqn_b)[1], b_shape, strict=True))})
    update_terms = _contracted(pair.update_equation, _dims(pair.update_equation, a_shape, b_shape))
    # |x . U - s (x . A) . B| where U = fl(s dW) is the update the fuse stored, each side as computed in float32: the
    # update's own rounding (gamma_(r+1) per element), the blocked probe of U, and the factored path. Each term is
    # at most its gamma times s (|x| . |A|) . |B|, which is itself computed in float32 (the last factor).
    tolerance = (
        _gamma(forward.terms) * (1 + _gamma(update_terms + 1))
        + _gamma(lora_a.terms + b_terms + 1)
        + _gamma(update_terms + 1)
    ) * (1 + _gamma(_contracted(eqn_a, a_dims) + b_terms + 1))
    return _Step(
        update_equation=pair.update_equation,
        forward=forward,
        lora_a=lora_a,
        lora_equations=(eqn_a, eqn_b),
        scale=pair.scale,
        out_dtype=pair.out_dtype,
        probe_shape=probe_shape if verify else None,
        tolerance=tolerance,
    )


def _einsum(equation: str, *operands):
    # HIGHEST: on GPU and TPU the default float32 einsum may run in reduced precision (TF32, bf16 passes).
    return jnp.einsum(equation, *operands, precision="highest")


def _verify_layer(step: _Step, x, lora_a, lora_b, update, merged, stored):
    """(max |y_update - y_lora|, max |y_lora|, probe error / bound, store error / bound): one layer against its
    factors.

    Two checks, each against what float32 and the output dtype's rounding explain (a ratio above 1 fails):
    - Freivalds' check on the update: probe inputs ``x`` through the update the fuse added (``x . U``, the one product
      with a layer-sized operand) against openpi's own LoRA path ``s (x . A) . B``. A wrong update equation, a
      transposed factor, a wrong scale or a corrupted element of U shows up in the probe outputs; the bound is
      ``tolerance * s (|x| . |A|) . |B|`` (see ``_make_step``), tight because both contractions over the layer's
      input are blocked (``_Blocked``).
    - The store, element by element: ``stored`` must be ``merged = kernel + U`` rounded to the output dtype, within
      half an ulp. This catches any flipped bit of the stored kernel but the sign of a zero, where a probe could not
      see one ulp of bfloat16 through the kernel's own magnitude. Its ratio is NaN or Inf exactly when the merged or
      the stored kernel holds a NaN or Inf (NaN propagates through max), so the same pass is the finiteness test.
    """
    eqn_a, eqn_b = step.lora_equations
    y_update = _blocked_einsum(step.forward, x, update)
    y_lora = step.scale * _einsum(eqn_b, _blocked_einsum(step.lora_a, x, lora_a), lora_b)
    magnitude = abs(step.scale) * _einsum(eqn_b, _einsum(eqn_a, jnp.abs(x), jnp.abs(lora_a)), jnp.abs(lora_b))
    diff = jnp.abs(y_update - y_lora)
    probed = jnp.max(diff / (step.tolerance * magnitude + jnp.finfo(jnp.float32).tiny))
    out = ml_dtypes.finfo(step.out_dtype)
    ulp_floor = max(float(out.smallest_subnormal), float(jnp.finfo(jnp.float32).tiny))  # Subnormals, flushed or not.
    half_ulp = _unit_roundoff(step.out_dtype) * jnp.abs(merged) + ulp_floor
    stored_ratio = jnp.max(jnp.abs(stored - merged) / half_ulp)
    return jnp.max(diff), jnp.max(jnp.abs(y_lora)), probed, stored_ratio


# finite, max diff, max |y_lora|, bound ratio, changed fraction, |s dW|^2, |stored - W - s dW|^2, factors finite.
_STATS = 8


# Rounding is measured on evenly spaced whole rows of each layer, about this many elements (all rows of a smaller
# layer): the figure is a ratio of sums over many similar elements, and full-layer reductions doubled the fuse's time
# without verification at pi0 scale on CPU (XLA's CPU reductions are slow next to the rest of the step).
_ROUNDING_SAMPLE = 1 << 20


def _sample_rows(x):
    rows = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
    stride = max(1, math.ceil(rows.shape[0] * rows.shape[1] / _ROUNDING_SAMPLE))
    return rows[::stride]


def _rounding_stats(kernel, update, out_dtype):
    """(share of elements the merge changed, squared norm of the update, squared norm of its rounding error).

    The error is the update as stored, ``stored - kernel`` (exact in float32: the two are close), against the update
    as computed; ``stored - (kernel + update)`` would miss what the float32 sum itself already dropped. The stored
    values are recomputed for the sampled rows by the same operations as the stored kernel, so they are identical.
    """
    kernel, update = _sample_rows(kernel), _sample_rows(update)
    stored = (kernel + update).astype(out_dtype).astype(jnp.float32)
    changed = jnp.mean((stored != kernel).astype(jnp.float32))
    return changed, jnp.sum(jnp.square(update)), jnp.sum(jnp.square((stored - kernel) - update))


def _fuse_layer(step: _Step, kernel, lora_a, lora_b, probes):
    """One layer: the stored merged layer (``step.out_dtype``) and its ``_STATS`` figures."""
    kernel, lora_a, lora_b = (x.astype(jnp.float32) for x in (kernel, lora_a, lora_b))
    update = step.scale * _einsum(step.update_equation, lora_a, lora_b)
    merged = kernel + update
    stored = merged.astype(step.out_dtype)
    stats = jnp.zeros(_STATS, jnp.float32).at[4:7].set(jnp.stack(_rounding_stats(kernel, update, step.out_dtype)))
    # The factors are small (rank columns): testing them tells a non-finite adapter from an update that overflows.
    stats = stats.at[7].set(jnp.all(jnp.isfinite(lora_a)) & jnp.all(jnp.isfinite(lora_b)))
    if step.probe_shape is None:
        return stored, stats.at[0].set(jnp.all(jnp.isfinite(merged)))
    max_diff, max_output, probed, store = _verify_layer(
        step, probes, lora_a, lora_b, update, merged, stored.astype(jnp.float32)
    )
    stats = stats.at[1:4].set(jnp.stack([max_diff, max_output, jnp.maximum(probed, store)]))
    return stored, stats.at[0].set(jnp.isfinite(store))


@functools.cache
def _fuse_program(step: _Step) -> Callable:
    """The one program that fuses a layer of ``step``'s pair kind, whatever the mesh: see the module docstring."""
    # Why one device: compiled for a mesh, this step was a different program on every mesh. XLA's SPMD partitioner
    # propagates the kernel's sharding backwards into the update even when the update is constrained replicated: for
    # attn_vec_einsum, jnp.einsum computes dW = A . (sum over heads of B), and with the kernel sharded on its last
    # axis the 8-device program summed B's heads per column block in an XLA loop fusion and all-gathered the blocks,
    # where the 1-device program summed them whole in a YNNPACK reduce fusion (``__ynn_fusion``, in jax 0.10's CPU
    # backend). The two sum the heads in different orders: a float32 rounding step in dW, now and then a bfloat16
    # ulp stored (issue 11: 2 of 12288 elements; here 9 of 49152 with 64 heads on fsdp=2,tp=2). jax 0.5.3 has no
    # YNN fusions, so both of its programs used the same loop reduce and agreed, by luck rather than by design.

    def fuse_layer(kernel, lora_a, lora_b, probes):
        return _fuse_layer(step, kernel, lora_a, lora_b, probes)

    return jax.jit(fuse_layer)


def _take_layer(x, index):
    return x[index]


def _write_layer(target, layer, index):
    """Writes ``layer`` into ``target`` at ``index`` (a tuple over the stacked leading axes).

    ``target`` is donated and only written, so XLA updates it in place and a stacked kernel is merged one layer at a
    time with temporaries the size of one layer. The layer is taken out by a separate step (``_take_layer``): slicing
    it out of ``target`` in this program would make XLA copy all of ``target`` first.
    """
    start = (*index, *(0 for _ in layer.shape))
    # Written as raw bits: XLA's CPU backend widens a bfloat16 update to float32 across all of ``target``.
    bits = jnp.dtype(f"uint{8 * target.dtype.itemsize}")
    update = jax.lax.bitcast_convert_type(layer.reshape((1,) * len(index) + layer.shape), bits)
    written = jax.lax.dynamic_update_slice(jax.lax.bitcast_convert_type(target, bits), update, start)
    return jax.lax.bitcast_convert_type(written, target.dtype)


@dataclasses.dataclass(frozen=True)
class LayerFuser:
    """Fuses one pair a layer at a time on one device; ``finish`` checks what all its layers measured.

    Every layer goes through the same compiled program (``_fuse_program``, one per pair kind) on one device, so a
    layer's stored values depend on nothing but its inputs: not on the mesh, the process, or who sliced the layer.
    """

    pair: plan.Pair
    step: _Step
    device: jax.Device
    probes: np.ndarray | None  # (*batch_shape, *probe_shape); None without verification.
    stats: list[jax.Array] = dataclasses.field(default_factory=list)  # One (_STATS,) device array per fused layer.

    def fuse(self, index: tuple[int, ...], kernel, lora_a, lora_b) -> jax.Array:
        """The stored layer ``index`` (``pair.out_dtype``, on ``device``) from the layer's kernel, A and B.

        Inputs are numpy arrays or jax.Arrays of one layer; the result is dispatched, not waited for, and the layer's
        figures are kept on the device until ``finish``.
        """
        probes = None if self.probes is None else self.probes[tuple(index)]
        inputs = (kernel, lora_a, lora_b, probes)
        stored, stats = _fuse_program(self.step)(*(None if x is None else _whole_on(x, self.device) for x in inputs))
        self.stats.append(stats)
        return stored

    def finish(self) -> Check:
        """Fetches every layer's figures at once; raises NumericsError on NaN or Inf or a failed verification."""
        return _check(self.pair, np.asarray(jnp.stack(self.stats)), verified=self.probes is not None)


def layer_fuser(pair: plan.Pair, *, verify: bool, seed: int, device: jax.Device) -> LayerFuser:
    """A LayerFuser for ``pair`` on ``device``; its probes are drawn from ``seed`` over all the pair's layers."""
    step = _make_step(pair, verify=verify)
    probes = None
    if step.probe_shape is not None:
        # Probes come from the host: random number generation inside the compiled step would double compile time.
        batch_shape = pair.kernel.shape[: pair.batch_ndim]
        probes = np.random.default_rng(seed).standard_normal((*batch_shape, *step.probe_shape), np.float32)
    return LayerFuser(pair=pair, step=step, device=device, probes=probes)


def _check(pair: plan.Pair, stats: np.ndarray, *, verified: bool) -> Check:
    """The pair's Check from its layers' ``_STATS`` rows; raises NumericsError as ``fuse_pair`` documents."""
    finite, max_diff, max_output, bound_ratio, changed, update_sq, lost_sq, factors_finite = stats.T
    if not factors_finite.all():
        raise errors.NumericsError(
            f"merging {pair.kernel.name} produced NaN or Inf: its LoRA factors hold non-finite values in the input"
        )
    if not finite.all():
        raise errors.NumericsError(
            f"merging {pair.kernel.name} produced NaN or Inf from finite LoRA factors: the kernel holds non-finite "
            f"values, or the update overflows float32 or {pair.out_dtype.name} (factors this large are a broken "
            "fine-tune)"
        )
    rounding = {
        "changed_fraction": float(changed.mean()),  # Every layer has the same size.
        "rounding_loss": float(
            np.sqrt(lost_sq.sum(dtype=np.float64)) / max(np.sqrt(update_sq.sum(dtype=np.float64)), 1e-30)
        ),
    }
    if not verified:
        return Check(pair, None, None, **rounding)
    relative_error = float(max_diff.max() / max(max_output.max(), 1e-30))
    check = Check(pair, relative_error, float(bound_ratio.max()), **rounding)
    if not check.bound_ratio <= 1.0:
        raise errors.NumericsError(
            f"verification failed for {pair.kernel.name}: the merged kernel differs from the LoRA path by "
            f"{check.bound_ratio:.3g}x what {pair.out_dtype.name} rounding explains (relative error of the update "
            f"{check.relative_error:.3g})"
        )
    return check


@functools.cache
def _placement(
    stacked: jax.sharding.Sharding,
    layer: jax.sharding.Sharding,
    taken: jax.sharding.Sharding,
    replicated: jax.sharding.Sharding,
) -> tuple[Callable, Callable]:
    """(take, write): a layer of the kernel placed ``stacked``, as ``taken``; and writing a layer placed ``layer``."""
    return (
        jax.jit(_take_layer, in_shardings=(stacked, replicated), out_shardings=taken),
        jax.jit(_write_layer, donate_argnums=0, in_shardings=(stacked, layer, replicated), out_shardings=stacked),
    )


@functools.cache
def _zeros(shape: tuple[int, ...], dtype: np.dtype, where: jax.sharding.Sharding) -> Callable:
    return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=where)


def _whole_on(x: jax.Array | np.ndarray, device: jax.Device) -> jax.Array:
    """``x`` whole on ``device``: a replicated array's own copy there, else a transfer (host arrays: a copy)."""
    if isinstance(x, jax.Array) and x.is_fully_replicated:
        for shard in x.addressable_shards:
            if shard.device == device:
                return shard.data
    return jax.device_put(x, device)


def _place_layer(layer: jax.Array, where: jax.sharding.Sharding) -> jax.Array:
    """A single-device ``layer`` placed ``where``: each of this process's devices gets its block, copied from it."""
    if isinstance(where, jax.sharding.SingleDeviceSharding):
        return jax.device_put(layer, where)
    blocks = where.addressable_devices_indices_map(layer.shape)
    return jax.make_array_from_single_device_arrays(
        layer.shape, where, [jax.device_put(layer[index], device) for device, index in blocks.items()]
    )


def _fusing_device(layout: sharding.Layout) -> jax.Device:
    """The layout's device if this process has it, else this process's first device of the mesh."""
    if layout.device.process_index == jax.process_index():
        return layout.device
    return next(d for d in layout.mesh.devices.flat if d.process_index == jax.process_index())


def _place(x: jax.Array | np.ndarray, where: jax.sharding.Sharding) -> jax.Array:
    """A host array as a jax.Array placed ``where`` (the same values on every process); jax.Arrays stay as they are."""
    if isinstance(x, jax.Array):
        return x
    return jax.make_array_from_callback(x.shape, where, lambda index: x[index])


def fuse_pair(
    pair: plan.Pair,
    kernel: jax.Array,
    lora_a: jax.Array,
    lora_b: jax.Array,
    layout: sharding.Layout,
    *,
    verify: bool = True,
    seed: int = 0,
) -> tuple[jax.Array, Check]:
    """Returns ``kernel + scale * dW(A, B)`` in the pair's output dtype, and the verification result if asked.

    ``kernel`` is consumed: its buffer becomes the merged kernel when the dtype is kept. Raises NumericsError on NaN
    or Inf, or when the merged kernel's outputs differ from the LoRA path's by more than rounding explains.
    """
    device = _fusing_device(layout)
    fuser = layer_fuser(pair, verify=verify, seed=seed, device=device)
    stacked, replicated = layout.sharding(pair.kernel), layout.replicated
    layer_where = layout.layer_sharding(pair.kernel, pair.batch_ndim)
    # One process: a layer is taken block by block where it lies and copied whole to the fusing device (one layer of
    # temporaries); several processes: gathered onto every device, as JAX moves data across processes only in programs.
    taken = layer_where if jax.process_count() == 1 else replicated
    compile_cache.check_donation_safe()  # ``write`` donates the stacked kernel.
    take, write = _placement(stacked, layer_where, taken, replicated)
    kernel = _place(kernel, stacked)
    # The factors on the host, fetched once per pair (this process's own copy): small, and numpy slices of a layer
    # cost no compiled step of their own.
    lora_a, lora_b = (np.asarray(_whole_on(x, device)) for x in (lora_a, lora_b))
    in_place = np.dtype(kernel.dtype) == pair.out_dtype
    target = kernel if in_place else _zeros(pair.kernel.shape, pair.out_dtype, stacked)()
    for index in np.ndindex(pair.kernel.shape[: pair.batch_ndim]):
        layer = take(target if in_place else kernel, index)
        stored = fuser.fuse(index, layer, lora_a[index], lora_b[index])
        target = write(target, _place_layer(stored, layer_where), index)
    return target, fuser.finish()


def worst_by_kind(checks: list[Check]) -> dict[str, dict[str, dict[str, float]]]:
    """The worst verification result per expert and module kind: ``{expert: {kind: {measure: worst}}}``."""
    worst: dict[str, dict[str, dict[str, float]]] = {}
    for check in checks:
        if not check.verified:
            continue
        kind = worst.setdefault(check.pair.expert, {}).setdefault(
            check.pair.kind.name, {"relative_error": 0.0, "bound_ratio": 0.0}
        )
        kind["relative_error"] = max(kind["relative_error"], check.relative_error)
        kind["bound_ratio"] = max(kind["bound_ratio"], check.bound_ratio)
    return worst


def fuse_all(
    merge_plan: plan.Plan, params: Params, layout: sharding.Layout, *, verify: bool, on_pair=None
) -> tuple[Params, list[Check]]:
    """Replaces every paired kernel in ``params`` by its merged kernel and drops the LoRA leaves.

    ``on_pair(pair)`` is called after each pair, for progress reporting.
    """
    checks = []
    for index, pair in enumerate(merge_plan.pairs):
        kernel = params.pop(pair.kernel.path)
        lora_a, lora_b = params.pop(pair.lora_a.path), params.pop(pair.lora_b.path)
        params[pair.kernel.path], check = fuse_pair(pair, kernel, lora_a, lora_b, layout, verify=verify, seed=index)
        checks.append(check)
        if on_pair is not None:
            on_pair(pair)
    return params, checks
