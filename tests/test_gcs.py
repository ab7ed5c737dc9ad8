"""Merges from and to gs:// against a real GCS JSON API on 127.0.0.1 (fake-gcs-server), through the CLI.

pi0-FAST checkpoints keep each run short (one expert: half the fuse steps to compile). Every gs:// output is compared,
bit for bit, with the same merge written to local disk.
"""

import hashlib
import json
import os
import signal
import subprocess
import time

import gcs_emulator
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import GCS_BUCKET
from etils import epath
from helpers import REPO, STEP_DIR_NAMES, cli_command, restore_flat, run_cli

from openpi_merge import errors, objectstore_commit, storage

MODEL = "pi0_fast"
STREAMED = "--config.memory_budget_gb=0.0001"
MARKERS = ["commit_success.txt", "params/commit_success.txt"]


def _gs(*parts: str) -> str:
    return "/".join((f"gs://{GCS_BUCKET}", *parts))


def _command(source, out, *overrides) -> list[str]:
    return cli_command(MODEL, source, out, *overrides)


def _merge_result(source, out, *overrides) -> subprocess.CompletedProcess:
    return run_cli(
        f"--config=configs/{MODEL}_lora.py", f"--config.input={source}", f"--config.output={out}", *overrides
    )


def _merge(source, out, *overrides) -> subprocess.CompletedProcess:
    result = _merge_result(source, out, *overrides)
    assert result.returncode == 0, result.stderr
    return result


def _assert_fails(result, error: type[errors.MergeError], message: str) -> None:
    assert result.returncode == error.exit_code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("openpi-merge: error:")]
    assert len(lines) == 1, result.stderr
    assert message in lines[0], lines[0]


def _names(emulator, prefix: str) -> list[str]:
    """Object names under gs://GCS_BUCKET/prefix/, relative to it."""
    return [name.removeprefix(prefix + "/") for name in emulator.objects(GCS_BUCKET, prefix + "/")]


def _assert_same_params(got, want) -> None:
    got, want = restore_flat(got), restore_flat(want)
    assert got.keys() == want.keys()
    for path, value in want.items():
        assert (got[path].dtype, got[path].shape) == (value.dtype, value.shape), path
        assert got[path].tobytes() == value.tobytes(), f"{'/'.join(path)} differs"


def _assert_finished_step(emulator, prefix: str, local_step) -> None:
    """A committed merger output: markers, params, the input's assets byte for byte, nothing of the protocol left."""
    names = _names(emulator, prefix)
    assert set(MARKERS) <= set(names)
    assert objectstore_commit.CLAIM not in names
    assert not [n for n in names if n.startswith(objectstore_commit.ORBAX_COMMIT_DIR)], names
    assets = sorted(p.relative_to(local_step).as_posix() for p in (local_step / "assets").rglob("*") if p.is_file())
    assert assets
    for name in assets:
        assert emulator.read(GCS_BUCKET, f"{prefix}/{name}") == (local_step / name).read_bytes()


def _wait_for_objects(emulator, prefix: str, process: subprocess.Popen) -> None:
    """Returns once the run has written array data under ``prefix``: it is mid-save."""
    deadline = time.monotonic() + 120
    while not [n for n in _names(emulator, prefix) if "/ocdbt.process_0/d/" in f"/{n}"]:
        assert process.poll() is None, "the run ended before it wrote any array"
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.fixture(scope="module")
def local_merge(tiny_checkpoint, tmp_path_factory):
    """The reference: the same merge, local disk to local disk."""
    out = tmp_path_factory.mktemp("local") / "merged"
    _merge(tiny_checkpoint(MODEL), out)
    return out


@pytest.fixture(scope="module")
def gs_merge(gcs, gcs_checkpoint):
    """gs:// in -> gs:// out, in memory, its report written to the bucket too (shared by tests that only read it)."""
    out = _gs("merged", "gs-to-gs")
    _merge(gcs_checkpoint(MODEL), out, f"--config.report={_gs('reports', 'gs-to-gs.json')}")
    return out


def test_bucket_to_bucket_merge_matches_the_local_merge(gcs, gs_merge, tiny_checkpoint, local_merge):
    _assert_finished_step(gcs, "merged/gs-to-gs", tiny_checkpoint(MODEL))
    _assert_same_params(epath.Path(gs_merge) / "params", local_merge / "params")
    report = json.loads(gcs.read(GCS_BUCKET, "reports/gs-to-gs.json"))
    assert (report["status"], report["output"]) == ("ok", gs_merge)


