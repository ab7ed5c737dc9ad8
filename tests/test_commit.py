"""The commit protocol (openpi_merge/commit.py): no instant of a run, SIGKILL included, loses a complete output, and
two runs for one output never meet. Real runs, real signals; the test hook holds or kills a run at an exact point."""

import os
import shutil
import signal

import pytest
from helpers import error_line, merge, run_cli, start_merge, tree_hashes, wait_for

from openpi_merge import commit, errors

MANIFEST = "openpi_merge_manifest.json"


@pytest.fixture
def old_output(tiny_checkpoint, tmp_path):
    """A finished output written in float32: its bytes differ from those of a default (bfloat16) merge."""
    out = tmp_path / "out"
    result = merge(tiny_checkpoint("pi0"), out, "--config.dtype=float32")
    assert result.returncode == 0, result.stderr
    return out, tree_hashes(out)


def _check(out) -> None:
    result = run_cli("--config=configs/pi0_lora.py", "--config.mode=check", f"--config.input={out}")
    assert result.returncode == 0, result.stderr


def test_a_failed_block_leaves_nothing_beside_the_output(tmp_path):
    def failing_run():
        with commit.claim(tmp_path / "out", overwrite=False, needed_bytes=0) as held:
            staging = held.stage("feedf00d")
            (staging / "params").mkdir()
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing_run()
    assert list(tmp_path.iterdir()) == []


def test_stale_staging_dirs_of_killed_runs_are_removed_by_the_next_run(tiny_checkpoint, tmp_path):
    for stale in (".out.openpi-merge-staging-deadbeef", ".out.openpi-merge-tmp-0badf00d"):  # Ours, and 0.1's.
        (tmp_path / stale / "params").mkdir(parents=True)
    assert merge(tiny_checkpoint("pi0"), tmp_path / "out").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_kill_right_after_the_exchange_leaves_the_new_output_complete(tiny_checkpoint, old_output, tmp_path):
    out, old = old_output
    killed = merge(tiny_checkpoint("pi0"), out, "--config.overwrite=True", hook="after-exchange:kill")
    assert killed.returncode == -signal.SIGKILL
    assert tree_hashes(out) != old
    _check(out)  # The new output, complete: it matches the manifest written with it.
    left = {p.name for p in tmp_path.iterdir()} - {"out", ".out.openpi-merge.lock"}  # The lock died with the run.
    assert len(left) == 1
    assert left.pop().startswith(".out.openpi-merge-staging-")  # The old output, now garbage.

    rerun = merge(tiny_checkpoint("pi0"), out, "--config.overwrite=True")
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_kill_between_the_two_renames_keeps_the_old_output_for_the_next_run(tiny_checkpoint, old_output, tmp_path):
    out, old = old_output
    hook = "swap:fallback,after-retire:kill"
    killed = merge(tiny_checkpoint("pi0"), out, "--config.overwrite=True", hook=hook)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()
    assert tree_hashes(tmp_path / ".out.openpi-merge-previous") == old

    refused = merge(tiny_checkpoint("pi0"), out)  # No overwrite: the old output comes back and is kept.
    error_line(refused.returncode, refused.stderr, errors.OutputError.exit_code, "already exists")
    assert tree_hashes(out) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_fallback_swap_replaces_an_output(tiny_checkpoint, old_output, tmp_path):
    out, old = old_output
    result = merge(tiny_checkpoint("pi0"), out, "--config.overwrite=True", hook="swap:fallback")
    assert result.returncode == 0, result.stderr
    assert tree_hashes(out) != old
    _check(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_second_run_for_the_same_output_exits_6_naming_the_first(tiny_checkpoint, tmp_path):
    step, out, gate = tiny_checkpoint("pi0"), tmp_path / "out", tmp_path.parent / f"{tmp_path.name}-gate"
    first = start_merge(step, out, "--config.overwrite=True", hook=f"staging-ready:wait:{gate}")
    try:
        wait_for(gate.with_name(gate.name + ".reached"), first)
        (staging,) = tmp_path.glob(".out.openpi-merge-staging-*")
        before = tree_hashes(staging)
        second = merge(step, out, "--config.overwrite=True")
        line = error_line(second.returncode, second.stderr, errors.OutputError.exit_code, "is being written by")
        assert f"pid {first.pid} " in line
        assert tree_hashes(staging) == before
    finally:
        gate.touch()
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_output_that_appears_during_the_run_is_not_replaced(tiny_checkpoint, tmp_path):
    step, out, gate = tiny_checkpoint("pi0"), tmp_path / "out", tmp_path.parent / f"{tmp_path.name}-gate"
    run = start_merge(step, out, hook=f"staging-ready:wait:{gate}")
    wait_for(gate.with_name(gate.name + ".reached"), run)
    out.mkdir()
    (out / "mine.txt").write_text("someone else's")
    gate.touch()
    _, stderr = run.communicate(timeout=300)
    error_line(run.returncode, stderr, errors.OutputError.exit_code, "already exists")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert (out / "mine.txt").read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_lock_dies_with_its_process(tiny_checkpoint, tmp_path):
    killed = merge(tiny_checkpoint("pi0"), tmp_path / "out", hook="staging-ready:kill")
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / ".out.openpi-merge.lock").exists()  # Left behind, but no longer locked by anyone.
    rerun = merge(tiny_checkpoint("pi0"), tmp_path / "out")
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_lock_file_names_its_holder(tmp_path):
    target = tmp_path / "out"
    with commit.claim(target, overwrite=False, needed_bytes=0) as held:
        assert f"pid {os.getpid()} on " in held.lock_path.read_text()
        with pytest.raises(errors.OutputError, match=f"pid {os.getpid()} on "):
            commit.claim(target, overwrite=False, needed_bytes=0).__enter__()
    assert list(tmp_path.iterdir()) == []


