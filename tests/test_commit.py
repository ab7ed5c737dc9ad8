"""The commit protocol (openpi_merge/commit.py): no instant of a run, SIGKILL included, loses a complete output, and
two runs for one output never meet. Real runs, real signals; the test hook holds or kills a run at an exact point."""

import os
import signal

import pytest
from helpers import error_line, run_cli, start_cli, tree_hashes, wait_for

from openpi_merge import commit, errors

MANIFEST = "openpi_merge_manifest.json"


def _merge(step, out, *overrides, hook=None):
    args = (f"--config.input={step}", f"--config.output={out}", *overrides)
    return run_cli("--config=configs/pi0_lora.py", *args, hook=hook)


def _start(step, out, *overrides, hook=None):
    args = (f"--config.input={step}", f"--config.output={out}", *overrides)
    return start_cli("--config=configs/pi0_lora.py", *args, hook=hook)


@pytest.fixture
def old_output(tiny_checkpoint, tmp_path):
    """A finished output written in float32: its bytes differ from those of a default (bfloat16) merge."""
    out = tmp_path / "out"
    result = _merge(tiny_checkpoint("pi0"), out, "--config.dtype=float32")
    assert result.returncode == 0, result.stderr
    return out, tree_hashes(out)


def _check(out) -> None:
    result = run_cli("--config=configs/pi0_lora.py", "--config.mode=check", f"--config.input={out}")
    assert result.returncode == 0, result.stderr


def test_a_failed_block_leaves_nothing_beside_the_output(tmp_path):
    def failing_run():
        with (
            commit.claim(tmp_path / "out", overwrite=False, needed_bytes=0) as held,
            commit.staged(held, "feed") as staging,
        ):
            (staging / "params").mkdir()
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing_run()
    assert list(tmp_path.iterdir()) == []


def test_stale_staging_dirs_of_killed_runs_are_removed_by_the_next_run(tiny_checkpoint, tmp_path):
    for stale in (".out.openpi-merge-staging-deadbeef", ".out.openpi-merge-tmp-0badf00d"):  # Ours, and 0.1's.
        (tmp_path / stale / "params").mkdir(parents=True)
    assert _merge(tiny_checkpoint("pi0"), tmp_path / "out").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_kill_right_after_the_exchange_leaves_the_new_output_complete(tiny_checkpoint, old_output, tmp_path):
    out, old = old_output
    killed = _merge(tiny_checkpoint("pi0"), out, "--config.overwrite=True", hook="after-exchange:kill")
    assert killed.returncode == -signal.SIGKILL
    assert tree_hashes(out) != old
    _check(out)  # The new output, complete: it matches the manifest written with it.
    left = {p.name for p in tmp_path.iterdir()} - {"out", ".out.openpi-merge.lock"}  # The lock died with the run.
    assert len(left) == 1
    assert left.pop().startswith(".out.openpi-merge-staging-")  # The old output, now garbage.

    rerun = _merge(tiny_checkpoint("pi0"), out, "--config.overwrite=True")
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_kill_between_the_two_renames_keeps_the_old_output_for_the_next_run(tiny_checkpoint, old_output, tmp_path):
    out, old = old_output
    hook = "swap:fallback,after-retire:kill"
    killed = _merge(tiny_checkpoint("pi0"), out, "--config.overwrite=True", hook=hook)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()
    assert tree_hashes(tmp_path / ".out.openpi-merge-previous") == old

    refused = _merge(tiny_checkpoint("pi0"), out)  # No overwrite: the old output comes back and is kept.
    error_line(refused.returncode, refused.stderr, errors.OutputError.exit_code, "already exists")
    assert tree_hashes(out) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_fallback_swap_replaces_an_output(tiny_checkpoint, old_output, tmp_path):
    out, old = old_output
    result = _merge(tiny_checkpoint("pi0"), out, "--config.overwrite=True", hook="swap:fallback")
    assert result.returncode == 0, result.stderr
    assert tree_hashes(out) != old
    _check(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_second_run_for_the_same_output_exits_6_naming_the_first(tiny_checkpoint, tmp_path):
    step, out, gate = tiny_checkpoint("pi0"), tmp_path / "out", tmp_path.parent / f"{tmp_path.name}-gate"
    first = _start(step, out, "--config.overwrite=True", hook=f"staging-ready:wait:{gate}")
    try:
        wait_for(gate.with_name(gate.name + ".reached"), first)
        (staging,) = tmp_path.glob(".out.openpi-merge-staging-*")
        before = tree_hashes(staging)
        second = _merge(step, out, "--config.overwrite=True")
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
    run = _start(step, out, hook=f"staging-ready:wait:{gate}")
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
    killed = _merge(tiny_checkpoint("pi0"), tmp_path / "out", hook="staging-ready:kill")
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / ".out.openpi-merge.lock").exists()  # Left behind, but no longer locked by anyone.
    rerun = _merge(tiny_checkpoint("pi0"), tmp_path / "out")
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_lock_file_names_its_holder(tmp_path):
    target = tmp_path / "out"
    with commit.claim(target, overwrite=False, needed_bytes=0) as held:
        assert f"pid {os.getpid()} on " in held.lock_path.read_text()
        with pytest.raises(errors.OutputError, match=f"pid {os.getpid()} on "):
            commit.claim(target, overwrite=False, needed_bytes=0).__enter__()
    assert list(tmp_path.iterdir()) == []
