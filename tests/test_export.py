"""The deploy exports through the CLI (openpi_merge.export): what a run with ``pytorch_output`` writes and commits,
how ``mode=check`` proves a copy of it, and the refusals and faults that must commit nothing.

The tensors' maths (key set, dtypes, the numpy proof on planted faults) is test_torch_export.py's; openpi's own
PyTorch model judging the export is its framework tier.
"""

import json
import os
import shutil

import helpers
import numpy as np
import pytest
from helpers import error_line, file_hashes, merge, merge_ok, restore_flat, run_cli, start_cli, tree_hashes, wait_for

from openpi_merge import config, errors, lerobot_export, pipeline, report
from openpi_merge import torch_export as te
from openpi_merge.testing import synthetic


def _export_only(step, export, *overrides, model="pi0", hook=None):
    """A run with no Orbax output, only ``pytorch_output``."""
    return run_cli(
        f"--config=configs/{model}_lora.py",
        f"--config.input={step}",
        f"--config.pytorch_output={export}",
        "--config.progress=False",
        *overrides,
        hook=hook,
    )


@pytest.mark.parametrize("model", ["pi0", "pi05"])
def test_the_pytorch_export_holds_the_merged_orbax_output_in_openpis_layout(tiny_checkpoint, tmp_path, model):
    step = tiny_checkpoint(model)
    out, export, report = tmp_path / "out", tmp_path / "torch", tmp_path / "merge.json"
    result = merge_ok(step, out, f"--config.pytorch_output={export}", f"--config.report={report}", model=model)

    assert sorted(p.name for p in export.iterdir()) == [
        "assets",
        "config.json",
        "model.safetensors",
        "openpi_merge_manifest.json",
    ]
    assert file_hashes(export / "assets") == file_hashes(step / "assets")
    # Exactly what the committed Orbax output maps to, byte for byte: the export is what the checkpoint holds.
    want = te.state_dict(restore_flat(out / "params"), model, "bfloat16")
    got = te.read(export)
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert got[key].tobytes() == tensor.tobytes(), key
    config = json.loads((export / "config.json").read_text())
    assert config["precision"] == "bfloat16"
    assert config["action_dim"] == restore_flat(out / "params")[("action_in_proj", "kernel")].shape[0]
    assert f"pytorch_output: {export} (bfloat16;" in result.stdout
    assert "projection:" in result.stdout
    exported = json.loads(report.read_text())["exports"]
    assert [e["field"] for e in exported] == ["pytorch_output"]
    assert exported[0]["proof"]["attention"]["bound_ratio"] <= 1.0


def test_an_export_alone_writes_no_orbax_output_and_leaves_nothing_beside_it(tiny_checkpoint, tmp_path):
    export = tmp_path / "torch"
    result = _export_only(tiny_checkpoint("pi0"), export)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["torch"]
    assert (export / te.SAFETENSORS_FILE).is_file()


def test_a_float32_export_stores_float32_everywhere(tiny_checkpoint, tmp_path):
    export = tmp_path / "torch"
    assert _export_only(tiny_checkpoint("pi0"), export, "--config.export_dtype=float32").returncode == 0
    assert {t.dtype for t in te.read(export).values()} == {np.dtype(np.float32)}
    assert json.loads((export / "config.json").read_text())["precision"] == "float32"


def test_check_passes_on_a_copy_of_an_export_and_names_a_flipped_byte(tiny_checkpoint, tmp_path):
    export = tmp_path / "torch"
    assert _export_only(tiny_checkpoint("pi0"), export).returncode == 0
    copy = tmp_path / "copy"
    shutil.copytree(export, copy)
    passed = run_cli("--config.mode=check", f"--config.input={copy}")
    assert passed.returncode == 0, passed.stderr

    data = bytearray((copy / te.SAFETENSORS_FILE).read_bytes())
    data[-5] ^= 0x01  # Inside the last tensor's bytes, past the header.
    (copy / te.SAFETENSORS_FILE).write_bytes(bytes(data))
    failed = run_cli("--config.mode=check", f"--config.input={copy}")
    line = error_line(failed.returncode, failed.stderr, errors.NumericsError.exit_code, te.SAFETENSORS_FILE)
    assert str(copy) in line


