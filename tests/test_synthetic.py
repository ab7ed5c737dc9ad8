"""Synthetic openpi checkpoints: trees as openpi builds them, written as openpi training writes them."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from openpi_merge.testing import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]

# Read off openpi's own models (Pi0Config / Pi0FASTConfig with gemma_2b_lora and gemma_300m_lora, built with
# nnx.eval_shape): every parameter path of the full-scale pi0 LoRA tree and its shape.
PI0_FULL = {
    "PaliGemma/img/Transformer/encoder_norm/bias": (1152,),
    "PaliGemma/img/Transformer/encoder_norm/scale": (1152,),
    "PaliGemma/img/Transformer/encoderblock/LayerNorm_0/bias": (27, 1152),
    "PaliGemma/img/Transformer/encoderblock/LayerNorm_0/scale": (27, 1152),
    "PaliGemma/img/Transformer/encoderblock/LayerNorm_1/bias": (27, 1152),
    "PaliGemma/img/Transformer/encoderblock/LayerNorm_1/scale": (27, 1152),
    "PaliGemma/img/Transformer/encoderblock/MlpBlock_0/Dense_0/bias": (27, 4304),
    "PaliGemma/img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel": (27, 1152, 4304),
    "PaliGemma/img/Transformer/encoderblock/MlpBlock_0/Dense_1/bias": (27, 1152),
    "PaliGemma/img/Transformer/encoderblock/MlpBlock_0/Dense_1/kernel": (27, 4304, 1152),
    "PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/key/bias": (27, 16, 72),
    "PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/key/kernel": (27, 1152, 16, 72),
    "PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/out/bias": (27, 1152),
    "PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/out/kernel": (27, 16, 72, 1152),
    "PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/bias": (27, 16, 72),
    "PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel": (27, 1152, 16, 72),
    "PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/value/bias": (27, 16, 72),
    "PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/value/kernel": (27, 1152, 16, 72),
    "PaliGemma/img/embedding/bias": (1152,),
    "PaliGemma/img/embedding/kernel": (14, 14, 3, 1152),
    "PaliGemma/img/head/bias": (2048,),
    "PaliGemma/img/head/kernel": (1152, 2048),
    "PaliGemma/img/pos_embedding": (1, 256, 1152),
    "PaliGemma/llm/embedder/input_embedding": (257152, 2048),
    "PaliGemma/llm/final_norm/scale": (2048,),
    "PaliGemma/llm/final_norm_1/scale": (1024,),
    "PaliGemma/llm/layers/attn/attn_vec_einsum/lora_a": (18, 8, 256, 16),
    "PaliGemma/llm/layers/attn/attn_vec_einsum/lora_b": (18, 8, 16, 2048),
    "PaliGemma/llm/layers/attn/attn_vec_einsum/w": (18, 8, 256, 2048),
    "PaliGemma/llm/layers/attn/attn_vec_einsum_1/lora_a": (18, 8, 256, 32),
    "PaliGemma/llm/layers/attn/attn_vec_einsum_1/lora_b": (18, 8, 32, 1024),
    "PaliGemma/llm/layers/attn/attn_vec_einsum_1/w": (18, 8, 256, 1024),
    "PaliGemma/llm/layers/attn/kv_einsum/lora_a": (18, 2, 1, 2048, 16),
    "PaliGemma/llm/layers/attn/kv_einsum/lora_b": (18, 2, 1, 16, 256),
    "PaliGemma/llm/layers/attn/kv_einsum/w": (18, 2, 1, 2048, 256),
    "PaliGemma/llm/layers/attn/kv_einsum_1/lora_a": (18, 2, 1, 1024, 32),
    "PaliGemma/llm/layers/attn/kv_einsum_1/lora_b": (18, 2, 1, 32, 256),
    "PaliGemma/llm/layers/attn/kv_einsum_1/w": (18, 2, 1, 1024, 256),
    "PaliGemma/llm/layers/attn/q_einsum/lora_a": (18, 8, 2048, 16),
    "PaliGemma/llm/layers/attn/q_einsum/lora_b": (18, 8, 16, 256),
    "PaliGemma/llm/layers/attn/q_einsum/w": (18, 8, 2048, 256),
    "PaliGemma/llm/layers/attn/q_einsum_1/lora_a": (18, 8, 1024, 32),
    "PaliGemma/llm/layers/attn/q_einsum_1/lora_b": (18, 8, 32, 256),
    "PaliGemma/llm/layers/attn/q_einsum_1/w": (18, 8, 1024, 256),
    "PaliGemma/llm/layers/mlp/gating_einsum": (18, 2, 2048, 16384),
    "PaliGemma/llm/layers/mlp/gating_einsum_lora_a": (18, 2, 2048, 16),
    "PaliGemma/llm/layers/mlp/gating_einsum_lora_b": (18, 2, 16, 16384),
    "PaliGemma/llm/layers/mlp/linear": (18, 16384, 2048),
    "PaliGemma/llm/layers/mlp/linear_lora_a": (18, 16384, 16),
    "PaliGemma/llm/layers/mlp/linear_lora_b": (18, 16, 2048),
    "PaliGemma/llm/layers/mlp_1/gating_einsum": (18, 2, 1024, 4096),
    "PaliGemma/llm/layers/mlp_1/gating_einsum_lora_a": (18, 2, 1024, 32),
    "PaliGemma/llm/layers/mlp_1/gating_einsum_lora_b": (18, 2, 32, 4096),
    "PaliGemma/llm/layers/mlp_1/linear": (18, 4096, 1024),
    "PaliGemma/llm/layers/mlp_1/linear_lora_a": (18, 4096, 32),
    "PaliGemma/llm/layers/mlp_1/linear_lora_b": (18, 32, 1024),
    "PaliGemma/llm/layers/pre_attention_norm/scale": (18, 2048),
    "PaliGemma/llm/layers/pre_attention_norm_1/scale": (18, 1024),
    "PaliGemma/llm/layers/pre_ffw_norm/scale": (18, 2048),
    "PaliGemma/llm/layers/pre_ffw_norm_1/scale": (18, 1024),
    "action_in_proj/bias": (1024,),
    "action_in_proj/kernel": (32, 1024),
    "action_out_proj/bias": (32,),
    "action_out_proj/kernel": (1024, 32),
    "action_time_mlp_in/bias": (1024,),
    "action_time_mlp_in/kernel": (2048, 1024),
    "action_time_mlp_out/bias": (1024,),
    "action_time_mlp_out/kernel": (1024, 1024),
    "state_proj/bias": (1024,),
    "state_proj/kernel": (32, 1024),
}
PI05_ADDED = {
    "PaliGemma/llm/final_norm_1/Dense_0/bias": (3072,),
    "PaliGemma/llm/final_norm_1/Dense_0/kernel": (1024, 3072),
    "PaliGemma/llm/layers/pre_attention_norm_1/Dense_0/bias": (18, 3072),
    "PaliGemma/llm/layers/pre_attention_norm_1/Dense_0/kernel": (18, 1024, 3072),
    "PaliGemma/llm/layers/pre_ffw_norm_1/Dense_0/bias": (18, 3072),
    "PaliGemma/llm/layers/pre_ffw_norm_1/Dense_0/kernel": (18, 1024, 3072),
    "time_mlp_in/bias": (1024,),
    "time_mlp_in/kernel": (1024, 1024),
    "time_mlp_out/bias": (1024,),
    "time_mlp_out/kernel": (1024, 1024),
}
PI05_REMOVED = {
    "PaliGemma/llm/final_norm_1/scale",
    "PaliGemma/llm/layers/pre_attention_norm_1/scale",
    "PaliGemma/llm/layers/pre_ffw_norm_1/scale",
    "action_time_mlp_in/bias",
    "action_time_mlp_in/kernel",
    "action_time_mlp_out/bias",
    "action_time_mlp_out/kernel",
    "state_proj/bias",
    "state_proj/kernel",
}


def _is_lora(path: str) -> bool:
    return path.rsplit("/", 1)[-1].endswith(("lora_a", "lora_b"))


def _expected_full(model: str) -> dict[str, tuple[int, ...]]:
    if model == "pi0":
        return dict(PI0_FULL)
    if model == "pi05":
        return {**{k: v for k, v in PI0_FULL.items() if k not in PI05_REMOVED}, **PI05_ADDED}
    # pi0-FAST: the PaliGemma part of pi0 with a single expert (no `_1` modules) and no action projections.
    return {k: v for k, v in PI0_FULL.items() if k.startswith("PaliGemma/") and not ("_1/" in k and "/llm/" in k)}


def _expected_dtype(path: str) -> np.dtype:
    # openpi's LoRA freeze filter freezes every PaliGemma/llm leaf but the LoRA ones; frozen leaves are stored bf16.
    return synthetic.BFLOAT16 if path.startswith("PaliGemma/llm/") and not _is_lora(path) else synthetic.FLOAT32


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


def _restore(params_dir: pathlib.Path) -> tuple[dict, dict]:
    """Metadata tree and restored numpy tree, as openpi's restore_params reads them."""
    with ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(params_dir)
        metadata = getattr(metadata, "item_metadata", metadata)  # orbax-checkpoint 0.11 returns the tree itself.
        assert list(metadata.keys()) == ["params"]
        item = {"params": metadata["params"]}
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(restore_type=np.ndarray), item)
        restored = checkpointer.restore(params_dir, ocp.args.PyTreeRestore(item=item, restore_args=restore_args))
    return dict(item["params"]), restored["params"]


