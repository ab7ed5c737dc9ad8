"""The integrity manifest (openpi_merge/manifest.py): what it records is what Orbax restores, and mode=check catches a
damaged copy, naming the first parameter or asset file that differs."""

import hashlib
import json
import os
import shutil
import subprocess

import ml_dtypes
import numpy as np
import pytest
from helpers import error_line, restore_flat, run_cli, stored_array, stored_chunks

from openpi_merge import errors, manifest, plan


@pytest.fixture(scope="module")
def merged(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("manifest") / "merged"
    args = (f"--config.input={tiny_checkpoint('pi0')}", f"--config.output={out}")
    result = run_cli("--config=configs/pi0_lora.py", *args)
    assert result.returncode == 0, result.stderr
    return out


def _check(step, python=None):
    args = ["--config=configs/pi0_lora.py", "--config.mode=check", f"--config.input={step}"]
    if python is None:
        return run_cli(*args)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([python, "-m", "openpi_merge", *args], capture_output=True, text=True, env=env, timeout=600)


def _copy(merged, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(merged, copy)
    return copy


def test_the_manifest_holds_the_sha256_of_every_restored_array(merged):
    document = json.loads((merged / "openpi_merge_manifest.json").read_text())
    restored = restore_flat(merged / "params")
    assert sorted(document["params"]) == sorted("/".join(path) for path in restored)
    for path, array in restored.items():
        entry = document["params"]["/".join(path)]
        assert entry["shape"] == list(array.shape)
        assert entry["dtype"] == array.dtype.name
        assert entry["sha256"] == hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
    norm_stats = next((merged / "assets").rglob("norm_stats.json"))
    entry = document["assets"][str(norm_stats.relative_to(merged / "assets"))]
    assert entry["sha256"] == hashlib.sha256(norm_stats.read_bytes()).hexdigest()


def test_an_intact_copy_passes_the_check(merged, tmp_path):
    result = _check(_copy(merged, tmp_path))
    assert result.returncode == 0, result.stderr
    assert "matches its manifest: 50 parameters" in result.stdout


@pytest.mark.skipif(not os.environ.get("OPENPI_MERGE_OTHER_PYTHON"), reason="set by scripts/test.sh: the other stack")
def test_the_other_stack_checks_what_this_one_wrote(merged):
    result = _check(merged, python=os.environ["OPENPI_MERGE_OTHER_PYTHON"])
    assert result.returncode == 0, result.stderr


def test_one_flipped_bit_in_an_array_chunk_is_caught_and_named(merged, tmp_path):
    copy = _copy(merged, tmp_path)
    # The data file holding a stored chunk of the largest array (the database's files also hold b-tree nodes, some
    # of versions the last one superseded, whose damage no read sees).
    path = ("PaliGemma", "llm", "layers", "mlp", "gating_einsum")
    chunk = next(iter(stored_chunks(stored_array(copy / "params", path)).values()))
    data = next(p for p in (copy / "params").glob("ocdbt.process_*/d/*") if chunk in p.read_bytes())
    blob = bytearray(data.read_bytes())
    blob[blob.index(chunk) + len(chunk) // 2] ^= 0x01
    data.write_bytes(bytes(blob))
    result = _check(copy)
    line = error_line(result.returncode, result.stderr, errors.NumericsError.exit_code, "differs from what")
    assert "parameter PaliGemma/" in line


def test_a_changed_asset_is_caught_and_named(merged, tmp_path):
    copy = _copy(merged, tmp_path)
    norm_stats = next((copy / "assets").rglob("norm_stats.json"))
    norm_stats.write_text(norm_stats.read_text().replace("0", "1", 1))
    result = _check(copy)
    error_line(result.returncode, result.stderr, errors.NumericsError.exit_code, "norm_stats.json differs")


def test_a_missing_array_is_caught(merged, tmp_path):
    copy = _copy(merged, tmp_path)
    document = json.loads((copy / "openpi_merge_manifest.json").read_text())
    document["params"]["PaliGemma/extra/kernel"] = {"shape": [1], "dtype": "float32", "sha256": "0" * 64}
    (copy / "openpi_merge_manifest.json").write_text(json.dumps(document))
    result = _check(copy)
    error_line(result.returncode, result.stderr, errors.NumericsError.exit_code, "PaliGemma/extra/kernel is in the man")


def test_a_checkpoint_without_a_manifest_cannot_be_checked(tiny_checkpoint):
    result = _check(tiny_checkpoint("pi0"))
    error_line(result.returncode, result.stderr, errors.InputError.exit_code, "has no openpi_merge_manifest.json")


def _edit_manifest(copy, edit) -> None:
    path = copy / "openpi_merge_manifest.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


_CRAFTED = {
    "params-missing": lambda d: d.pop("params"),
    "assets-a-list": lambda d: d.update(assets=[]),
    "sha256-missing": lambda d: next(iter(d["params"].values())).pop("sha256"),
    "sha256-a-number": lambda d: next(iter(d["params"].values())).update(sha256=7),
    "shape-a-string": lambda d: next(iter(d["params"].values())).update(shape="[2, 3]"),
    "asset-bytes-missing": lambda d: next(iter(d["assets"].values())).pop("bytes"),
}


@pytest.mark.parametrize("craft", list(_CRAFTED))
def test_a_crafted_manifest_is_exit_3_in_one_line(merged, tmp_path, craft):
    copy = _copy(merged, tmp_path)
    _edit_manifest(copy, _CRAFTED[craft])
    result = _check(copy)
    error_line(result.returncode, result.stderr, errors.InputError.exit_code, "is not a valid openpi-merge manifest")


def test_a_manifest_nested_deeper_than_python_parses_is_exit_3(merged, tmp_path):
    copy = _copy(merged, tmp_path)
    deep = '{"format": "openpi-merge-manifest/1", "params": ' + "[" * 100_000 + "]" * 100_000 + "}"
    (copy / "openpi_merge_manifest.json").write_text(deep)
    result = _check(copy)
    error_line(result.returncode, result.stderr, errors.InputError.exit_code, "is unreadable")


@pytest.mark.parametrize("where", ["assets", "params"])
def test_check_refuses_a_symlink_and_reads_nothing_it_points_to(merged, tmp_path, where):
    copy = _copy(merged, tmp_path)
    outside = tmp_path / "outside"
    if where == "assets":  # A link out of the copy, to a dir holding files with the right bytes.
        shutil.move(copy / "assets", outside)
        (copy / "assets").symlink_to(outside)
    else:
        data = max((copy / "params").glob("ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)
        shutil.move(data, outside)
        data.symlink_to(outside)
    result = _check(copy)
    error_line(result.returncode, result.stderr, errors.InputError.exit_code, "is a symbolic link")


_FLOATS = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64, ml_dtypes.float8_e4m3fn]


def _digests_raise(array: np.ndarray) -> bool:
    """Whether a kept leaf holding ``array``, hashed slice by slice, is refused as NaN or Inf."""
    leaf = plan.Leaf(("kept",), array.shape, array.dtype)
    digests = manifest.Digests(check_finite=[leaf.path])
    try:
        for row in array:
            digests.update(leaf, row[None])
        digests.finish(leaf)
        try:
            digests.wait()
        except errors.NumericsError:
            return True
        return False
    finally:
        digests.close()


@pytest.mark.parametrize("dtype", _FLOATS, ids=lambda d: np.dtype(d).name)
def test_a_kept_leaf_with_one_nan_or_inf_anywhere_is_refused_and_finite_extremes_pass(dtype):
    rng = np.random.default_rng(7)
    info = ml_dtypes.finfo(dtype)
    extremes = np.array([info.max, -info.max, info.smallest_subnormal, -0.0, 0.0, info.tiny], np.float64)
    # Rows of more than the 2**20 elements tested at a time, so a fault can land after a slice's first step.
    array = rng.standard_normal((3, (1 << 20) + 4099)).astype(dtype)
    array[1, :6] = extremes.astype(dtype)
    assert not _digests_raise(array)
    specials = [np.nan, -np.nan] if dtype is ml_dtypes.float8_e4m3fn else [np.inf, -np.inf, np.nan, -np.nan]
    step = 1 << 20
    for special in specials:
        for column in (rng.integers(step), rng.integers(step, array.shape[1])):  # In a slice's first step, and after.
            planted = array.copy()
            planted[rng.integers(3), column] = special
            assert _digests_raise(planted), (special, column, planted.dtype)
