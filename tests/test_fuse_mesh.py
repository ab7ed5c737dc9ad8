"""The fuse stores the same bits on any mesh as on one device, and its per-layer API is the one fuse_pair uses.

Multi-device CPU runs need XLA_FLAGS before JAX is imported: the random-shape property runs all its draws in one
subprocess (``fuse_mesh_worker.py``), the issue-shaped merges go through the CLI (8 devices; 2 processes of 4).
Kernels are bfloat16 here, as openpi stores them, so a float32 difference of one rounding step can show as a
bfloat16 ulp.
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from fuse_mesh_worker import FAMILIES, MESH_SIZES, Draw, make_pair
from helpers import REPO, cli_command, restore_flat

from openpi_merge import errors, fuse, sharding
from openpi_merge.testing import synthetic

TESTS = REPO / "tests"
PROPERTY_SEED = 2  # Draws of this seed differed bit-wise between meshes when each mesh compiled its own fuse program.
PROPERTY_DRAWS = 12  # Two per module kind; over all draws every mesh family runs at sizes 2, 4 and 8 (asserted).


def _cpu_env(devices: int) -> dict[str, str]:
    forced = f"--xla_force_host_platform_device_count={devices}"
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{TESTS}", "XLA_FLAGS": forced, "JAX_PLATFORMS": "cpu"}


def test_random_shapes_fuse_to_the_same_bits_on_every_mesh_as_on_one_device():
    result = subprocess.run(
        [sys.executable, str(TESTS / "fuse_mesh_worker.py"), str(PROPERTY_SEED), str(PROPERTY_DRAWS)],
        env=_cpu_env(8),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["devices"] == 8
    meshes = {mesh.split(" ")[0] for r in report["results"] for mesh in r["differing"]}
    assert len(meshes) == len(FAMILIES) * len(MESH_SIZES), meshes  # Every family at every size ran.
    assert any("'fsdp')" in mesh for r in report["results"] for mesh in r["differing"]), "no last-axis sharding"
    differing = [
        f"{r['draw']} on {mesh}: {n} of {r['elements']} elements"
        for r in report["results"]
        for mesh, n in r["differing"].items()
        if n
    ]
    assert not differing, f"seed {PROPERTY_SEED}: " + "; ".join(differing)


# The shapes of issue 11: 8 heads of 16, an action expert 48 wide with rank 32, depth 2.
_ISSUE_PALIGEMMA = {"num_heads": 8, "head_dim": 16}
_ISSUE_EXPERT = {"num_heads": 8, "head_dim": 16, "width": 48, "rank": 32}


@pytest.fixture(scope="module")
def issue_checkpoint(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(synthetic, "_TINY_PALIGEMMA", dataclasses.replace(synthetic._TINY_PALIGEMMA, **_ISSUE_PALIGEMMA))
        patch.setattr(synthetic, "_TINY_EXPERT", dataclasses.replace(synthetic._TINY_EXPERT, **_ISSUE_EXPERT))
        return synthetic.write_checkpoint(tmp_path_factory.mktemp("issue-11"), model="pi0")


def _merge(step, out, devices: int, *overrides: str) -> dict:
    result = subprocess.run(
        cli_command("pi0", step, out, *overrides),
        cwd=REPO,
        env=_cpu_env(devices),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return json.loads((out / "openpi_merge_manifest.json").read_text())["params"]


def _merge_in_2_processes(step, out) -> dict:
    """One merge as 2 JAX processes on 127.0.0.1 with 4 CPU devices each, over an fsdp mesh of all 8."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    distributed = (
        "--config.mesh=fsdp=-1",
        "--config.distributed.enabled=True",
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        "--config.distributed.num_processes=2",
    )
    processes = [
        subprocess.Popen(
            cli_command("pi0", step, out, *distributed, f"--config.distributed.process_id={i}"),
            cwd=REPO,
            env=_cpu_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in processes:
        _, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr
    return json.loads((out / "openpi_merge_manifest.json").read_text())["params"]


@pytest.fixture(scope="module")
def one_device_merge(issue_checkpoint, tmp_path_factory):
    """(output dir, manifest params) of the issue-shaped checkpoint merged on 1 device, bfloat16 kept."""
    out = tmp_path_factory.mktemp("issue-11-one") / "merged"
    return out, _merge(issue_checkpoint, out, 1)


def test_issue_shaped_merge_on_8_devices_writes_the_bits_of_1_device(issue_checkpoint, one_device_merge, tmp_path):
    one_dir, one = one_device_merge
    eight = _merge(issue_checkpoint, tmp_path / "eight", 8, "--config.mesh=fsdp=-1")
    assert one["PaliGemma/llm/layers/attn/attn_vec_einsum_1/w"]["shape"] == [2, 8, 16, 48]
    assert eight == one
    got, want = restore_flat(tmp_path / "eight" / "params"), restore_flat(one_dir / "params")
    for path, value in want.items():
        assert got[path].tobytes() == value.tobytes(), "/".join(path)


def test_issue_shaped_merge_in_2_processes_writes_the_bits_of_1_device(issue_checkpoint, one_device_merge, tmp_path):
    # bfloat16 kept: each process fuses every layer on its own first device and writes its blocks in place.
    assert _merge_in_2_processes(issue_checkpoint, tmp_path / "two") == one_device_merge[1]


def _attn_vec_pair(seed: int):
    """An openpi-shaped attn_vec_einsum pair (bfloat16 kernel, float32 factors) with alpha 16 (scale 1/2)."""
    draw = Draw("attn_vec_einsum", "_1", (8, 16, 48), rank=32, depth=3, alpha=16.0, rslora=False, verify=True)
    return make_pair(draw, seed)


def _fuse_by_layers(pair, arrays, *, verify: bool, seed: int) -> tuple[np.ndarray, fuse.Check]:
    """What the streaming pipeline does: host slices of each layer through one LayerFuser."""
    fuser = fuse.layer_fuser(pair, verify=verify, seed=seed, device=jax.devices()[0])
    layers = [fuser.fuse(index, *(x[index] for x in arrays)) for index in np.ndindex(arrays[0].shape[:1])]
    return np.stack([np.asarray(layer) for layer in layers]), fuser.finish()


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
def test_layer_fuser_stores_and_checks_what_fuse_pair_does(verify):
    pair, arrays = _attn_vec_pair(seed=1)
    want, want_check = fuse.fuse_pair(pair, *arrays, sharding.single_device(), verify=verify, seed=3)
    got, check = _fuse_by_layers(pair, arrays, verify=verify, seed=3)
    assert got.dtype == ml_dtypes.bfloat16
    assert got.tobytes() == np.asarray(want).tobytes()
    assert check == want_check
    assert check.verified == verify


def test_layer_fuser_returns_each_layer_on_its_device_in_the_output_dtype():
    pair, arrays = _attn_vec_pair(seed=2)
    device = jax.devices()[0]
    fuser = fuse.layer_fuser(pair, verify=True, seed=0, device=device)
    layer = fuser.fuse((1,), *(jax.device_put(x[1]) for x in arrays))
    assert layer.devices() == {device}
    assert (layer.shape, np.dtype(layer.dtype)) == (pair.kernel.shape[1:], pair.out_dtype)


def test_layer_fuser_raises_on_a_non_finite_layer_only_when_it_finishes():
    pair, (kernel, lora_a, lora_b) = _attn_vec_pair(seed=4)
    lora_a = lora_a.copy()
    lora_a[2, 0, 0, 0] = np.nan
    fuser = fuse.layer_fuser(pair, verify=True, seed=0, device=jax.devices()[0])
    for index in np.ndindex(kernel.shape[:1]):
        fuser.fuse(index, kernel[index], lora_a[index], lora_b[index])  # Dispatched; nothing is checked yet.
    with pytest.raises(errors.NumericsError, match="attn_vec_einsum_1/w produced NaN or Inf"):
        fuser.finish()


def test_a_pair_kind_compiles_its_layer_fuse_once_for_all_layers_and_pairs():
    (pair, arrays), (other_pair, other_arrays) = _attn_vec_pair(seed=5), _attn_vec_pair(seed=6)
    step = fuse._make_step(pair, verify=True)
    before = fuse._fuse_program(step)._cache_size()
    _fuse_by_layers(pair, arrays, verify=True, seed=0)
    _fuse_by_layers(other_pair, other_arrays, verify=True, seed=1)
    assert fuse._make_step(other_pair, verify=True) == step
    assert fuse._fuse_program(step)._cache_size() - before <= 1  # One compile (none if an earlier test made it).
