"""End to end through the CLI on small openpi-shaped checkpoints written by Orbax."""

import hashlib
import json
import os
import subprocess

import ml_dtypes
import numpy as np
import pytest
from helpers import REPO, STEP_DIR_NAMES, file_hashes, merge_ok, restore_flat, run_cli, stored_paths
from reference import assert_rounds_to, lora_paths, merged_kernel

from openpi_merge.testing import synthetic

STOCK_ALPHA = {"": 16.0, "_1": 32.0}  # gemma_2b_lora, gemma_300m_lora.


def _expert(path):
    return "_1" if path[-2].endswith("_1") else ""


def _assert_bit_equal(got, want):
    assert got.dtype == want.dtype
    assert got.tobytes() == want.tobytes()


def _check_merged(original, merged, alpha=STOCK_ALPHA, rslora=False, dtype=None):
    paired = [p for p in original if lora_paths(p)[0] in original and not p[-1].endswith(("lora_a", "lora_b"))]
    assert paired, "the fixture has no LoRA-carrying kernels"
    for path, value in merged.items():
        if path in paired:
            assert value.dtype == (dtype or original[path].dtype)
            assert_rounds_to(value, *merged_kernel(original, path, alpha[_expert(path)], rslora=rslora))
            assert not np.array_equal(value, original[path]), f"{path} did not change"
        else:
            _assert_bit_equal(value, original[path])


@pytest.mark.parametrize("value_suffix", [True, False], ids=["nnx-value", "plain"])
@pytest.mark.parametrize("model", synthetic.MODELS)
def test_merge_writes_the_base_tree_with_merged_kernels(tiny_checkpoint, tmp_path, model, value_suffix):
    step = tiny_checkpoint(model, value_suffix)
    before = file_hashes(step)
    out = tmp_path / "merged"

    result = merge_ok(step, out, model=model)

    assert file_hashes(step) == before, "the input checkpoint was modified"
    assert sorted(p.name for p in out.iterdir()) == STEP_DIR_NAMES
    assert file_hashes(out / "assets") == file_hashes(step / "assets")
    merged, original = restore_flat(out / "params"), restore_flat(step / "params")
    base = synthetic.param_specs(model, "tiny", lora=False)
    assert {"/".join(p): (v.shape, v.dtype) for p, v in merged.items()} == {
        path: (spec.shape, spec.dtype) for path, spec in base.items()
    }
    _check_merged(original, merged)
    assert "folded" in result.stdout
    assert "LoRA leaves dropped" in result.stdout


@pytest.mark.parametrize("value_suffix", [True, False], ids=["nnx-value", "plain"])
def test_value_suffix_convention_is_kept(tiny_checkpoint, tmp_path, value_suffix):
    step = tiny_checkpoint("pi0_fast", value_suffix)
    merge_ok(step, tmp_path / "merged", model="pi0_fast")
    for params_dir in (step / "params", tmp_path / "merged" / "params"):
        paths = stored_paths(params_dir)
        assert paths
        assert all(path[0] == "params" and (path[-1] == "value") == value_suffix for path in paths)


def test_custom_alpha_and_rslora_from_the_command_line(tiny_checkpoint, tmp_path):
    step = tiny_checkpoint("pi0")
    merge_ok(
        step,
        tmp_path / "merged",
        "--config.paligemma.alpha=8",
        "--config.action_expert.alpha=64",
        "--config.paligemma.rslora=True",
        "--config.action_expert.rslora=True",
    )
    original, merged = restore_flat(step / "params"), restore_flat(tmp_path / "merged" / "params")
    _check_merged(original, merged, alpha={"": 8.0, "_1": 64.0}, rslora=True)


def test_float32_output_dtype(tiny_checkpoint, tmp_path):
    step = tiny_checkpoint("pi05")
    merge_ok(step, tmp_path / "merged", "--config.dtype=float32", model="pi05")
    original, merged = restore_flat(step / "params"), restore_flat(tmp_path / "merged" / "params")
    _check_merged(original, merged, dtype=np.dtype(np.float32))


def test_bfloat16_output_dtype_of_a_float32_base(tmp_path, tiny_checkpoint):
    step = tiny_checkpoint("pi0_fast", fused_qkv=True)
    merge_ok(step, tmp_path / "merged", "--config.dtype=bfloat16", model="pi0_fast")
    original, merged = restore_flat(step / "params"), restore_flat(tmp_path / "merged" / "params")
    _check_merged(original, merged, dtype=np.dtype(ml_dtypes.bfloat16))
    assert any(p[-2] == "qkv_einsum" for p in merged)


def test_relative_paths(tiny_checkpoint, tmp_path):
    step = tiny_checkpoint("pi0")
    result = run_cli(
        f"--config={REPO / 'configs/pi0_lora.py'}",
        f"--config.input={os.path.relpath(step, tmp_path)}",
        "--config.output=merged",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "merged" / "params").is_dir()


def test_bare_params_dir_as_input(tiny_checkpoint, tmp_path):
    step = tiny_checkpoint("pi0")
    summary = merge_ok(step / "params", tmp_path / "merged").stdout
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == STEP_DIR_NAMES[1:]
    assert "assets: none carried" in summary
    assert "norm_stats.json" in summary


def test_the_summary_names_the_asset_ids_carried(tiny_checkpoint, tmp_path):
    summary = merge_ok(tiny_checkpoint("pi0"), tmp_path / "merged").stdout
    ids = sorted(p.name for p in (tiny_checkpoint("pi0") / "assets").iterdir())
    assert f"assets: {', '.join(ids)}" in summary


@pytest.mark.skipif(not os.environ.get("OPENPI_MERGE_OTHER_PYTHON"), reason="set by .ci/run: the other stack's python")
@pytest.mark.parametrize("overrides", [(), ("--config.memory_budget_gb=0.0001",)], ids=["in-memory", "streamed"])
def test_output_restores_under_the_other_stack(tiny_checkpoint, tmp_path, overrides):
    """What this stack writes restores, through openpi's own call, under the other (pinned or latest) stack."""
    step = tiny_checkpoint("pi0")
    merge_ok(step, tmp_path / "merged", *overrides)
    read = subprocess.run(
        [os.environ["OPENPI_MERGE_OTHER_PYTHON"], str(REPO / "tests" / "openpi_restore.py"), str(tmp_path / "merged")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert read.returncode == 0, read.stderr
    here = restore_flat(tmp_path / "merged" / "params")
    assert json.loads(read.stdout) == {
        "/".join(p): [list(v.shape), v.dtype.name, hashlib.sha256(v.tobytes()).hexdigest()] for p, v in here.items()
    }


def test_a_users_persistent_compilation_cache_does_not_corrupt_the_merge(tiny_checkpoint, tmp_path, monkeypatch):
    """jax 0.5.3 drops buffer donation from cache-loaded executables on CPU; a second run must still be right."""
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax-cache"))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    step = tiny_checkpoint("pi05")
    original = restore_flat(step / "params")
    for run in ("first", "second"):
        merge_ok(step, tmp_path / run, model="pi05")
        _check_merged(original, restore_flat(tmp_path / run / "params"))
