"""SIGINT and SIGTERM: one line, exit 130 or 143, nothing committed and nothing left beside the output, whenever they
arrive; real signals sent to real runs."""

import pathlib
import signal
import time

import pytest
from helpers import error_line, file_hashes, start_cli, start_merge, wait_for

# Signals raced against a start-up or a commit: on a quiet machine, not beside the other stack (conftest).
pytestmark = pytest.mark.alone

EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_output_is_staged_commits_nothing(tiny_checkpoint, tmp_path, signum):
    step, out, gate = tiny_checkpoint("pi0"), tmp_path / "out", tmp_path.parent / f"{tmp_path.name}-gate"
    before = file_hashes(step)
    run = start_merge(step, out, hook=f"staging-ready:wait:{gate}")
    wait_for(gate.with_name(gate.name + ".reached"), run)
    run.send_signal(signum)
    time.sleep(0.2)
    gate.touch()  # The run goes on to its next step boundary, where it stops.
    _, stderr = run.communicate(timeout=300)
    error_line(run.returncode, stderr, EXIT[signum], f"interrupted by {signum.name}: nothing was committed")
    assert list(tmp_path.iterdir()) == []
    assert file_hashes(step) == before
    rerun = start_merge(step, out)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("delay", [0.5, 2.0, 4.0])
def test_a_sigint_at_any_moment_leaves_either_nothing_or_a_complete_output(tiny_checkpoint, tmp_path, delay):
    run = start_merge(tiny_checkpoint("pi0"), tmp_path / "out")
    time.sleep(delay)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=300)
    if run.returncode == 0:  # It had committed before the signal came.
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    else:
        error_line(run.returncode, stderr, 130, "interrupted by SIGINT")
        assert list(tmp_path.iterdir()) == []


def test_a_sigterm_just_before_the_commit_keeps_the_old_output(tiny_checkpoint, tmp_path):
    step, out = tiny_checkpoint("pi0"), tmp_path / "out"
    first = start_merge(step, out)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    old = file_hashes(out)
    run = start_cli(
        "--config=configs/pi0_lora.py",
        f"--config.input={step}",
        f"--config.output={out}",
        "--config.overwrite=True",
        "--config.dtype=float32",
        hook="before-commit:term",
    )
    _, stderr = run.communicate(timeout=300)
    error_line(run.returncode, stderr, 143, "interrupted by SIGTERM")
    assert file_hashes(out) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _before_any_code_of_ours(stderr: str) -> bool:
    """A KeyboardInterrupt inside the interpreter's own start-up (``site`` and the ``.pth`` files it runs, then
    ``runpy`` finding the package: tens of ms under load, before the package's first line runs), which no code of a
    program can catch: a traceback none of whose frames is in the package."""
    frames = [line for line in stderr.splitlines() if line.strip().startswith('File "')]
    return bool(frames) and not any("/openpi_merge/" in f for f in frames)


@pytest.mark.parametrize("delay", [0.0, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3])
def test_a_sigint_during_start_up_is_one_line_never_a_traceback(tiny_checkpoint, tmp_path, delay):
    run = start_merge(tiny_checkpoint("pi0"), tmp_path / "out")
    time.sleep(delay)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=300)
    if _before_any_code_of_ours(stderr):
        return
    assert "Traceback" not in stderr, stderr
    if run.returncode == -signal.SIGINT:
        # Only before the interpreter runs any code at all does SIGINT still meet the kernel's default action.
        assert stderr == "", stderr
    else:
        error_line(run.returncode, stderr, 130, "interrupted by SIGINT")
    assert list(tmp_path.iterdir()) == []


def _ignores_sigint(pid: int) -> bool:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    ignored = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)
    return bool(ignored & (1 << (signal.SIGINT - 1)))


def test_a_merge_started_with_sigint_ignored_keeps_ignoring_it(tiny_checkpoint, tmp_path):
    """How a script's shell starts a background job (``openpi-merge ... &``): a Ctrl-C meant for the script must not
    end the merge, at start-up (before and after the restart) or later."""
    out = tmp_path / "out"
    run = start_merge(tiny_checkpoint("pi0"), out, ignoring_sigint=True)
    while not _ignores_sigint(run.pid):  # The shell's trap, which the exec'd merge inherits, is in place.
        time.sleep(0.001)
    while run.poll() is None:
        run.send_signal(signal.SIGINT)
        time.sleep(0.02)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    assert (out / "params").is_dir()


def test_sigints_after_the_commit_leave_exit_0_and_the_output_complete(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    run = start_merge(tiny_checkpoint("pi0"), out)
    wait_for(out, run)  # Renamed into place: committed.
    sent = 0
    while run.poll() is None and sent < 2000:  # Through the summary and the interpreter's shutdown.
        run.send_signal(signal.SIGINT)
        sent += 1
        time.sleep(0.005)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, (run.returncode, stderr)
    assert (out / "params").is_dir()
