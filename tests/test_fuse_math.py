"""The merged kernel reproduces openpi's LoRA forward pass, module by module, on random data.

The LoRA forward passes below are written out by hand from openpi's lora.py (Einsum: eqn_a and eqn_b with the rank
label L in place of one kernel axis each, scaled by alpha/rank or alpha/sqrt(rank); FeedForward: unscaled plain dots),
independently of the equations openpi_merge derives. Everything is compared in float64.
"""

import dataclasses
import math

import ml_dtypes
import numpy as np
import pytest
from reference import assert_rounds_to, merged_kernel

from openpi_merge import config, fuse, lora, openpi_layout, plan, sharding

DEPTH = 3
RNG = np.random.default_rng(0)


def _einsum_forward(eqn_a, eqn_b, eqn):
    def forward(x, w, a, b, scale):
        return np.einsum(eqn, x, w) + scale * np.einsum(eqn_b, np.einsum(eqn_a, x, a), b)

    return forward


def _gating_forward(x, w, a, b, scale):
    assert scale == 1.0  # FeedForward LoRA is unscaled: the plan must say so.
    return np.stack([x @ w[i] + (x @ a[i]) @ b[i] for i in range(2)])


def _linear_forward(x, w, a, b, scale):
    assert scale == 1.0
    return x @ w + (x @ a) @ b


def _merged_forward(eqn):
    return lambda x, w: np.einsum(eqn, x, w)


# (module, kernel leaf, per-layer kernel shape, x shape, LoRA forward, merged forward); 'c' stands for openpi's 2 / 3.
N, K, D, H, F = 4, 1, 6, 5, 7
CASES = {
    "q_einsum": (
        "q_einsum",
        "w",
        (N, D, H),
        (2, 3, D),
        _einsum_forward("BTD,NDL->BTNL", "BTNL,NLH->BTNH", "BTD,NDH->BTNH"),
        _merged_forward("BTD,NDH->BTNH"),
    ),
    "kv_einsum": (
        "kv_einsum",
        "w",
        (2, K, D, H),
        (2, 3, D),
        _einsum_forward("BSD,cKDL->cBSKL", "cBSKL,cKLH->cBSKH", "BSD,cKDH->cBSKH"),
        _merged_forward("BSD,cKDH->cBSKH"),
    ),
    "qkv_einsum": (
        "qkv_einsum",
        "w",
        (3, N, D, H),
        (2, 3, D),
        _einsum_forward("BSD,cKDL->cBSKL", "cBSKL,cKLH->cBSKH", "BSD,cKDH->cBSKH"),
        _merged_forward("BSD,cKDH->cBSKH"),
    ),
    "attn_vec_einsum": (
        "attn_vec_einsum",
        "w",
        (N, H, D),
        (2, 3, N, H),
        _einsum_forward("BTNH,NHL->BTL", "BTL,NLD->BTD", "BTNH,NHD->BTD"),
        _merged_forward("BTNH,NHD->BTD"),
    ),
    "mlp/gating_einsum": (
        "mlp",
        "gating_einsum",
        (2, D, F),
        (2, 3, D),
        _gating_forward,
        _merged_forward("BTD,cDF->cBTF"),
    ),
    "mlp/linear": ("mlp", "linear", (F, D), (2, 3, F), _linear_forward, _merged_forward("BTF,FD->BTD")),
}


def _settings(**paligemma):
    """Settings for a single-expert model (pi0-FAST), with overrides of its LoRA settings."""
    cfg = config.make_config("pi0_fast")
    cfg.input, cfg.output = "in", "out"
    cfg.paligemma.update(paligemma)
    return config.read_settings(cfg)


def _merge_case(kind_name, rank, settings, lora_axes=(-2, -1), suffix=""):
    """Random kernel and factors for one module (with a depth axis), planned and fused by openpi_merge."""
    module, _, shape, _, _, _ = CASES[kind_name]
    kind = next(k for k in openpi_layout.MODULE_KINDS if k.name == kind_name)
    axes = lora_axes if kind.scaled else lora.FEEDFORWARD_AXES
    shape_a, shape_b = lora.factor_shapes(shape, axes, rank)
    arrays = {
        kind.kernel: RNG.normal(size=(DEPTH, *shape)).astype(np.float32),
        kind.lora_a: RNG.normal(size=(DEPTH, *shape_a)).astype(np.float32),
        kind.lora_b: RNG.normal(size=(DEPTH, *shape_b)).astype(np.float32),
    }
    root = ("PaliGemma", "llm", "layers", "mlp" if module == "mlp" else "attn", module + suffix)
    leaves = {(*root, name): plan.Leaf((*root, name), a.shape, a.dtype) for name, a in arrays.items()}
    (pair,) = plan.make_plan(leaves, settings).pairs
    merged, _ = fuse.fuse_pair(
        pair, *(arrays[name] for name in (kind.kernel, kind.lora_a, kind.lora_b)), sharding.single_device()
    )
    return pair, arrays[kind.kernel], arrays[kind.lora_a], arrays[kind.lora_b], np.asarray(merged)