@pytest.mark.parametrize("model", synthetic.MODELS)
def test_full_tree_matches_openpi(model):
    specs = synthetic.param_specs(model, "full")
    assert {k: tuple(v.shape) for k, v in specs.items()} == _expected_full(model)
    for path, spec in specs.items():
        assert np.dtype(spec.dtype) == _expected_dtype(path), path


@pytest.mark.parametrize("model", synthetic.MODELS)
@pytest.mark.parametrize("scale", synthetic.SCALES)
def test_base_tree_is_lora_tree_minus_lora(model, scale):
    lora = synthetic.param_specs(model, scale)
    base = synthetic.param_specs(model, scale, lora=False)
    assert not any(_is_lora(path) for path in base)
    assert base == {k: v for k, v in lora.items() if not _is_lora(k)}
    # q, kv, attn_vec einsums and the MLP's two kernels each have an A and a B, in every expert.
    assert len(lora) - len(base) == 10 * len(synthetic.model_dims(model, scale).experts)
    # Every kernel with LoRA keeps its name: w for einsums, gating_einsum / linear for the MLPs.
    for path in lora:
        if _is_lora(path):
            module, leaf = path.rsplit("/", 1)
            kernel = f"{module}/w" if leaf in ("lora_a", "lora_b") else f"{module}/{leaf.rsplit('_lora_', 1)[0]}"
            assert kernel in base, path