def test_an_existing_export_dir_is_refused_without_overwrite_and_replaced_with_it(tiny_checkpoint, tmp_path):
    step, export = tiny_checkpoint("pi0"), tmp_path / "torch"
    assert _export_only(step, export).returncode == 0
    before = tree_hashes(export)
    refused = _export_only(step, export)
    error_line(refused.returncode, refused.stderr, errors.OutputError.exit_code, f"pytorch_output {export} already")
    assert tree_hashes(export) == before

    replaced = _export_only(step, export, "--config.overwrite=True", "--config.export_dtype=float32")
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads((export / "config.json").read_text())["precision"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["torch"]


def test_a_dir_of_user_files_is_never_replaced_by_an_export(tiny_checkpoint, tmp_path):
    export = tmp_path / "mine"
    export.mkdir()
    (export / "notes.txt").write_text("keep me")
    result = _export_only(tiny_checkpoint("pi0"), export, "--config.overwrite=True")
    error_line(result.returncode, result.stderr, errors.OutputError.exit_code, "holds no checkpoint")
    assert (export / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("where", ["inside-the-input", "inside-the-output", "the-output"])
def test_an_export_that_overlaps_the_input_or_the_output_is_refused(tiny_checkpoint, tmp_path, where):
    step = tiny_checkpoint("pi0")
    before = tree_hashes(step)
    out = tmp_path / "out"
    export = {"inside-the-input": step / "torch", "inside-the-output": out / "torch", "the-output": out}[where]
    result = merge(step, out, f"--config.pytorch_output={export}")
    error_line(result.returncode, result.stderr, errors.OutputError.exit_code, "pytorch_output")
    assert tree_hashes(step) == before
    assert list(tmp_path.iterdir()) == []


def test_pi0_fast_to_pytorch_is_refused_in_one_line(tiny_checkpoint, tmp_path):
    result = _export_only(tiny_checkpoint("pi0_fast"), tmp_path / "torch", model="pi0_fast")
    error_line(result.returncode, result.stderr, errors.ConfigError.exit_code, "pi0-FAST")
    assert list(tmp_path.iterdir()) == []


def test_a_report_inside_an_export_is_refused_before_the_merge(tiny_checkpoint, tmp_path):
    export = tmp_path / "torch"
    result = _export_only(tiny_checkpoint("pi0"), export, f"--config.report={export / 'merge.json'}")
    error_line(result.returncode, result.stderr, errors.ConfigError.exit_code, "inside the pytorch_output")
    assert list(tmp_path.iterdir()) == []


def test_an_input_without_assets_exports_and_says_the_norm_stats_are_missing(tiny_checkpoint, tmp_path):
    export = tmp_path / "torch"
    result = _export_only(tiny_checkpoint("pi0") / "params", export)
    assert result.returncode == 0, result.stderr
    assert "no assets/: the input carried none" in result.stdout
    assert not (export / "assets").exists()


def test_a_full_disk_during_the_export_commits_neither_the_export_nor_the_output(mounts, tiny_checkpoint, tmp_path):
    step = tmp_path / "input" / "1000"
    shutil.copytree(tiny_checkpoint("pi0"), step)
    before = tree_hashes(step)
    disk, gate = tmp_path / "disk", tmp_path / "gate"
    disk.mkdir()
    mounts("-t", "tmpfs", "-o", "size=72m", "tmpfs", str(disk))  # Passes the free-space checks, then gets filled.
    run = start_cli(
        "--config=configs/pi0_lora.py",
        f"--config.input={step}",
        f"--config.output={disk / 'out'}",
        f"--config.pytorch_output={disk / 'torch'}",
        hook=f"pytorch_output-staging-ready:wait:{gate}",  # The Orbax output is written and sealed by then.
    )
    wait_for(tmp_path / "gate.reached", run)
    filler = disk / "filler"
    with filler.open("wb") as f:
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(disk).free - 16 * 1024)
    gate.touch()
    _, stderr = run.communicate(timeout=300)
    line = error_line(run.returncode, stderr, errors.EnvironmentFaultError.exit_code, "no space left on the device")
    assert str(disk) in line
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]
    assert tree_hashes(step) == before

    filler.unlink()
    again = merge(step, disk / "out", f"--config.pytorch_output={disk / 'torch'}")
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in disk.iterdir()) == ["out", "torch"]


def test_export_check_without_an_export_is_refused(tiny_checkpoint, tmp_path):
    result = merge(tiny_checkpoint("pi0"), tmp_path / "out", "--config.export_check=True")
    error_line(result.returncode, result.stderr, errors.ConfigError.exit_code, "pass --config.pytorch_output")
    assert list(tmp_path.iterdir()) == []


