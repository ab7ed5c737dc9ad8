"""The PyTorch export (openpi_merge.torch_export).

Two tiers. The numpy tier runs in the normal suite: the key set, shapes and dtypes read off tiny synthetic trees, the
numpy proof passing and failing on planted faults, pi0-FAST refused, the file written and read back. The framework
tier needs openpi's source and its PyTorch stack (scripts/torch_tier.sh builds it) and skips with the reason where
they are absent: openpi's own ``load_pytorch`` loads the export of a merged small LoRA checkpoint strictly, and its
``sample_actions`` match openpi's JAX ``Pi0`` with the LoRA config on the unmerged checkpoint.
"""

import json
import os
import pathlib
import re

import helpers
import ml_dtypes
import numpy as np
import openpi_torch
import pytest

from openpi_merge import config, errors, framework_check, pipeline, report
from openpi_merge import torch_export as te
from openpi_merge.openpi_layout import is_lora_leaf

BF16, F32 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)
VLM = "paligemma_with_expert.paligemma.model."
LM = VLM + "language_model."
EXPERT = "paligemma_with_expert.gemma_expert.model."
VISION = VLM + "vision_tower.vision_model."


def base_tree(step_dir: pathlib.Path) -> dict[tuple[str, ...], np.ndarray]:
    """A checkpoint's tree without its LoRA leaves: the shapes and dtypes of its merge (values do not matter here)."""
    return {p: a for p, a in helpers.restore_flat(step_dir / "params").items() if not is_lora_leaf(p)}