def test_a_glob_in_the_output_name_leaves_another_runs_staging_alone(tiny_checkpoint, tmp_path):
    gate = tmp_path / "gate"
    other = start_merge(tiny_checkpoint("pi0"), tmp_path / "ckpt1", hook=f"staging-ready:wait:{gate}")
    wait_for(tmp_path / "gate.reached", other)
    for name in ("ckpt[1]", "ckpt?", "ckpt*"):
        result = merge(tiny_checkpoint("pi0"), tmp_path / name)
        assert result.returncode == 0, result.stderr
    assert [p.name for p in tmp_path.glob(".ckpt1.openpi-merge-staging-*")], "the live run's staging dir is gone"
    gate.touch()
    _, stderr = other.communicate(timeout=300)
    assert other.returncode == 0, stderr
    _check(tmp_path / "ckpt1")


def test_overwrite_replaces_only_a_checkpoint(tiny_checkpoint, tmp_path):
    users = tmp_path / "work"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    result = merge(tiny_checkpoint("pi0"), users, "--config.overwrite=True")
    error_line(result.returncode, result.stderr, errors.OutputError.exit_code, "holds no checkpoint")
    assert [p.name for p in users.iterdir()] == ["notes.txt"]


def test_an_output_under_a_regular_file_is_named_as_such(tiny_checkpoint, tmp_path):
    (tmp_path / "file").write_text("")
    result = merge(tiny_checkpoint("pi0"), tmp_path / "file" / "out")
    error_line(result.returncode, result.stderr, errors.OutputError.exit_code, "which is a file, not a directory")


def test_an_output_name_of_225_characters_merges(tiny_checkpoint, tmp_path):
    out = tmp_path / ("m" * 225)
    result = merge(tiny_checkpoint("pi0"), out)
    assert result.returncode == 0, result.stderr
    _check(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


@pytest.mark.parametrize("where", ["input-metadata", "output-manifest", "beside-the-output"])
def test_a_report_path_inside_the_input_or_the_output_is_refused(tiny_checkpoint, tmp_path, where):
    step = tmp_path / "input"
    shutil.copytree(tiny_checkpoint("pi0"), step)
    before, out = tree_hashes(step), tmp_path / "out"
    report = {
        "input-metadata": step / "params" / "_METADATA",
        "output-manifest": out / "openpi_merge_manifest.json",
        "beside-the-output": tmp_path / ".out.openpi-merge.lock",
    }[where]
    result = merge(step, out, f"--config.report={report}")
    error_line(result.returncode, result.stderr, errors.ConfigError.exit_code, "report=")
    assert tree_hashes(step) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input"]