def test_key_full_shapes():
    pi0 = synthetic.param_specs("pi0", "full")
    llm = "PaliGemma/llm/layers"
    expected = {
        f"{llm}/attn/q_einsum/w": (18, 8, 2048, 256),
        f"{llm}/attn/q_einsum/lora_a": (18, 8, 2048, 16),
        f"{llm}/attn/q_einsum/lora_b": (18, 8, 16, 256),
        f"{llm}/attn/kv_einsum_1/lora_a": (18, 2, 1, 1024, 32),
        f"{llm}/attn/attn_vec_einsum/lora_b": (18, 8, 16, 2048),
        f"{llm}/mlp/gating_einsum": (18, 2, 2048, 16384),
        f"{llm}/mlp/gating_einsum_lora_a": (18, 2, 2048, 16),
        f"{llm}/mlp/gating_einsum_lora_b": (18, 2, 16, 16384),
        f"{llm}/mlp/linear_lora_a": (18, 16384, 16),
        f"{llm}/mlp_1/linear_lora_b": (18, 32, 1024),
        "PaliGemma/img/embedding/kernel": (14, 14, 3, 1152),
        "PaliGemma/llm/embedder/input_embedding": (257152, 2048),
    }
    assert {k: tuple(pi0[k].shape) for k in expected} == expected
    total = sum(int(np.prod(s.shape)) for s in pi0.values())
    assert 3.2e9 < total < 3.4e9