@pytest.fixture(scope="module")
def trees(tiny_checkpoint):
    cache = {}

    def get(model: str, **kwargs) -> dict:
        key = (model, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = base_tree(tiny_checkpoint(model, **kwargs))
        return cache[key]

    return get


# --- numpy tier ---------------------------------------------------------------------------------------------------


def _gemma_keys(prefix: str, depth: int, adarms: bool) -> set[str]:
    keys = set()
    norms = ("dense.weight", "dense.bias") if adarms else ("weight",)
    for i in range(depth):
        layer = f"{prefix}layers.{i}."
        keys |= {f"{layer}self_attn.{n}_proj.weight" for n in "qkvo"}
        keys |= {f"{layer}mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
        keys |= {f"{layer}{norm}.{w}" for norm in ("input_layernorm", "post_attention_layernorm") for w in norms}
    return keys | {f"{prefix}norm.{w}" for w in norms}


def _siglip_keys(depth: int) -> set[str]:
    keys = {f"{VISION}embeddings.patch_embedding.{w}" for w in ("weight", "bias")}
    keys |= {f"{VISION}embeddings.position_embedding.weight", f"{VLM}multi_modal_projector.linear.weight"}
    keys |= {f"{VISION}post_layernorm.{w}" for w in ("weight", "bias")} | {f"{VLM}multi_modal_projector.linear.bias"}
    for i in range(depth):
        layer = f"{VISION}encoder.layers.{i}."
        for module in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2", *(f"self_attn.{n}_proj" for n in "qkv")):
            keys |= {f"{layer}{module}.weight", f"{layer}{module}.bias"}
        keys |= {f"{layer}self_attn.out_proj.weight", f"{layer}self_attn.out_proj.bias"}
    return keys


@pytest.mark.parametrize("model", ["pi0", "pi05"])
@pytest.mark.parametrize("fused_qkv", [False, True])
def test_keys_shapes_and_dtypes_follow_the_tree(trees, model, fused_qkv):
    tree = trees(model, fused_qkv=fused_qkv)
    sd = te.state_dict(tree, model)
    projections = ["action_in_proj", "action_out_proj"]
    projections += (
        ["time_mlp_in", "time_mlp_out"]
        if model == "pi05"
        else ["state_proj", "action_time_mlp_in", "action_time_mlp_out"]
    )
    want = _siglip_keys(2) | _gemma_keys(LM, 2, adarms=False) | _gemma_keys(EXPERT, 2, adarms=model == "pi05")
    want |= {f"{LM}embed_tokens.weight", "paligemma_with_expert.gemma_expert.lm_head.weight"}
    want |= {f"{p}.{w}" for p in projections for w in ("weight", "bias")}
    assert set(sd) == want

    # Shapes from the tree's own dims: the tiny action expert has 4 heads x 16 = 64 != its width 32.
    llm = ("PaliGemma", "llm", "layers")
    vocab, width = tree[("PaliGemma", "llm", "embedder", "input_embedding")].shape
    _, expert_heads, head_dim, expert_width = tree[(*llm, "attn", "attn_vec_einsum_1", "w")].shape
    assert expert_heads * head_dim != expert_width
    kv_heads = 4 if fused_qkv else 1
    mlp_dim = tree[(*llm, "mlp_1", "gating_einsum")].shape[-1]
    layer = f"{EXPERT}layers.1."
    assert sd[f"{layer}self_attn.q_proj.weight"].shape == (expert_heads * head_dim, expert_width)
    assert sd[f"{layer}self_attn.k_proj.weight"].shape == (kv_heads * head_dim, expert_width)
    assert sd[f"{layer}self_attn.o_proj.weight"].shape == (expert_width, expert_heads * head_dim)
    assert sd[f"{layer}mlp.gate_proj.weight"].shape == (mlp_dim, expert_width)
    assert sd[f"{layer}mlp.down_proj.weight"].shape == (expert_width, mlp_dim)
    assert sd[f"{LM}embed_tokens.weight"].shape == (vocab, width)
    assert sd["paligemma_with_expert.gemma_expert.lm_head.weight"].shape == (vocab, expert_width)
    assert not np.any(sd["paligemma_with_expert.gemma_expert.lm_head.weight"])
    patch = tree[("PaliGemma", "img", "embedding", "kernel")].shape
    assert sd[f"{VISION}embeddings.patch_embedding.weight"].shape == (patch[3], patch[2], patch[0], patch[1])
    if model == "pi05":
        assert sd[f"{layer}input_layernorm.dense.weight"].shape == (3 * expert_width, expert_width)
        assert sd[f"{EXPERT}norm.dense.bias"].shape == (3 * expert_width,)

    # dtypes: openpi's bfloat16 PI0Pytorch keeps the patch/position embeddings, every Gemma norm and the projections
    # in float32; everything else is bfloat16. float32: all float32.
    for key, tensor in sd.items():
        keep = any(s in key for s in ("patch_embedding", "position_embedding", "layernorm", "model.norm")) or (
            not key.startswith("paligemma_with_expert.")
        )
        assert tensor.dtype == (F32 if keep and "post_layernorm" not in key else BF16), key
        assert tensor.flags.c_contiguous, key
    assert {t.dtype for t in te.state_dict(tree, model, "float32").values()} == {F32}
    assert {k: (v.shape, v.dtype) for k, v in sd.items()} == te.expected(tree, model)


@pytest.mark.parametrize("model", ["pi0", "pi05"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_check_passes_and_reports_per_kind(trees, model, dtype):
    tree = trees(model)
    report = te.check(te.state_dict(tree, model, dtype), tree, model)
    kinds = {"attention", "mlp", "norm", "siglip", "projection", "patch_conv", "embedding", "unused"}
    assert set(report) == kinds | ({"adarms"} if model == "pi05" else set())
    for stats in report.values():
        assert stats["bound_ratio"] <= 1
        assert stats["rounding_ratio"] <= 1
    # SigLIP is float32 in the tree: bfloat16 rounds it, float32 stores it exactly.
    if dtype == "bfloat16":
        assert 1e-4 < report["siglip"]["max_rel_error"] < 2**-7
    else:
        assert report["siglip"]["max_rel_error"] < 1e-12


def _transpose(t, key):
    t[key] = np.ascontiguousarray(t[key].T)


def _flip(t, key):
    t[key] = t[key].copy()
    t[key][3, 5] = -t[key][3, 5]


FAULTS = {
    "transposed": lambda t: _transpose(t, f"{VISION}encoder.layers.0.self_attn.q_proj.weight"),  # Square: 32 x 32.
    "k is v's slice": lambda t: t.update(
        {f"{LM}layers.1.self_attn.k_proj.weight": t[f"{LM}layers.1.self_attn.v_proj.weight"]}
    ),
    "gate is up": lambda t: t.update(
        {f"{EXPERT}layers.0.mlp.gate_proj.weight": t[f"{EXPERT}layers.0.mlp.up_proj.weight"]}
    ),
    "layers swapped": lambda t: t.update(
        {
            f"{LM}layers.0.mlp.down_proj.weight": t[f"{LM}layers.1.mlp.down_proj.weight"],
            f"{LM}layers.1.mlp.down_proj.weight": t[f"{LM}layers.0.mlp.down_proj.weight"],
        }
    ),
    "one element flipped": lambda t: _flip(t, f"{LM}layers.0.mlp.up_proj.weight"),
    "patch kernel h<->w": lambda t: t.update(
        {
            f"{VISION}embeddings.patch_embedding.weight": np.ascontiguousarray(
                t[f"{VISION}embeddings.patch_embedding.weight"].transpose(0, 1, 3, 2)
            )
        }
    ),
    "norm off by one": lambda t: t.update({f"{LM}norm.weight": (t[f"{LM}norm.weight"].astype(F32) + 1).astype(F32)}),
    "lm_head not zero": lambda t: t.update(
        {
            "paligemma_with_expert.gemma_expert.lm_head.weight": np.ones_like(
                t["paligemma_with_expert.gemma_expert.lm_head.weight"]
            )
        }
    ),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_check_fails_on_planted_faults(trees, fault, dtype):
    tree = trees("pi0")
    tensors = te.state_dict(tree, "pi0", dtype)
    FAULTS[fault](tensors)
    with pytest.raises(errors.NumericsError, match="does not reproduce the merged tree"):
        te.check(tensors, tree, "pi0")


def test_check_fails_on_adarms_fault(trees):
    tree = trees("pi05")
    tensors = te.state_dict(tree, "pi05")
    key = f"{EXPERT}layers.0.input_layernorm.dense.bias"
    tensors[key] = np.roll(tensors[key], 32)  # scale, shift, gate chunks rotated.
    with pytest.raises(errors.NumericsError, match=r"input_layernorm\.dense \(adarms\)"):
        te.check(tensors, tree, "pi05")


def test_check_refuses_missing_extra_and_misshapen_keys(trees):
    tree = trees("pi0")
    tensors = te.state_dict(tree, "pi0")
    for change, message in (
        (lambda t: t.pop(f"{LM}norm.weight"), "1 missing key"),
        (
            lambda t: t.update({"paligemma_with_expert.paligemma.lm_head.weight": t[f"{LM}embed_tokens.weight"]}),
            "1 unexpected",
        ),
        (lambda t: t.update({f"{LM}norm.weight": t[f"{LM}norm.weight"][:-1]}), "expected (64,)"),
        (lambda t: t.update({f"{LM}norm.weight": t[f"{LM}norm.weight"].astype(np.float16)}), "float16"),
    ):
        changed = dict(tensors)
        change(changed)
        with pytest.raises(errors.NumericsError, match=re.escape(message)):
            te.check(changed, tree, "pi0")


def test_pi0_fast_and_wrong_models_are_refused(trees):
    with pytest.raises(errors.ConfigError, match="openpi has no PyTorch pi0-FAST") as info:
        te.state_dict(trees("pi0_fast"), "pi0_fast")
    assert "\n" not in str(info.value)
    # A pi0-FAST tree named pi0: no action expert.
    with pytest.raises(errors.ConfigError, match="no action expert"):
        te.state_dict(trees("pi0_fast"), "pi0")
    # The layout follows the tree: a pi0 tree is not exported as pi0.5, nor the other way round.
    with pytest.raises(errors.ConfigError, match="model=pi05 but the tree is pi0"):
        te.state_dict(trees("pi0"), "pi05")
    with pytest.raises(errors.ConfigError, match=r"model=pi0 but the tree is pi0\.5"):
        te.expected(trees("pi05"), "pi0")
    unmerged = {**trees("pi0"), ("PaliGemma", "llm", "layers", "mlp", "linear_lora_a"): np.zeros(1)}
    with pytest.raises(errors.ConfigError, match="unmerged tree"):
        te.state_dict(unmerged, "pi0")
    with pytest.raises(errors.ConfigError, match="dtype 'float16'"):
        te.state_dict(trees("pi0"), "pi0", "float16")


def test_write_and_read_back(trees, tmp_path):
    pytest.importorskip("safetensors")
    tree = trees("pi05")
    tensors = te.state_dict(tree, "pi05")
    config = te.config_json(
        action_dim=8,
        action_horizon=10,
        paligemma_variant="gemma_2b",
        action_expert_variant="gemma_300m",
        dtype="bfloat16",
    )
    out = te.write(tmp_path / "export", tensors, config_json=config)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text()) == {
        "action_dim": 8,
        "action_horizon": 10,
        "paligemma_variant": "gemma_2b",
        "action_expert_variant": "gemma_300m",
        "precision": "bfloat16",
    }
    back = te.read(out)
    assert set(back) == set(tensors)
    for key, tensor in tensors.items():
        assert back[key].dtype == tensor.dtype, key
        assert back[key].tobytes() == tensor.tobytes(), key
    te.check(back, tree, "pi05")
    # The header says BF16 (what torch reads as bfloat16) and carries torch's {"format": "pt"} metadata.
    raw = (out / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header["__metadata__"] == {"format": "pt"}
    assert header[f"{LM}embed_tokens.weight"]["dtype"] == "BF16"
    assert header["action_in_proj.weight"]["dtype"] == "F32"


# --- framework tier: openpi's own models ----------------------------------------------------------------------------

_UNAVAILABLE = openpi_torch.available()
framework = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"framework tier: {_UNAVAILABLE}")

# Tolerances on the actions, relative to the largest |action| of openpi's JAX LoRA model: 2 bfloat16 ulps for the
# bfloat16 export (both models compute in bfloat16; measured: under 0.7 ulp), 256 float32 ulps for the float32 one
# (rounding accumulated over 2 layers of 2 experts, SigLIP and 10 Euler steps; measured: under 80). The control must
# miss by more than 10 times the tolerance (measured: 19 times and more).
TOLERANCE = {"bfloat16": 2 * 2.0**-8, "float32": 256 * 2.0**-24}


@pytest.fixture(scope="module")
def openpi_small():
    with openpi_torch.small_variants():
        yield


@pytest.fixture(scope="module")
def lora_run(openpi_small, tmp_path_factory):
    """Per model: the small LoRA checkpoint, its PyTorch exports (bfloat16 and float32) by the CLI, inputs, noise."""
    cache = {}

    def get(model: str) -> dict:
        if model not in cache:
            root = tmp_path_factory.mktemp(f"torch-{model}")
            flat = openpi_torch.lora_checkpoint(model, root / "in" / "1000")
            for dtype, merge_dtype in (("bfloat16", "keep"), ("float32", "float32")):
                result = helpers.run_cli(
                    f"--config=configs/{model}_lora.py",
                    f"--config.input={root / 'in' / '1000'}",
                    f"--config.pytorch_output={root / f'export-{dtype}'}",
                    f"--config.export_dtype={dtype}",
                    f"--config.action_expert.alpha={openpi_torch.EXPERT_LORA['alpha']}",
                    f"--config.dtype={merge_dtype}",
                    "--config.progress=False",
                )
                assert result.returncode == 0, result.stderr
            rng = np.random.default_rng(7)
            noise = rng.standard_normal((2, openpi_torch.ACTION_HORIZON, openpi_torch.ACTION_DIM)).astype(np.float32)
            cache[model] = {"root": root, "lora": flat, "obs": openpi_torch.observation(2), "noise": noise}
        return cache[model]

    return get


@framework
@pytest.mark.parametrize("model", ["pi0", "pi05"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_openpi_loads_the_export_strictly_and_its_actions_match_the_jax_lora_model(lora_run, model, dtype):
    import torch

    run = lora_run(model)
    export = run["root"] / f"export-{dtype}"
    tensors = te.read(export)
    config = openpi_torch.pi0_config(model, dtype)

    # openpi's load_pytorch: safetensors.torch.load_model(PI0Pytorch(config), path), strict (it raises on any missing
    # or unexpected key). Its state dict is exactly ours plus the PaliGemma lm_head tied to embed_tokens.
    policy = openpi_torch.torch_model(config, export / te.SAFETENSORS_FILE)
    own = policy.state_dict()
    assert set(own) == set(tensors) | {"paligemma_with_expert.paligemma.lm_head.weight"}
    for key, tensor in tensors.items():
        assert tuple(own[key].shape) == tensor.shape, key
        assert own[key].dtype == {BF16: torch.bfloat16, F32: torch.float32}[tensor.dtype], key

    lora = run["lora"]
    if dtype == "float32":  # openpi's JAX model in float32 on the same checkpoint, its bfloat16 leaves widened.
        lora = {k: np.asarray(v, np.float32) for k, v in lora.items()}
    want = openpi_torch.jax_actions(config, lora, run["obs"], run["noise"])
    got = openpi_torch.torch_actions(policy, run["obs"], run["noise"])
    scale = float(np.max(np.abs(want)))
    error = float(np.max(np.abs(got - want))) / scale

    # The control: the unmerged checkpoint through the same mapping with its LoRA leaves dropped, as openpi's converter
    # does. It must miss the JAX LoRA model by far more than the tolerance, or the comparison proves nothing.
    control_dir = _control_export(run, model, dtype)
    control = openpi_torch.torch_actions(
        openpi_torch.torch_model(config, control_dir / te.SAFETENSORS_FILE), run["obs"], run["noise"]
    )
    control_error = float(np.max(np.abs(control - want))) / scale
    line = (
        f"torch export {model} {dtype}: max|action| {scale:.3f}, error vs JAX LoRA {error:.2e} (relative), "
        f"tolerance {TOLERANCE[dtype]:.2e}, control {control_error:.2e}"
    )
    if os.environ.get("OPENPI_MERGE_TORCH_MEASUREMENTS"):  # scripts/torch_tier.sh collects these lines.
        with open(os.environ["OPENPI_MERGE_TORCH_MEASUREMENTS"], "a") as f:
            f.write(line + "\n")
    assert error <= TOLERANCE[dtype]
    assert control_error > 10 * TOLERANCE[dtype]


def _control_export(run: dict, model: str, dtype: str) -> pathlib.Path:
    """The unmerged checkpoint exported with its LoRA leaves dropped: what openpi's converter makes of it."""
    directory = run["root"] / f"control-{dtype}"
    if not directory.exists():
        base = {k: v for k, v in run["lora"].items() if not is_lora_leaf(k)}
        te.write(directory, te.state_dict(base, model, dtype), config_json={})
    return directory


def _settings_in_process(run: dict, model: str, export: pathlib.Path, dtype: str) -> config.Settings:
    """The settings of a merge with ``export_check``, read in this process, where the small variants are openpi's."""
    cfg = config.make_config(model)
    cfg.input = str(run["root"] / "in" / "1000")
    cfg.pytorch_output = str(export)
    cfg.export_check, cfg.export_dtype, cfg.progress = True, dtype, False
    cfg.paligemma.variant, cfg.action_expert.variant = openpi_torch.PALIGEMMA, openpi_torch.EXPERT
    cfg.action_horizon = openpi_torch.ACTION_HORIZON
    return config.read_settings(cfg)


@framework
@pytest.mark.parametrize("model", ["pi0", "pi05"])
def test_export_check_loads_the_export_with_openpi_and_matches_its_jax_lora_model(lora_run, model, tmp_path):
    run = lora_run(model)
    settings = _settings_in_process(run, model, tmp_path / "export", "bfloat16")
    summary = pipeline.merge(settings, report.Outcome(config={}), lambda: None)
    assert "openpi's load_pytorch loaded every key of model.safetensors strictly" in summary
    measured = re.search(r"actions match openpi's JAX LoRA model on the input within (\S+) of", summary)
    assert measured, summary
    assert float(measured.group(1)) <= framework_check.TOLERANCE["bfloat16"]
    assert (tmp_path / "export" / te.SAFETENSORS_FILE).is_file()


@framework
def test_export_check_fails_on_an_export_without_the_fine_tune(lora_run):
    run = lora_run("pi0")
    settings = _settings_in_process(run, "pi0", run["root"] / "unused", "bfloat16")
    with pytest.raises(errors.NumericsError, match="differ from openpi's JAX LoRA model"):
        framework_check.pytorch(
            _control_export(run, "pi0", "bfloat16"), settings, run["root"] / "in" / "1000" / "params", 8
        )


@framework
def test_export_check_names_a_key_that_openpis_strict_load_misses(lora_run, tmp_path):
    run = lora_run("pi0")
    tensors = te.read(run["root"] / "export-bfloat16")
    del tensors["action_out_proj.bias"]
    broken = te.write(tmp_path / "broken", tensors, config_json={})
    settings = _settings_in_process(run, "pi0", run["root"] / "unused", "bfloat16")
    with pytest.raises(errors.NumericsError, match=r"1 keys missing \(action_out_proj.bias"):
        framework_check.pytorch(broken, settings, run["root"] / "in" / "1000" / "params", openpi_torch.ACTION_DIM)