@pytest.mark.skipif(not os.environ.get("OPENPI_MERGE_OTHER_PYTHON"), reason="set by scripts/test.sh: the other stack")
def test_bucket_output_restores_through_openpis_call_under_the_other_stack(gs_merge):
    """Under the latest stack the other one is openpi's pin: orbax-checkpoint 0.11.13 restores what was written."""
    read = subprocess.run(
        [os.environ["OPENPI_MERGE_OTHER_PYTHON"], str(REPO / "tests" / "openpi_restore.py"), gs_merge],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert read.returncode == 0, read.stderr
    here = restore_flat(epath.Path(gs_merge) / "params")
    assert json.loads(read.stdout) == {
        "/".join(p): [list(v.shape), v.dtype.name, hashlib.sha256(v.tobytes()).hexdigest()] for p, v in here.items()
    }


def test_bucket_to_local_merge_matches_the_local_merge(gcs_checkpoint, gs_merge, local_merge, tmp_path):
    """With a gs:// reference (the output tree is checked against it) as well."""
    out = tmp_path / "merged"
    _merge(gcs_checkpoint(MODEL), out, f"--config.reference={gs_merge}")
    assert sorted(p.name for p in out.iterdir()) == STEP_DIR_NAMES
    _assert_same_params(out / "params", local_merge / "params")


def test_a_bucket_output_passes_the_manifest_check(gs_merge):
    result = run_cli(f"--config=configs/{MODEL}_lora.py", "--config.mode=check", f"--config.input={gs_merge}")
    assert result.returncode == 0, result.stderr
    assert f"{gs_merge} matches its manifest" in result.stdout


def test_streamed_local_to_bucket_merge_matches_the_local_merge(gcs, tiny_checkpoint, local_merge):
    out = _gs("merged", "streamed")
    result = _merge(tiny_checkpoint(MODEL), out, STREAMED, "--config.verify_reload=True")
    assert "streamed:" in result.stdout
    _assert_finished_step(gcs, "merged/streamed", tiny_checkpoint(MODEL))
    _assert_same_params(epath.Path(out) / "params", local_merge / "params")


def test_finished_output_is_refused_without_overwrite(gs_merge, gcs_checkpoint):
    _assert_fails(_merge_result(gcs_checkpoint(MODEL), gs_merge), errors.OutputError, "already holds a finished")


def test_output_prefix_with_objects_of_another_writer_is_refused(gcs, tiny_checkpoint):
    epath.Path(_gs("foreign", "notes.txt")).write_text("not a checkpoint")
    result = _merge_result(tiny_checkpoint(MODEL), _gs("foreign"))
    _assert_fails(result, errors.OutputError, "is not empty")
    assert _names(gcs, "foreign") == ["notes.txt"]


@pytest.mark.parametrize("side", ["input", "output"])
def test_missing_bucket_is_one_line(gcs, gcs_checkpoint, tmp_path, side):
    if side == "input":
        result = _merge_result("gs://no-such-bucket/run/1000", tmp_path / "merged")
        _assert_fails(result, errors.InputError, "input bucket gs://no-such-bucket does not exist")
    else:
        result = _merge_result(gcs_checkpoint(MODEL), "gs://no-such-bucket/merged")
        _assert_fails(result, errors.OutputError, "output bucket gs://no-such-bucket does not exist")


@pytest.mark.parametrize(("side", "error"), [("input", errors.InputError), ("output", errors.EnvironmentFaultError)])
def test_permission_denied_is_one_line(tiny_checkpoint, tmp_path, side, error):
    with gcs_emulator.denying() as url:
        source, out = (
            (_gs("run", "1000"), tmp_path / "merged") if side == "input" else (tiny_checkpoint(MODEL), _gs("x"))
        )
        command = _command(source, out)
        env = {**os.environ, "PYTHONPATH": str(REPO), **gcs_emulator.environment(url)}
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    _assert_fails(result, error, "permission denied")
    assert "GOOGLE_APPLICATION_CREDENTIALS" in result.stderr


def _upload(local, prefix: str, *, leave_out=(), edit=None) -> None:
    """Copies a local step dir to ``prefix`` file by file, as gsutil cp -r does, without any commit_success.txt (a
    local save of orbax 0.11, openpi's pin, has none: it commits by rename)."""
    for name in storage.files(local):
        if name.endswith("commit_success.txt") or name in leave_out:
            continue
        data = (local / name).read_bytes()
        (epath.Path(prefix) / name).write_bytes(edit(name, data) if edit else data)


def test_an_uploaded_step_dir_without_commit_markers_merges(gcs, tiny_checkpoint, local_merge, tmp_path):
    uploaded = _gs("uploaded", "1000")
    _upload(tiny_checkpoint(MODEL), uploaded)
    _merge(uploaded, tmp_path / "merged")
    _assert_same_params(tmp_path / "merged" / "params", local_merge / "params")


def _commit_time_unset(name: str, data: bytes) -> bytes:
    if name != "_CHECKPOINT_METADATA":
        return data
    return json.dumps({**json.loads(data), "commit_timestamp_nsecs": None}).encode()


@pytest.mark.parametrize(
    ("leave_out", "edit"),
    [(("params/manifest.ocdbt",), None), ((), _commit_time_unset), (("_CHECKPOINT_METADATA",), None)],
    ids=["before-the-ocdbt-merge", "before-the-commit-time", "no-commit-record"],
)
def test_an_interrupted_bucket_save_is_refused(gcs, tiny_checkpoint, tmp_path, leave_out, edit):
    unfinished = _gs("unfinished", "-".join(leave_out) or "edited", "1000")
    _upload(tiny_checkpoint(MODEL), unfinished, leave_out=leave_out, edit=edit)
    _assert_fails(_merge_result(unfinished, tmp_path / "merged"), errors.InputError, "is an unfinished save")


def test_a_rerun_after_a_killed_swap_restores_the_complete_copy_before_deleting_it(gcs, gs_merge, gcs_checkpoint):
    out, prefix = _gs("merged", "swapped"), "merged/swapped"
    staging = epath.Path(_gs("merged", f".swapped{objectstore_commit._STAGING}0badf00d"))
    names = storage.objects(epath.Path(gs_merge))
    storage.copy_objects(epath.Path(gs_merge), staging, names)  # The complete new step, as the killed swap left it.
    unfinished = [n for n in names if n not in MARKERS][: len(names) // 2]  # T: markers gone, half copied, claimed.
    storage.copy_objects(epath.Path(gs_merge), epath.Path(out), unfinished)
    (epath.Path(out) / objectstore_commit.CLAIM).write_text("0badf00d")

    result = _merge_result(gcs_checkpoint(MODEL), out)  # No overwrite: after the repair the output exists again.
    _assert_fails(result, errors.OutputError, "already holds a finished checkpoint (restored")
    assert set(MARKERS) <= set(_names(gcs, prefix))
    assert not _names(gcs, f"merged/.swapped{objectstore_commit._STAGING}0badf00d"), "the staging copy was kept"
    _assert_same_params(epath.Path(out) / "params", epath.Path(gs_merge) / "params")


def _assert_orbax_refuses(params_dir: str) -> None:
    """Orbax's restore (and so openpi's restore_params, which calls it) refuses the params dir as unfinished."""
    with ocp.PyTreeCheckpointer() as checkpointer, pytest.raises(ValueError, match="incomplete checkpoint"):
        checkpointer.restore(epath.Path(params_dir))


def test_killed_save_leaves_nothing_restorable_and_a_rerun_succeeds(gcs, tiny_checkpoint, local_merge):
    out, prefix = _gs("merged", "killed"), "merged/killed"
    run = subprocess.Popen(
        _command(tiny_checkpoint(MODEL), out, STREAMED),
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_objects(gcs, prefix, run)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=60)
    names = _names(gcs, prefix)
    assert objectstore_commit.CLAIM in names, "the run was not killed mid-save"
    assert not set(MARKERS) & set(names)
    _assert_orbax_refuses(out + "/params")

    _merge(tiny_checkpoint(MODEL), out, STREAMED)
    _assert_finished_step(gcs, prefix, tiny_checkpoint(MODEL))
    _assert_same_params(epath.Path(out) / "params", local_merge / "params")


def test_overwrite_keeps_the_old_checkpoint_until_the_new_one_is_complete(gcs, gs_merge, tiny_checkpoint):
    out, prefix = _gs("merged", "overwritten"), "merged/overwritten"
    storage.copy_objects(epath.Path(gs_merge), epath.Path(out), storage.objects(epath.Path(gs_merge)))
    old = restore_flat(epath.Path(out) / "params")
    new = ("--config.overwrite=True", "--config.dtype=float32", STREAMED)
    run = subprocess.Popen(
        _command(tiny_checkpoint(MODEL), out, *new),
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    staging = f"merged/.overwritten{objectstore_commit._STAGING}"
    deadline = time.monotonic() + 120
    while not [n for n in gcs.objects(GCS_BUCKET, staging) if "/ocdbt.process_0/d/" in n]:
        assert run.poll() is None, "the run ended before it wrote any array"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)  # The new merge fails mid-save: the old checkpoint must be intact.
    run.wait(timeout=60)
    assert set(MARKERS) <= set(_names(gcs, prefix))
    kept = restore_flat(epath.Path(out) / "params")
    assert kept.keys() == old.keys()
    assert all(kept[p].tobytes() == old[p].tobytes() for p in old)

    _merge(tiny_checkpoint(MODEL), out, *new)
    _assert_finished_step(gcs, prefix, tiny_checkpoint(MODEL))
    assert not gcs.objects(GCS_BUCKET, staging), "the staging prefixes were not removed"
    merged = restore_flat(epath.Path(out) / "params")
    assert {v.dtype for p, v in merged.items() if p[-1] == "w"} == {np.dtype(np.float32)}


def test_storage_failure_mid_save_commits_nothing_and_fails_in_one_line(tiny_checkpoint):
    """A second emulator, which only this run talks to, is stopped mid-save and comes back empty: the clients' retries
    of the refused connections then meet a store without the bucket, a failure no client retries. (An outage that
    lasts is retried by tensorstore for about 15 minutes before the same error: too long to wait for here.)"""
    emulator = gcs_emulator.start()
    env = {**os.environ, "PYTHONPATH": str(REPO), **gcs_emulator.environment(emulator.url)}
    out, prefix = _gs("merged", "network"), "merged/network"
    command = _command(tiny_checkpoint(MODEL), out, STREAMED)
    run = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        emulator.create_bucket(GCS_BUCKET)
        _wait_for_objects(emulator, prefix, run)
        emulator.kill()
        time.sleep(1)
        emulator.start()
        _, stderr = run.communicate(timeout=120)
        failed = subprocess.CompletedProcess(command, run.returncode, "", stderr)
        _assert_fails(failed, errors.EnvironmentFaultError, "failed")
        assert "nothing was committed" in stderr

        emulator.create_bucket(GCS_BUCKET)
        rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        assert set(MARKERS) <= set(_names(emulator, prefix))
    finally:
        run.kill()
        emulator.kill()


def test_two_processes_merge_between_buckets_as_one_process_does(gcs, gcs_checkpoint, tiny_checkpoint, local_merge):
    """2 JAX processes x 4 CPU devices on 127.0.0.1: each writes its own shards, process 0 commits and copies assets."""
    out, prefix, port = _gs("merged", "two-processes"), "merged/two-processes", gcs_emulator.free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    runs = [
        subprocess.Popen(
            _command(
                gcs_checkpoint(MODEL),
                out,
                "--config.mesh=fsdp=-1",
                "--config.distributed.enabled=True",
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
            ),
            cwd=REPO,
            env={**env, "JAX_PLATFORMS": "cpu"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [run.communicate(timeout=300) for run in runs]
    for run, (_, stderr) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, stderr
    assert "over 8 cpu devices in 2 processes" in outputs[0][0]
    names = _names(gcs, prefix)
    assert any(n.startswith("params/ocdbt.process_1/") for n in names), "process 1 wrote no shards of its own"
    _assert_finished_step(gcs, prefix, tiny_checkpoint(MODEL))
    _assert_same_params(epath.Path(out) / "params", local_merge / "params")


def _write_then_fail(gcs, target: epath.Path) -> None:
    with objectstore_commit.claim(target, overwrite=False) as held:
        prefix = held.stage("feedf00d")
        assert prefix == target
        (prefix / "params" / "part").write_text("half a checkpoint")
        assert objectstore_commit.CLAIM in _names(gcs, "protocol/failed")
        raise errors.NumericsError("verification failed")


def test_an_error_inside_the_staged_block_removes_what_it_wrote(gcs):
    with pytest.raises(errors.NumericsError):
        _write_then_fail(gcs, epath.Path(_gs("protocol", "failed")))
    assert _names(gcs, "protocol/failed") == []


def _write_while_another_run_claims(target: epath.Path) -> None:
    with objectstore_commit.claim(target, overwrite=False) as held:
        prefix = held.stage("feedf00d")
        (prefix / "params" / "part").write_text("written by this run")
        (prefix / objectstore_commit.CLAIM).write_text("another run's token")
        held.commit()


def test_a_run_whose_claim_another_run_took_does_not_commit(gcs):
    with pytest.raises(errors.OutputError, match="claimed by another"):
        _write_while_another_run_claims(epath.Path(_gs("protocol", "taken")))
    assert not set(MARKERS) & set(_names(gcs, "protocol/taken"))