@pytest.mark.parametrize("model", synthetic.MODELS)
@pytest.mark.parametrize("scale", synthetic.SCALES)
@pytest.mark.parametrize("fused_qkv", [False, True])
def test_lora_shapes_follow_openpi(model, scale, fused_qkv):
    specs = {k: tuple(v.shape) for k, v in synthetic.param_specs(model, scale, fused_qkv=fused_qkv).items()}
    dims = synthetic.model_dims(model, scale, fused_qkv=fused_qkv)
    pairs = 0
    for path, shape in specs.items():
        module, leaf = path.rsplit("/", 1)
        if not module.startswith("PaliGemma/llm/layers/"):
            continue
        rank = dims.action_expert.rank if module.endswith("_1") else dims.paligemma.rank
        if leaf == "w":  # lora.Einsum, axes (-2, -1), behind the scan's depth axis.
            a, b = specs[f"{module}/lora_a"], specs[f"{module}/lora_b"]
            assert a == (*shape[:-1], rank), path
            assert b == (*shape[:-2], rank, shape[-1]), path
            pairs += 1
        elif leaf == "gating_einsum":
            depth, two, d, f = shape
            assert specs[f"{path}_lora_a"] == (depth, two, d, rank)
            assert specs[f"{path}_lora_b"] == (depth, two, rank, f)
            pairs += 1
        elif leaf == "linear":
            depth, f, d = shape
            assert specs[f"{path}_lora_a"] == (depth, f, rank)
            assert specs[f"{path}_lora_b"] == (depth, rank, d)
            pairs += 1
    experts = len(dims.experts)
    assert pairs == experts * (4 if fused_qkv else 5)


@pytest.mark.parametrize("model", ["pi0", "pi05", "pi0_fast"])
def test_fused_qkv(model):
    specs = synthetic.param_specs(model, "tiny", fused_qkv=True)
    dims = synthetic.model_dims(model, "tiny", fused_qkv=True)
    attn = "PaliGemma/llm/layers/attn"
    assert not [p for p in specs if "/q_einsum" in p or "/kv_einsum" in p]
    g = dims.paligemma
    assert g.num_kv_heads == g.num_heads
    assert tuple(specs[f"{attn}/qkv_einsum/w"].shape) == (g.depth, 3, g.num_heads, g.width, g.head_dim)
    assert tuple(specs[f"{attn}/qkv_einsum/lora_a"].shape) == (g.depth, 3, g.num_heads, g.width, g.rank)
    assert tuple(specs[f"{attn}/qkv_einsum/lora_b"].shape) == (g.depth, 3, g.num_heads, g.rank, g.head_dim)
    # openpi asserts that all experts share num_kv_heads, so the action expert is fused too.
    assert (f"{attn}/qkv_einsum_1/w" in specs) == (model != "pi0_fast")
    full = synthetic.param_specs(model, "full", fused_qkv=True)
    assert tuple(full[f"{attn}/qkv_einsum/w"].shape) == (18, 3, 8, 2048, 256)


def test_tiny_dims():
    dims = synthetic.model_dims("pi0", "tiny")
    assert dims.paligemma == synthetic.GemmaDims(64, 2, 128, 4, 1, 16, 16)
    assert dims.action_expert == synthetic.GemmaDims(32, 2, 64, 4, 1, 16, 32)
    assert dims.action_expert.rank == dims.action_expert.width  # The intended edge case.
    assert (dims.vocab_size, dims.action_dim, dims.siglip.width, dims.siglip.depth) == (128, 8, 32, 2)
    assert synthetic.model_dims("pi0_fast", "tiny").action_expert is None
    for model in synthetic.MODELS:
        for scale in synthetic.SCALES:
            d = synthetic.model_dims(model, scale)
            assert len({e.depth for e in d.experts}) == 1
            assert len({(e.num_heads, e.num_kv_heads, e.head_dim) for e in d.experts}) == 1
    with pytest.raises(ValueError, match="unknown model"):
        synthetic.model_dims("pi1", "tiny")


