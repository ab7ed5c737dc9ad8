"""Faults of the environment, on real filesystems: a full tmpfs, a read-only bind mount, a bind mount of the input,
assets that point outside the input. Each ends in one line and a documented exit code, with the input untouched,
nothing at the output, nothing left beside it, and a rerun that succeeds once the fault is gone.

The mount tests need root and mount(8); they skip with the reason elsewhere, and run on the project's CI machine.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util
from helpers import REPO, error_line, merge, start_cli, tree_hashes, wait_for, write_params

from openpi_merge import errors
from openpi_merge.testing import synthetic


@pytest.fixture
def input_copy(tiny_checkpoint, tmp_path):
    """A private copy of the tiny pi0 checkpoint and its hashes, to prove it is never modified."""
    step = tmp_path / "input" / "1000"
    shutil.copytree(tiny_checkpoint("pi0"), step)
    return step, tree_hashes(step)


def _assert_nothing_written(parent, input_copy, keep=()):
    step, before = input_copy
    assert tree_hashes(step) == before
    assert sorted(p.name for p in parent.iterdir()) == sorted(keep)


def _assert_rerun_succeeds(input_copy, out, *overrides, keep=()):
    """Once the fault is gone, the same merge succeeds and leaves nothing but its output beside it."""
    result = merge(input_copy[0], out, *overrides)
    assert result.returncode == 0, result.stderr
    _assert_nothing_written(out.parent, input_copy, keep=[out.name, *keep])


def test_too_little_free_space_is_refused_before_any_array_is_read(mounts, input_copy, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounts("-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk))
    result = merge(input_copy[0], disk / "out")
    line = error_line(result.returncode, result.stderr, errors.EnvironmentFaultError.exit_code, "not enough free space")
    assert str(disk / "out") in line
    assert "restore" not in result.stdout + result.stderr
    _assert_nothing_written(disk, input_copy)
    mounts("-o", "remount,size=96m", str(disk))
    _assert_rerun_succeeds(input_copy, disk / "out")


def test_a_disk_that_fills_up_during_the_save_ends_in_one_line(mounts, input_copy, tmp_path):
    disk, gate = tmp_path / "disk", tmp_path / "gate"
    disk.mkdir()
    mounts("-t", "tmpfs", "-o", "size=72m", "tmpfs", str(disk))  # Passes the free-space check, then gets filled.
    run = start_cli(
        "--config=configs/pi0_lora.py",
        f"--config.input={input_copy[0]}",
        f"--config.output={disk / 'out'}",
        hook=f"staging-ready:wait:{gate}",
    )
    wait_for(tmp_path / "gate.reached", run)
    filler = disk / "filler"
    with filler.open("wb") as f:  # All but a few kB: Orbax gets past its first files before the disk is full.
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(disk).free - 16 * 1024)
    gate.touch()
    _, stderr = run.communicate(timeout=300)
    line = error_line(run.returncode, stderr, errors.EnvironmentFaultError.exit_code, "no space left on the device")
    assert str(disk) in line
    _assert_nothing_written(disk, input_copy, keep=["filler"])

    filler.unlink()
    _assert_rerun_succeeds(input_copy, disk / "out")


def test_a_read_only_output_directory_is_refused_before_the_merge(mounts, input_copy, tmp_path):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    mounts("--bind", str(readonly), str(readonly))
    mounts("-o", "remount,ro,bind", str(readonly))
    result = merge(input_copy[0], readonly / "out")
    line = error_line(result.returncode, result.stderr, errors.EnvironmentFaultError.exit_code, "read-only filesystem")
    assert str(readonly) in line
    assert "fuse:" not in result.stderr
    _assert_nothing_written(readonly, input_copy)
    mounts("-o", "remount,rw,bind", str(readonly))
    _assert_rerun_succeeds(input_copy, readonly / "out")


def test_an_output_directory_without_write_permission_is_refused_before_the_merge(input_copy, tmp_path):
    """Root ignores permissions, so the run drops the capabilities that let it (CAP_DAC_OVERRIDE and friends)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv(1) to run without permission overrides")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    caps = "-dac_override,-dac_read_search"
    setpriv = ("setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}")
    args = (f"--config.input={input_copy[0]}", f"--config.output={locked / 'out'}")
    result = subprocess.run(
        [*setpriv, sys.executable, "-m", "openpi_merge", "--config=configs/pi0_lora.py", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = error_line(result.returncode, result.stderr, errors.EnvironmentFaultError.exit_code, "permission denied")
    assert str(locked) in line
    _assert_nothing_written(locked, input_copy)
    locked.chmod(0o755)
    _assert_rerun_succeeds(input_copy, locked / "out")


def test_an_output_that_is_the_input_bind_mounted_is_refused(mounts, input_copy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mounts("--bind", str(input_copy[0]), str(out))
    result = merge(input_copy[0], out, "--config.overwrite=True")
    error_line(result.returncode, result.stderr, errors.OutputError.exit_code, "is the input")
    step, before = input_copy
    assert tree_hashes(step) == before
    subprocess.run(["umount", str(out)], check=True)
    _assert_rerun_succeeds(input_copy, out, "--config.overwrite=True", keep=["input"])


def test_a_mount_point_as_output_cannot_be_replaced(mounts, input_copy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mounts("-t", "tmpfs", "-o", "size=8m", "tmpfs", str(out))
    (out / "params").mkdir()  # An old checkpoint, which overwrite may replace, but not at a mount point.
    result = merge(input_copy[0], out, "--config.overwrite=True")
    error_line(result.returncode, result.stderr, errors.EnvironmentFaultError.exit_code, "is a mount point")
    assert [p.name for p in out.iterdir()] == ["params"]


@pytest.mark.parametrize("link", ["outside-file", "loop"])
def test_a_symlink_in_assets_is_refused_and_nothing_outside_the_input_is_read(input_copy, tmp_path, link):
    step, _ = input_copy
    assets = next((step / "assets").iterdir())
    if link == "outside-file":
        secret = tmp_path / "secret.txt"
        secret.write_text("not for the robot")
        (assets / "extra.json").symlink_to(secret)
    else:
        (assets / "loop").symlink_to(assets / "loop")
    before = tree_hashes(step)
    result = merge(step, tmp_path / "merged")
    error_line(result.returncode, result.stderr, errors.InputError.exit_code, "is a symbolic link")
    assert not (tmp_path / "merged").exists()
    assert not any(p.name.startswith(".merged") for p in tmp_path.iterdir())
    assert tree_hashes(step) == before
    next(p for p in assets.iterdir() if p.is_symlink()).unlink()
    kept = ["input", "secret.txt"] if link == "outside-file" else ["input"]
    _assert_rerun_succeeds((step, tree_hashes(step)), tmp_path / "merged", keep=kept)


def test_a_report_path_that_is_a_directory_is_refused_before_the_merge(input_copy, tmp_path):
    (tmp_path / "report").mkdir()
    result = merge(input_copy[0], tmp_path / "merged", f"--config.report={tmp_path / 'report'}")
    error_line(result.returncode, result.stderr, errors.ConfigError.exit_code, "is a directory: name a file")
    assert not (tmp_path / "merged").exists()
    report = tmp_path / "report" / "merge.json"
    _assert_rerun_succeeds(input_copy, tmp_path / "merged", f"--config.report={report}", keep=["input", "report"])
    assert json.loads(report.read_text())["exit_code"] == 0


@pytest.mark.parametrize("mode", [(), ("--config.memory_budget_gb=0.0001",)], ids=["in-memory", "streamed"])
def test_nan_in_a_kept_leaf_exits_5_naming_it(tmp_path, mode):
    flat = traverse_util.flatten_dict(synthetic.make_params("pi0", "tiny"))
    path = ("PaliGemma", "img", "embedding", "kernel")
    flat[path] = np.asarray(flat[path]).copy()
    flat[path].reshape(-1)[3] = np.nan
    write_params(tmp_path / "nan" / "params", flat)
    result = merge(tmp_path / "nan", tmp_path / "merged", *mode)
    error_line(result.returncode, result.stderr, errors.NumericsError.exit_code, "PaliGemma/img/embedding/kernel")
    assert not (tmp_path / "merged").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan"]


def test_a_report_on_a_full_disk_commits_nothing_and_a_rerun_succeeds(mounts, input_copy, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounts("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk))
    filler = disk / "filler"
    with filler.open("wb") as f:
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(disk).free)
    report = disk / "merge.json"
    result = merge(input_copy[0], tmp_path / "merged", f"--config.report={report}")
    error_line(result.returncode, result.stderr, errors.EnvironmentFaultError.exit_code, "no space left")
    _assert_nothing_written(tmp_path, input_copy, keep=["input", "disk"])
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]
    filler.unlink()
    _assert_rerun_succeeds(input_copy, tmp_path / "merged", f"--config.report={report}", keep=["input", "disk"])
    assert json.loads(report.read_text())["status"] == "ok"


def test_an_old_output_that_cannot_be_removed_is_named_and_blocks_no_later_run(mounts, input_copy, tmp_path):
    out = tmp_path / "merged"
    assert merge(input_copy[0], out).returncode == 0
    stuck = out / "stuck"
    stuck.mkdir()
    mounts("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(stuck))  # rmtree cannot remove a mount point (EBUSY).
    replaced = merge(input_copy[0], out, "--config.overwrite=True")
    assert replaced.returncode == 0, replaced.stderr
    assert "could not remove" in replaced.stdout
    assert "remove it by hand" in replaced.stdout
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.openpi-merge-staging-")]
    assert len(left) == 1
    assert str(left[0]) in replaced.stdout
    again = merge(input_copy[0], out, "--config.overwrite=True")
    assert again.returncode == 0, again.stderr
    assert (out / "params").is_dir()
    subprocess.run(["umount", "-l", str(left[0] / "stuck")], check=True)  # Moved with the old output.
