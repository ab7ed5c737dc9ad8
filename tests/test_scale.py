"""Sharded, multi-process and streamed merges write exactly what a single-device, in-memory merge writes.

JAX reads XLA_FLAGS once, at import: runs with 8 (or 2 x 4) forced CPU devices go through the CLI in subprocesses.
Merged kernels are written float32 here, so no difference hides in a rounding to bfloat16.
"""

import json
import os
import signal
import socket
import subprocess
import time

import jax
import pytest
from helpers import REPO, cli_command, file_hashes, restore_flat
from jax.sharding import PartitionSpec

from openpi_merge import checkpoint, config, errors, groups, plan, sharding
from openpi_merge.testing import synthetic

MODEL = "pi0"
FLOAT32 = "--config.dtype=float32"


def _command(step, out, *overrides) -> list[str]:
    return cli_command(MODEL, step, out, FLOAT32, *overrides)


def _env(devices: int) -> dict[str, str]:
    """``devices`` CPU devices, also on a host with an accelerator (which would otherwise be the default backend)."""
    forced = f"--xla_force_host_platform_device_count={devices}"
    return {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": forced, "JAX_PLATFORMS": "cpu"}


def _run(step, out, *overrides, devices: int = 1) -> subprocess.CompletedProcess:
    result = subprocess.run(
        _command(step, out, *overrides), cwd=REPO, env=_env(devices), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_processes(step, out, *overrides, num_processes: int = 2, devices: int = 4) -> list[subprocess.Popen]:
    """One merge as ``num_processes`` JAX processes on 127.0.0.1, each with ``devices`` CPU devices."""
    port = _free_port()
    return [
        subprocess.Popen(
            _command(
                step,
                out,
                "--config.mesh=fsdp=-1",
                "--config.distributed.enabled=True",
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                f"--config.distributed.num_processes={num_processes}",
                f"--config.distributed.process_id={i}",
                *overrides,
            ),
            cwd=REPO,
            env=_env(devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(num_processes)
    ]


def _finish(processes: list[subprocess.Popen]) -> list[str]:
    """Waits for every process; returns their stdouts."""
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (_, stderr) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, stderr
    return [stdout for stdout, _ in outputs]


def _assert_same_params(got_step, want_step):
    got, want = restore_flat(got_step / "params"), restore_flat(want_step / "params")
    assert got.keys() == want.keys()
    for path, value in want.items():
        assert (got[path].dtype, got[path].shape) == (value.dtype, value.shape), path
        assert got[path].tobytes() == value.tobytes(), f"{'/'.join(path)} differs"
    # The integrity manifest records the same checksums whatever the mesh, mode or process count.
    manifests = [json.loads((step / "openpi_merge_manifest.json").read_text()) for step in (got_step, want_step)]
    assert manifests[0]["params"] == manifests[1]["params"]


@pytest.fixture(scope="module")
def single_device_output(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "merged"
    _run(tiny_checkpoint(MODEL), out)
    return out


@pytest.mark.parametrize(
    ("shape", "mesh", "spec"),
    [
        ((18, 2048, 16384), (("fsdp", 8),), PartitionSpec(None, None, "fsdp")),
        ((18, 2048, 16384), (("fsdp", 4), ("tp", 2)), PartitionSpec(None, "tp", "fsdp")),
        ((64, 64), (("fsdp", 8),), PartitionSpec(None, "fsdp")),  # Ties go to the later axis.
        ((3, 5), (("fsdp", 8),), PartitionSpec(None, None)),  # Nothing divisible: replicated.
        ((), (("fsdp", 8),), PartitionSpec()),
        ((16, 6), (("fsdp", 4), ("tp", 4)), PartitionSpec("fsdp", None)),  # tp finds no free axis it divides.
    ],
)
def test_partition_spec_rule(shape, mesh, spec):
    assert sharding.partition_spec(shape, mesh) == spec


def test_mesh_larger_than_the_devices():
    n = jax.device_count()
    with pytest.raises(errors.ConfigError, match=f"needs a multiple of {2 * n} devices; there are {n}"):
        sharding.make_layout(config.parse_mesh(f"fsdp={2 * n},tp=-1"))


def test_sharded_merge_is_bit_identical(tiny_checkpoint, single_device_output, tmp_path):
    out = tmp_path / "merged"
    result = _run(tiny_checkpoint(MODEL), out, "--config.mesh=fsdp=4,tp=2", devices=8)
    assert "mesh fsdp=4, tp=2 over 8 cpu devices" in result.stdout
    _assert_same_params(out, single_device_output)


def test_two_processes_write_what_one_writes_and_a_killed_run_commits_nothing(
    tiny_checkpoint, single_device_output, tmp_path
):
    step, out = tiny_checkpoint(MODEL), tmp_path / "merged"
    processes = _start_processes(step, out)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".merged.openpi-merge-staging-*")):  # Process 0 made the staging dir: saving begins.
        assert all(p.poll() is None for p in processes), "the run ended before it staged its output"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    processes[1].send_signal(signal.SIGKILL)
    time.sleep(2)  # Process 0 cannot commit without process 1: it waits at a barrier.
    processes[0].send_signal(signal.SIGKILL)
    for p in processes:
        p.communicate(timeout=60)
    assert not out.exists()

    stdouts = _finish(_start_processes(step, out))  # The same config again.
    assert "over 8 cpu devices in 2 processes" in stdouts[0]
    assert "folded" not in stdouts[1], "only process 0 reports"
    assert file_hashes(out / "assets") == file_hashes(step / "assets")
    _assert_same_params(out, single_device_output)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"], "the killed run's staging dir was not removed"


def test_groups_cover_the_plan_once_within_the_budget(tiny_checkpoint):
    cfg = config.make_config(MODEL)
    cfg.input, cfg.output = str(tiny_checkpoint(MODEL)), "out"
    merge_plan = plan.make_plan(
        checkpoint.read_contents(tiny_checkpoint(MODEL) / "params").leaves, config.read_settings(cfg)
    )
    budget = 100_000
    parts = groups.make_groups(merge_plan, budget)
    written = [leaf.path for group in parts for leaf in group.leaves_out]
    assert sorted(written) == sorted(leaf.path for leaf in merge_plan.leaves_out)
    assert len(set(written)) == len(written) == len(synthetic.param_specs(MODEL, "tiny", lora=False))
    assert len(parts) > 1
    for group in parts:
        assert groups.nbytes(group) <= budget or len(group.pairs) + len(group.kept) == 1


def test_streamed_merge_is_bit_identical_verified_and_reloaded(tiny_checkpoint, single_device_output, tmp_path):
    out = tmp_path / "merged"
    result = _run(tiny_checkpoint(MODEL), out, "--config.memory_budget_gb=0.0001", "--config.verify_reload=True")
    assert "streamed:" in result.stdout
    assert "mlp/gating_einsum needs" in result.stdout
    assert "processed alone" in result.stdout
    assert "not verified" not in result.stdout, "every streamed pair is verified"
    assert "reload" in result.stdout
    _assert_same_params(out, single_device_output)


def test_two_processes_streamed_and_reloaded_write_what_one_writes(tiny_checkpoint, single_device_output, tmp_path):
    out = tmp_path / "merged"
    stdouts = _finish(
        _start_processes(tiny_checkpoint(MODEL), out, "--config.memory_budget_gb=0.0001", "--config.verify_reload=True")
    )
    assert "streamed:" in stdouts[0]
    assert "reload" in stdouts[0]
    _assert_same_params(out, single_device_output)