def _assert_reproduces_forward(kind_name, pair, w, a, b, merged, lora_forward=None):
    _, _, _, x_shape, default_lora_forward, merged_forward = CASES[kind_name]
    lora_forward = lora_forward or default_lora_forward
    for layer in range(DEPTH):
        x = RNG.normal(size=x_shape)
        want = lora_forward(x, w[layer].astype(np.float64), a[layer], b[layer], pair.scale)
        got = merged_forward(x, merged[layer].astype(np.float64))
        # merged is float32, so it carries float32 rounding of W + s*dW; the LoRA path in float64 carries none.
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("kind_name", list(CASES))
def test_merged_kernel_reproduces_lora_forward(kind_name):
    pair, *arrays = _merge_case(kind_name, rank=16, settings=_settings())
    _assert_reproduces_forward(kind_name, pair, *arrays)


@pytest.mark.parametrize("kind_name", list(CASES))
def test_custom_alpha_and_rslora(kind_name):
    pair, *arrays = _merge_case(kind_name, rank=8, settings=_settings(alpha=7.0, rslora=True))
    kind = pair.kind
    assert pair.scale == (7.0 / math.sqrt(8) if kind.scaled else 1.0)
    _assert_reproduces_forward(kind_name, pair, *arrays)


@pytest.mark.parametrize("kind_name", list(CASES))
def test_rank_equal_to_a_kernel_dimension(kind_name):
    pair, *arrays = _merge_case(kind_name, rank=D, settings=_settings(alpha=3.0))
    _assert_reproduces_forward(kind_name, pair, *arrays)


def test_custom_lora_axes():
    # LoRA on (N, H) of q_einsum instead of openpi's default (D, H): B's D axis is summed inside eqn_b alone.
    pair, *arrays = _merge_case("q_einsum", rank=16, settings=_settings(lora_axes=(-3, -1)), lora_axes=(-3, -1))
    forward = _einsum_forward("BTD,NDL->BTNL", "BTNL,LDH->BTNH", "BTD,NDH->BTNH")
    _assert_reproduces_forward("q_einsum", pair, *arrays, lora_forward=forward)


def test_action_expert_scale_uses_its_own_variant():
    cfg = config.make_config("pi0")
    cfg.input, cfg.output, cfg.paligemma.variant = "in", "out", "gemma_2b"
    settings = config.read_settings(cfg)
    pair, *arrays = _merge_case("q_einsum", rank=32, settings=settings, suffix="_1")
    assert (pair.expert, pair.alpha, pair.scale) == ("action_expert", 32.0, 1.0)
    _assert_reproduces_forward("q_einsum", pair, *arrays)


def test_per_head_merge_of_attn_vec_would_be_wrong():
    """Guards the test itself: the tempting per-head product A[n] @ B[n] must not pass as the right answer."""
    pair, w, a, b, merged = _merge_case("attn_vec_einsum", rank=16, settings=_settings())
    per_head = w + pair.scale * np.einsum("lnhr,lnrd->lnhd", a, b)
    with pytest.raises(AssertionError):
        _assert_reproduces_forward("attn_vec_einsum", pair, w, a, b, per_head)
    assert not np.allclose(merged, per_head)


def test_bfloat16_kernel_merges_to_the_rounded_float64_reference():
    pair, w, a, b, _ = _merge_case("q_einsum", rank=16, settings=_settings())
    w16 = w.astype(ml_dtypes.bfloat16)
    bf16_pair = dataclasses.replace(pair, kernel=dataclasses.replace(pair.kernel, dtype=w16.dtype), out_dtype=w16.dtype)
    merged = np.asarray(fuse.fuse_pair(bf16_pair, w16, a, b, sharding.single_device())[0])
    params = {("q_einsum", "w"): w16, ("q_einsum", "lora_a"): a, ("q_einsum", "lora_b"): b}
    assert merged.dtype == ml_dtypes.bfloat16
    assert_rounds_to(merged, *merged_kernel(params, ("q_einsum", "w"), alpha=16.0))


def test_each_layer_is_written_into_the_kernel_without_copying_it():
    """The per-layer write must update the donated kernel in place. A kernel-sized copy or float32 image per layer
    costs a full pass over the kernel per layer: 18 x 2.4 GB for PaliGemma's gating_einsum."""
    pair, w, _, _, _ = _merge_case("mlp/gating_einsum", rank=16, settings=_settings())
    w16 = w.astype(ml_dtypes.bfloat16)
    layout = sharding.single_device()
    layer = layout.layer_sharding(pair.kernel, pair.batch_ndim)
    _, write = fuse._placement(layout.sharding(pair.kernel), layer, layer, layout.replicated)
    hlo = write.lower(w16, w16[0], (np.int32(0),)).compile().as_text()
    shape = ",".join(map(str, w16.shape))
    assert not [line for line in hlo.splitlines() if f"[{shape}]" in line and " copy(" in line]
    # Nor a float32 image of the whole kernel (XLA's CPU backend widens a bfloat16 update across its whole target).
    assert f"f32[{shape}]" not in hlo