@pytest.mark.parametrize("model", synthetic.MODELS)
def test_make_params(model):
    params = {"/".join(k): v for k, v in _flatten(synthetic.make_params(model, "tiny", seed=3)).items()}
    specs = synthetic.param_specs(model, "tiny")
    assert set(params) == set(specs)
    for path, value in params.items():
        assert isinstance(value, np.ndarray), path
        assert (value.shape, value.dtype) == (specs[path].shape, np.dtype(specs[path].dtype)), path
        assert np.all(value != 0), path
        assert np.all(np.isfinite(value.astype(np.float32))), path
    again = {"/".join(k): v for k, v in _flatten(synthetic.make_params(model, "tiny", seed=3)).items()}
    other = {"/".join(k): v for k, v in _flatten(synthetic.make_params(model, "tiny", seed=4)).items()}
    assert all(np.array_equal(params[k], again[k]) for k in params)
    assert not any(np.array_equal(params[k], other[k]) for k in params)
    # Layers along the scan axis differ: a merge that mixed up layers would show.
    w = params["PaliGemma/llm/layers/mlp/linear"]
    assert not np.array_equal(w[0], w[1])


@pytest.mark.parametrize("model", synthetic.MODELS)
def test_lora_update_survives_bf16_rounding(model):
    params = {"/".join(k): v for k, v in _flatten(synthetic.make_params(model, "tiny")).items()}
    for path, kernel in params.items():
        module, leaf = path.rsplit("/", 1)
        if leaf == "w" and "attn_vec" not in module:  # q/kv/qkv: batched product over the leading axes.
            a, b = params[f"{module}/lora_a"], params[f"{module}/lora_b"]
        elif leaf in ("gating_einsum", "linear"):  # FeedForward: plain (batched) dot, no scaling.
            a, b = params[f"{path}_lora_a"], params[f"{path}_lora_b"]
        else:
            continue
        merged = (kernel.astype(np.float32) + a @ b).astype(synthetic.BFLOAT16)
        assert np.mean(merged != kernel) > 0.8, path


def _check_step_dir(step_dir: pathlib.Path, model: str, value_suffix: bool, seed: int = 0, asset_id="example_robot"):
    assert step_dir.is_dir()
    assert (step_dir / "_CHECKPOINT_METADATA").is_file()
    checkpoint_metadata = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())
    assert set(checkpoint_metadata["item_handlers"]) >= {"params", "train_state"}
    assert (step_dir / "params" / "_METADATA").is_file()
    assert (step_dir / "train_state" / "_METADATA").is_file()
    norm_stats = json.loads((step_dir / "assets" / asset_id / "norm_stats.json").read_text())
    assert set(norm_stats) == {"norm_stats"}
    assert set(norm_stats["norm_stats"]) == {"state", "actions"}
    for stats in norm_stats["norm_stats"].values():
        assert set(stats) == {"mean", "std", "q01", "q99"}
        assert len({len(v) for v in stats.values()}) == 1

    metadata, restored = _restore(step_dir / "params")
    flat_meta, flat = _flatten(metadata), _flatten(restored)
    assert set(flat_meta) == set(flat)
    if value_suffix:
        assert all(path[-1] == "value" for path in flat)
        flat = {path[:-1]: v for path, v in flat.items()}
        flat_meta = {path[:-1]: v for path, v in flat_meta.items()}
    else:  # SigLIP's attention has a module named "value": some paths do contain it.
        assert not all(path[-1] == "value" for path in flat)
        assert any("value" in path for path in flat)
    expected = {tuple(k): v for k, v in _flatten(synthetic.make_params(model, "tiny", seed=seed)).items()}
    specs = synthetic.param_specs(model, "tiny")
    assert {"/".join(p) for p in flat} == set(specs)
    for path, value in flat.items():
        name = "/".join(path)
        assert np.dtype(flat_meta[path].dtype) == _expected_dtype(name), name
        assert tuple(flat_meta[path].shape) == tuple(specs[name].shape), name
        assert value.dtype == _expected_dtype(name), name
        np.testing.assert_array_equal(value, expected[path], err_msg=name)
        if _is_lora(name):
            assert np.all(value != 0), name


