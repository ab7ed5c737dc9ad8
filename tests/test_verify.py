"""The fuse's verification: one probe of the update per layer, blocked sums, and an element-wise check of the store.

Faults are planted into what the fuse's step hands to ``fuse._verify_layer`` (the update it computed, the merged sum,
the stored kernel), one layer of each pi0 module kind at its full width: those are the sizes where float32 rounding
of the probes is largest next to a fault.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openpi_merge import config, fuse, plan
from openpi_merge.testing import synthetic


@functools.cache
def _full_width_pairs() -> dict[str, plan.Pair]:
    """One layer of each of pi0's PaliGemma LoRA pairs at full size (gemma_2b: width 2048, mlp 16384, 8 heads)."""
    cfg = config.make_config("pi0")
    cfg.input, cfg.output = "in", "out"
    leaves = {}
    for name, spec in synthetic.param_specs("pi0", "full").items():
        if name.startswith("PaliGemma/llm/layers/"):
            path = tuple(name.split("/"))
            leaves[path] = plan.Leaf(path, (1, *spec.shape[1:]), spec.dtype)
    pairs = plan.make_plan(leaves, config.read_settings(cfg)).pairs
    return {pair.kind.name: pair for pair in pairs if pair.expert == "paligemma"}


def _layer(pair: plan.Pair, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A bfloat16 kernel with openpi's init scale and float32 factors of a fine-tune's size, for one layer."""

    def shape(leaf):
        return leaf.shape[pair.batch_ndim :]

    fan_in = int(np.prod(shape(pair.kernel)[:-1]))
    kernel = rng.standard_normal(shape(pair.kernel), np.float32) * np.float32(fan_in**-0.5)
    return {
        "kernel": kernel.astype(pair.kernel.dtype).astype(np.float32),
        "lora_a": rng.standard_normal(shape(pair.lora_a), np.float32) * np.float32(0.02),
        "lora_b": rng.standard_normal(shape(pair.lora_b), np.float32) * np.float32(0.02),
    }


@functools.partial(jax.jit, static_argnums=(0, 1))
def _ratio(step, fault: str, probes, kernel, lora_a, lora_b, amount):
    """The bound ratio ``_verify_layer`` gives one layer whose fuse went wrong by ``fault`` (``amount`` of it)."""
    update = step.scale * fuse._einsum(step.update_equation, lora_a, lora_b)
    if fault == "update_error":  # The update off by a factor 1 + amount, stored consistently: a wrong scale.
        update = update * (1 + amount)
    elif fault == "transposed_b":  # B's two trailing axes swapped (square here), stored consistently.
        update = step.scale * fuse._einsum(step.update_equation, lora_a, jnp.swapaxes(lora_b, -1, -2))
    elif fault == "update_element":  # One element of the update off by ``amount``, stored consistently.
        update = update.reshape(-1).at[update.size // 3].add(amount).reshape(update.shape)
    merged = kernel + update
    stored = merged.astype(step.out_dtype).astype(jnp.float32)
    if fault == "stored_element":  # One element of the stored kernel one bfloat16 ulp off (its last mantissa bit).
        flat = stored.reshape(-1).astype(jnp.bfloat16)
        bits = jax.lax.bitcast_convert_type(flat[stored.size // 3], jnp.uint16) ^ jnp.uint16(1)
        stored = flat.at[stored.size // 3].set(jax.lax.bitcast_convert_type(bits, jnp.bfloat16))
        stored = stored.astype(jnp.float32).reshape(merged.shape)
    _, _, probed, store = fuse._verify_layer(step, probes, lora_a, lora_b, update, merged, stored)
    return jnp.maximum(probed, store)


def _bound_ratio(kind: str, fault: str, amount: float = 0.0, seed: int = 0) -> float:
    pair = _full_width_pairs()[kind]
    step = fuse._make_step(pair, verify=True)
    rng = np.random.default_rng(seed)
    layer = _layer(pair, rng)
    probes = rng.standard_normal(step.probe_shape, np.float32)
    return float(_ratio(step, fault, probes, layer["kernel"], layer["lora_a"], layer["lora_b"], amount))


KINDS = ["q_einsum", "kv_einsum", "attn_vec_einsum", "mlp/gating_einsum", "mlp/linear"]


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_rounding_of_a_right_merge_passes_at_full_width(kind):
    assert _bound_ratio(kind, "none") <= 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_an_update_one_percent_off_fails_at_full_width(kind):
    # Measured 2026-12-03: 4.6 (mlp/linear, n = 16384) to 31 (kv_einsum); the old three-product check gave 0.07 here.
    assert _bound_ratio(kind, "update_error", 0.01) > 1.0


def test_a_wrong_scale_fails():
    assert _bound_ratio("q_einsum", "update_error", 0.25) > 1.0


def test_a_transposed_factor_fails():
    # No full-width factor is square, so the pair is small with rank = width: B's transpose has B's own shape.
    pair = _square_pair()
    step = fuse._make_step(pair, verify=True)
    rng = np.random.default_rng(1)
    layer = _layer(pair, rng)
    probes = rng.standard_normal(step.probe_shape, np.float32)
    args = (probes, layer["kernel"], layer["lora_a"], layer["lora_b"], 0.0)
    assert float(_ratio(step, "none", *args)) <= 1.0
    assert float(_ratio(step, "transposed_b", *args)) > 1.0


def _square_pair() -> plan.Pair:
    """mlp/linear with rank equal to the width (64), so B is square and can be transposed in place."""
    cfg = config.make_config("pi0")
    cfg.input, cfg.output = "in", "out"
    root = ("PaliGemma", "llm", "layers", "mlp")
    shapes = {"linear": (1, 256, 64), "linear_lora_a": (1, 256, 64), "linear_lora_b": (1, 64, 64)}
    leaves = {(*root, n): plan.Leaf((*root, n), s, np.dtype(np.float32)) for n, s in shapes.items()}
    leaves[(*root, "linear")] = plan.Leaf((*root, "linear"), shapes["linear"], np.dtype(jnp.bfloat16))
    (pair,) = plan.make_plan(leaves, config.read_settings(cfg)).pairs
    return pair


@pytest.mark.parametrize("kind", ["q_einsum", "mlp/linear"])
def test_one_wrong_element_of_the_update_fails(kind):
    assert _bound_ratio(kind, "update_element", 1.0) > 1.0


@pytest.mark.parametrize("kind", ["q_einsum", "mlp/linear"])
def test_one_flipped_bit_of_the_stored_kernel_fails(kind):
    assert _bound_ratio(kind, "stored_element") > 1.0


def test_blocked_contraction_sums_about_sqrt_n_terms_per_stage():
    step = fuse._make_step(_full_width_pairs()["mlp/linear"], verify=True)
    assert (step.forward.blocks, step.forward.terms) == (128, 255)  # n = 16384: 128 blocks of 128, not one sum.
    assert step.lora_a.blocks == 128


def test_blocked_contraction_is_within_its_bound_of_the_exact_sum():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 4, 4096), np.float32)
    y = rng.standard_normal((4096, 96), np.float32)
    blocked = fuse._blocked("BTD,DF->BTF", {"B": 1, "T": 4, "D": 4096, "F": 96})
    assert blocked.blocks == 64
    got = np.asarray(jax.jit(lambda a, b: fuse._blocked_einsum(blocked, a, b))(x, y), np.float64)
    exact = np.einsum("BTD,DF->BTF", x.astype(np.float64), y.astype(np.float64))
    magnitude = np.einsum("BTD,DF->BTF", np.abs(x).astype(np.float64), np.abs(y).astype(np.float64))
    assert np.all(np.abs(got - exact) <= fuse._gamma(blocked.terms) * magnitude)
    assert not np.array_equal(got, exact)  # float32 sums: the bound is what is checked, not a copy of float64.
