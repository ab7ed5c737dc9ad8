"""Folds LoRA factors into their kernels in float32 under ``jax.jit``, on whatever backend JAX defaults to."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from openpi_merge import errors, plan

Params = dict[plan.Path, jax.Array]


def _fuse_layer(kernel, lora_a, lora_b, *, equation: str, scale: float, out_dtype: np.dtype):
    # HIGHEST: on GPU and TPU the default float32 einsum may run in reduced precision (TF32, bf16 passes).
    delta = jnp.einsum(equation, lora_a.astype(jnp.float32), lora_b.astype(jnp.float32), precision="highest")
    merged = kernel.astype(jnp.float32) + scale * delta
    return merged.astype(out_dtype), jnp.all(jnp.isfinite(merged))


def _fuse(kernel, lora_a, lora_b, *, equation: str, scale: float, out_dtype: np.dtype, batch_ndim: int):
    """Fuses one stacked kernel layer by layer, so temporaries stay the size of one layer."""
    fuse_layer = functools.partial(_fuse_layer, equation=equation, scale=scale, out_dtype=out_dtype)
    if batch_ndim == 0:
        return fuse_layer(kernel, lora_a, lora_b)
    batch_shape = kernel.shape[:batch_ndim]
    stacked = [x.reshape((math.prod(batch_shape), *x.shape[batch_ndim:])) for x in (kernel, lora_a, lora_b)]
    merged, finite = jax.lax.map(lambda xs: fuse_layer(*xs), tuple(stacked))
    return merged.reshape(kernel.shape), jnp.all(finite)


_STATIC = ("equation", "scale", "out_dtype", "batch_ndim")
# Donating the kernel lets the merged kernel reuse its buffer when the dtype is kept: no second copy of the tree.
_fuse_in_place = jax.jit(_fuse, static_argnames=_STATIC, donate_argnums=0)
_fuse_to_new = jax.jit(_fuse, static_argnames=_STATIC)


def fuse_pair(pair: plan.Pair, kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
    """Returns ``kernel + scale * dW(A, B)`` in the pair's output dtype; raises NumericsError on NaN or Inf."""
    fuse = _fuse_in_place if np.dtype(kernel.dtype) == pair.out_dtype else _fuse_to_new
    merged, finite = fuse(
        kernel,
        lora_a,
        lora_b,
        equation=pair.update_equation,
        scale=pair.scale,
        out_dtype=pair.out_dtype,
        batch_ndim=pair.batch_ndim,
    )
    if not bool(finite):
        raise errors.NumericsError(f"merging {pair.kernel.name} produced NaN or Inf: the input holds non-finite values")
    return merged


def fuse_all(merge_plan: plan.Plan, params: Params) -> Params:
    """Replaces every paired kernel in ``params`` by its merged kernel and drops the LoRA leaves."""
    for pair in merge_plan.pairs:
        kernel = params.pop(pair.kernel.path)
        lora_a, lora_b = params.pop(pair.lora_a.path), params.pop(pair.lora_b.path)
        params[pair.kernel.path] = fuse_pair(pair, kernel, lora_a, lora_b)
    return params