@pytest.mark.parametrize("model", synthetic.MODELS)
@pytest.mark.parametrize("value_suffix", [True, False])
def test_write_checkpoint_round_trips(tmp_path, model, value_suffix):
    step_dir = synthetic.write_checkpoint(tmp_path, model, value_suffix=value_suffix, step=7, seed=1)
    assert step_dir == tmp_path.resolve() / "7"
    _check_step_dir(step_dir, model, value_suffix, seed=1)
    assert not list(tmp_path.glob("*.orbax-checkpoint-tmp-*"))


def test_write_checkpoint_options(tmp_path):
    step_dir = synthetic.write_checkpoint(tmp_path, "pi0", fused_qkv=True, asset_id="droid")
    assert (step_dir / "assets" / "droid" / "norm_stats.json").is_file()
    metadata, _ = _restore(step_dir / "params")
    llm = metadata["PaliGemma"]["llm"]["layers"]["attn"]
    assert {"qkv_einsum", "qkv_einsum_1", "attn_vec_einsum", "attn_vec_einsum_1"} == set(llm)
    # A second step next to the first leaves the first alone.
    second = synthetic.write_checkpoint(tmp_path, "pi0", step=2000)
    assert step_dir.is_dir()
    assert second.is_dir()


@pytest.mark.parametrize("jax_arrays", [False, True])
def test_value_type(tmp_path, jax_arrays):
    """numpy-written params record value_type np.ndarray; jax_arrays=True records jax.Array, as openpi's saves do."""
    step_dir = synthetic.write_checkpoint(tmp_path, "pi0_fast", jax_arrays=jax_arrays)
    _check_step_dir(step_dir, "pi0_fast", value_suffix=True)
    tree_metadata = json.loads((step_dir / "params" / "_METADATA").read_text())["tree_metadata"]
    value_types = {entry["value_metadata"]["value_type"] for entry in tree_metadata.values()}
    assert value_types == {"jax.Array" if jax_arrays else "np.ndarray"}


def test_chunked_sequential_write(tmp_path, monkeypatch):
    """The low-memory write path (arrays written one at a time, large arrays chunked) stores the same values."""
    specs = synthetic.param_specs("pi0", "tiny")
    largest = max(specs, key=lambda k: int(np.prod(specs[k].shape)) * np.dtype(specs[k].dtype).itemsize)
    nbytes = int(np.prod(specs[largest].shape)) * np.dtype(specs[largest].dtype).itemsize
    monkeypatch.setattr(synthetic, "_LARGE_ARRAY_BYTES", 0)
    monkeypatch.setattr(synthetic, "_CHUNKED_ARRAY_BYTES", nbytes - 1)
    monkeypatch.setattr(synthetic, "_STORAGE_CHUNK_BYTES", nbytes // 4)
    step_dir = synthetic.write_checkpoint(tmp_path, "pi0")
    _check_step_dir(step_dir, "pi0", value_suffix=True)
    metadata, _ = _restore(step_dir / "params")
    leaf = _flatten(metadata)[(*largest.split("/"), "value")]
    storage = getattr(leaf, "storage", None)
    if storage is not None and getattr(storage, "chunk_shape", None) is not None:
        assert tuple(storage.chunk_shape) != tuple(leaf.shape)


def test_cli(tmp_path):
    script = REPO / "scripts" / "make_checkpoint.py"
    result = subprocess.run(
        [sys.executable, str(script), "--model=pi05", f"--out={tmp_path}", "--no_value_suffix", "--seed=2", "--step=5"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    step_dir = pathlib.Path(result.stdout.splitlines()[0])
    assert step_dir == tmp_path.resolve() / "5"
    assert "on disk" in result.stdout
    _check_step_dir(step_dir, "pi05", value_suffix=False, seed=2)
