"""Float64 reference for what a merge should write, and the check that a written value is that reference, rounded."""

import numpy as np

F32_UNIT_ROUNDOFF = 2.0**-24

# The kernel update dW of each module kind in float64, written out from openpi's LoRA forward pass ("..." is the
# scanned depth axis). attn_vec_einsum's LoRA intermediate has no head axis, so B is summed over its heads (m).
UPDATES = {
    ("q_einsum", "w"): "...ndr,...nrh->...ndh",
    ("kv_einsum", "w"): "...ckdr,...ckrh->...ckdh",
    ("qkv_einsum", "w"): "...ckdr,...ckrh->...ckdh",
    ("attn_vec_einsum", "w"): "...nhr,...mrd->...nhd",
    ("mlp", "gating_einsum"): "...cdr,...crf->...cdf",
    ("mlp", "linear"): "...fr,...rd->...fd",
}


def lora_paths(kernel_path: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """openpi's names of a kernel's LoRA factors."""
    prefix = "" if kernel_path[-1] == "w" else kernel_path[-1] + "_"
    return (*kernel_path[:-1], f"{prefix}lora_a"), (*kernel_path[:-1], f"{prefix}lora_b")


def merged_kernel(
    params: dict, kernel_path: tuple[str, ...], alpha: float, *, rslora: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``W + s * dW`` in float64 for a kernel of a flat LoRA param dict, and a bound on float32 arithmetic error.

    The bound is the textbook one for what the merge computes in float32: a sum of ``terms`` products (error up to
    ``terms`` unit roundoffs of the sum of magnitudes), the scaling, and the addition to W.
    """
    module, leaf = kernel_path[-2].removesuffix("_1"), kernel_path[-1]
    a_path, b_path = lora_paths(kernel_path)
    a, b = params[a_path].astype(np.float64), params[b_path].astype(np.float64)
    rank = a.shape[-1]
    scale = 1.0 if module == "mlp" else (alpha / np.sqrt(rank) if rslora else alpha / rank)
    equation = UPDATES[(module, leaf)]
    merged = params[kernel_path].astype(np.float64) + scale * np.einsum(equation, a, b)
    terms = rank * (b.shape[-3] if module == "attn_vec_einsum" else 1)
    magnitude = abs(scale) * np.einsum(equation, np.abs(a), np.abs(b))
    return merged, F32_UNIT_ROUNDOFF * ((terms + 2) * magnitude + np.abs(merged))


def assert_rounds_to(got: np.ndarray, reference: np.ndarray, f32_error: np.ndarray) -> None:
    """Asserts ``got`` is the float64 ``reference`` rounded once to got's dtype, up to float32 arithmetic.

    Every element may be off the exact value by ``f32_error`` (the float32 computation) plus one rounding to the output
    dtype. For a bfloat16 output that means equal to the rounded reference except, rarely, one ulp away where the
    exact value sits within float32 noise of a rounding boundary.
    """
    want = reference.astype(got.dtype)
    spacing = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    ulp = spacing * (2**16 if got.dtype.name == "bfloat16" else 1)  # bfloat16 keeps 8 of float32's 24 bits.
    distance = np.abs(got.astype(np.float64) - reference)
    assert np.all(distance <= f32_error + ulp), f"off the reference by up to {(distance / ulp).max():.2f} ulp"
    if got.dtype.name == "bfloat16":
        off = got != want
        assert off.mean() <= 1e-3, f"{off.mean():.3%} of values are not the rounded reference"