def test_export_check_where_torch_or_openpi_is_missing_is_refused_before_the_merge(tiny_checkpoint, tmp_path):
    import importlib.util

    if all(importlib.util.find_spec(m) for m in ("torch", "openpi")):
        pytest.skip("torch and openpi are both importable here: the framework tier runs export_check")
    result = _export_only(tiny_checkpoint("pi0"), tmp_path / "torch", "--config.export_check=True")
    error_line(result.returncode, result.stderr, errors.ConfigError.exit_code, "cannot be imported here")
    assert list(tmp_path.iterdir()) == []


# --- LeRobot --------------------------------------------------------------------------------------------------------


def _merge_in_process(step, model: str, **fields) -> str:
    """A merge run in this process (``pipeline.merge``, as ``__main__`` runs it), so that LeRobot's tables can be set
    to the tiny checkpoint's sizes (``helpers.lerobot_sized_like``); returns the summary."""
    cfg = config.make_config(model)
    cfg.input, cfg.progress = str(step), False
    for name, value in fields.items():
        cfg[name] = value
    with helpers.lerobot_sized_like(synthetic.model_dims(model, "tiny")):
        return pipeline.merge(config.read_settings(cfg, openpi=None), report.Outcome(config={}), lambda: None)


@pytest.mark.parametrize("model", ["pi0", "pi05"])
def test_the_lerobot_export_holds_the_merged_output_in_lerobots_layout(tiny_checkpoint, tmp_path, model):
    step = tiny_checkpoint(model)
    out, export = tmp_path / "out", tmp_path / "lerobot"
    summary = _merge_in_process(step, model, output=str(out), lerobot_output=str(export))

    names = {p.name for p in export.iterdir()}
    assert {"config.json", "model.safetensors", "policy_preprocessor.json", "policy_postprocessor.json"} <= names
    assert {"assets", "openpi_merge_manifest.json"} <= names
    want = lerobot_export.policy_state_dict(te.state_dict(restore_flat(out / "params"), model, "float32"), "bfloat16")
    got = te.read(export)
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert got[key].tobytes() == tensor.tobytes(), key
    lerobot_config = json.loads((export / "config.json").read_text())
    assert lerobot_config["type"] == model
    assert f"lerobot_output: {export} (bfloat16;" in summary
    assert "norm stats of example_robot" in summary
    checked = run_cli("--config.mode=check", f"--config.input={export}")
    assert checked.returncode == 0, checked.stderr


def _with_assets(tiny_checkpoint, tmp_path, *asset_ids: str):
    step = tmp_path / "input" / "1000"
    shutil.copytree(tiny_checkpoint("pi0"), step)
    stats = next((step / "assets").glob("*/norm_stats.json")).read_bytes()
    shutil.rmtree(step / "assets")
    for asset_id in asset_ids:
        (step / "assets" / asset_id).mkdir(parents=True)
        (step / "assets" / asset_id / "norm_stats.json").write_bytes(stats)
    return step


def test_an_input_with_two_asset_ids_needs_asset_id_for_lerobot(tiny_checkpoint, tmp_path):
    step = _with_assets(tiny_checkpoint, tmp_path, "aloha", "libero")
    result = merge(step, tmp_path / "out", f"--config.lerobot_output={tmp_path / 'lerobot'}")
    error_line(result.returncode, result.stderr, errors.ConfigError.exit_code, "norm stats for aloha, libero")
    assert "--config.asset_id" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input"]


def test_an_asset_id_the_input_lacks_is_refused_naming_those_it_has(tiny_checkpoint, tmp_path):
    step = _with_assets(tiny_checkpoint, tmp_path, "aloha")
    result = merge(step, tmp_path / "out", f"--config.lerobot_output={tmp_path / 'lerobot'}", "--config.asset_id=droid")
    line = error_line(result.returncode, result.stderr, errors.PlanError.exit_code, "asset_id='droid'")
    assert "aloha" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input"]


def test_an_input_without_norm_stats_is_refused_for_lerobot(tiny_checkpoint, tmp_path):
    result = merge(tiny_checkpoint("pi0") / "params", tmp_path / "out", f"--config.lerobot_output={tmp_path / 'lr'}")
    error_line(result.returncode, result.stderr, errors.PlanError.exit_code, "LeRobot's processors need")
    assert list(tmp_path.iterdir()) == []


def test_a_model_of_sizes_lerobot_does_not_build_is_refused_before_the_merge(tiny_checkpoint, tmp_path):
    result = merge(tiny_checkpoint("pi0"), tmp_path / "out", f"--config.lerobot_output={tmp_path / 'lerobot'}")
    error_line(result.returncode, result.stderr, errors.PlanError.exit_code, "is not LeRobot's gemma_2b")
    assert list(tmp_path.iterdir()) == []
