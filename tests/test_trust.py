"""Inspect before, verify after, and a machine-readable report."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import merge, restore_flat, run_cli

from openpi_merge import checkpoint, config, errors, fuse, plan, sharding


def test_inspect_prints_the_plan_and_writes_nothing(tiny_checkpoint, tmp_path):
    result = merge(tiny_checkpoint("pi0"), tmp_path / "out", "--config.mode=inspect")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "out").exists()
    for kernel in ("attn/q_einsum/w", "attn/kv_einsum_1/w", "attn/attn_vec_einsum/w", "mlp_1/gating_einsum"):
        assert f"PaliGemma/llm/layers/{kernel}" in result.stdout
    assert "10 LoRA pairs to fold" in result.stdout
    assert "PaliGemma/img/embedding/kernel" in result.stdout  # Kept leaves are listed.
    assert "no problems: ready to merge" in result.stdout


def test_inspect_lists_every_problem_and_fails(tiny_checkpoint, tmp_path):
    result = run_cli(
        "--config=configs/pi0_lora.py",
        f"--config.input={tiny_checkpoint('pi0')}",
        "--config.mode=inspect",
        "--config.action_expert.variant=gemma_2b_lora",
    )
    assert result.returncode == errors.PlanError.exit_code
    problems = [line for line in result.stdout.splitlines() if line.strip().startswith("problem:")]
    assert len(problems) == 3  # One per action-expert attention kernel: q, kv, attn_vec. MLP LoRA needs no alpha.
    assert all("has LoRA rank 32 but action_expert.variant=gemma_2b_lora has attn rank 16" in p for p in problems)
    assert "(and 2 more problems" in result.stderr
    assert "note: action_expert's MLP LoRA has rank 32, not gemma_2b_lora's ffn rank 16" in result.stdout


def test_summary_reports_verification_per_module_kind(tiny_checkpoint, tmp_path):
    verified = merge(tiny_checkpoint("pi0"), tmp_path / "a")
    assert verified.returncode == 0, verified.stderr
    assert "worst rel. error" in verified.stdout
    assert "not verified" not in verified.stdout
    skipped = merge(tiny_checkpoint("pi0"), tmp_path / "b", "--config.verify=False")
    assert skipped.returncode == 0, skipped.stderr
    assert "not verified" in skipped.stdout
    assert restore_flat(tmp_path / "a" / "params").keys() == restore_flat(tmp_path / "b" / "params").keys()


def _attn_vec_pair(rank=16, heads=4, head_dim=8, width=32):
    cfg = config.make_config("pi0_fast")
    cfg.input, cfg.output = "in", "out"
    root = ("PaliGemma", "llm", "layers", "attn", "attn_vec_einsum")
    shapes = {"w": (2, heads, head_dim, width), "lora_a": (2, heads, head_dim, rank), "lora_b": (2, heads, rank, width)}
    rng = np.random.default_rng(0)
    arrays = {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}
    leaves = {(*root, n): plan.Leaf((*root, n), a.shape, a.dtype) for n, a in arrays.items()}
    (pair,) = plan.make_plan(leaves, config.read_settings(cfg)).pairs
    return pair, arrays


def test_verification_passes_a_right_merge_and_fails_a_wrong_one():
    pair, arrays = _attn_vec_pair()
    _, check = fuse.fuse_pair(pair, arrays["w"], arrays["lora_a"], arrays["lora_b"], sharding.single_device())
    assert check.bound_ratio <= 1.0
    assert check.relative_error < 1e-5  # float32 output: only float32 rounding.
    # The per-head product A[n] @ B[n]: the classic hand-written mistake for attn_vec_einsum.
    wrong = dataclasses.replace(pair, update_equation="abc,acd->abd")
    with pytest.raises(errors.NumericsError, match=r"verification failed for .*attn_vec_einsum/w"):
        fuse.fuse_pair(wrong, arrays["w"], arrays["lora_a"], arrays["lora_b"], sharding.single_device())


def test_reload_check_catches_a_checkpoint_that_reads_back_different(tiny_checkpoint, tmp_path):
    assert merge(tiny_checkpoint("pi0"), tmp_path / "out", "--config.verify_reload=True").returncode == 0
    params_dir = tmp_path / "out" / "params"
    params = restore_flat(params_dir)
    leaves = checkpoint.read_contents(params_dir).leaves.values()
    layout = sharding.single_device()

    def check(arrays):
        as_written = {path: jnp.asarray(array) for path, array in arrays.items()}
        checkpoint.check_written(params_dir, leaves, [as_written], value_suffix=True, layout=layout, committed=True)

    check(params)
    path = next(p for p in params if p[-1] == "w")
    params[path] = params[path].copy()
    params[path].flat[0] += 1
    with pytest.raises(errors.NumericsError, match="reads back different"):
        check(params)
    with pytest.raises(errors.NumericsError, match="does not hold the tree"):
        checkpoint.check_written(params_dir, list(leaves)[1:], [], value_suffix=True, layout=layout, committed=True)


def test_reference_tree_must_match(tiny_checkpoint, tmp_path):
    assert merge(tiny_checkpoint("pi0"), tmp_path / "base").returncode == 0
    matching = merge(tiny_checkpoint("pi0"), tmp_path / "ok", f"--config.reference={tmp_path / 'base'}")
    assert matching.returncode == 0, matching.stderr

    other_model = merge(
        tiny_checkpoint("pi05"), tmp_path / "x", f"--config.reference={tmp_path / 'base'}", model="pi05"
    )
    assert other_model.returncode == errors.PlanError.exit_code
    assert "not in the reference" in other_model.stderr or "not in the output" in other_model.stderr
    assert not (tmp_path / "x").exists()

    wrong_dtype = merge(
        tiny_checkpoint("pi0"), tmp_path / "y", f"--config.reference={tmp_path / 'base'}", "--config.dtype=float32"
    )
    assert wrong_dtype.returncode == errors.PlanError.exit_code
    assert "the reference has bfloat16 (see --config.dtype)" in wrong_dtype.stderr


def test_report_on_success_and_on_failure(tiny_checkpoint, tmp_path):
    report_path = tmp_path / "reports" / "merge.json"
    ok = merge(tiny_checkpoint("pi05"), tmp_path / "out", f"--config.report={report_path}", model="pi05")
    assert ok.returncode == 0, ok.stderr
    document = json.loads(report_path.read_text())
    assert (document["status"], document["exit_code"], document["error"]) == ("ok", 0, None)
    assert len(document["plan"]["pairs"]) == 10
    assert document["plan"]["leaves"] == {"in": 71, "out": 51}
    kinds = {"q_einsum", "kv_einsum", "attn_vec_einsum", "mlp/gating_einsum", "mlp/linear"}
    assert {expert: set(worst) for expert, worst in document["verification"].items()} == {
        "paligemma": kinds,
        "action_expert": kinds,
    }
    assert all(v["bound_ratio"] <= 1 for worst in document["verification"].values() for v in worst.values())
    assert all(0 <= p["check"]["rounding_loss"] < 0.25 for p in document["plan"]["pairs"])
    assert document["provenance"] == json.loads((tmp_path / "out" / "openpi_merge.json").read_text())
    assert document["plan"]["settings"]["action_expert"]["attn"]["alpha"] == 32.0
    assert {"plan", "write", "seal"} <= document["seconds"].keys()  # One process streams: read, fuse, write overlap.
    assert document["versions"]["orbax-checkpoint"]
    assert document["config"]["model"] == "pi05"

    failed = merge(tiny_checkpoint("pi05"), tmp_path / "out", f"--config.report={report_path}", model="pi05")
    assert failed.returncode == errors.OutputError.exit_code
    document = json.loads(report_path.read_text())
    assert (document["status"], document["exit_code"]) == ("error", errors.OutputError.exit_code)
    assert "already exists" in document["error"]


def test_progress_lines_when_not_on_a_terminal(tiny_checkpoint, tmp_path):
    result = merge(tiny_checkpoint("pi0"), tmp_path / "out")
    assert "fuse: 100% after" in result.stderr
    quiet = merge(tiny_checkpoint("pi0"), tmp_path / "quiet", "--config.progress=False")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
