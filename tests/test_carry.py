"""Kept leaves carried as stored (openpi_merge.carry): copied chunks, the same checkpoint as re-encoding writes.

Inputs are real Orbax checkpoints: ``chunking="orbax"`` is Orbax's single-device defaults (one chunk per array, what
openpi's single-GPU LoRA configs write), ``chunking="layer"`` a chunk per layer of every array of 3 or more axes.
Both stacks' restores of a carried output (openpi's call) are test_merge_end_to_end's other-stack test: the tiny
checkpoint's kept leaves are carried by default.
"""

import json
import shutil

import numpy as np
from helpers import merge, merge_ok, restore_flat, run_cli, stored_array, stored_chunks

from openpi_merge import checkpoint, config, errors, manifest, plan, reader

MODEL = "pi0"


def _kept(step) -> list[plan.Leaf]:
    cfg = config.make_config(MODEL)
    cfg.input, cfg.output = str(step), "out"
    contents = checkpoint.read_contents(step / "params")
    return plan.make_plan(contents.leaves, config.read_settings(cfg, openpi=None)).kept


def _stores(params_dir, leaves) -> dict:
    value_suffix = checkpoint.read_contents(params_dir).value_suffix
    return reader.open_inputs(params_dir, leaves, value_suffix=value_suffix).stores


def test_an_orbax_default_input_carries_every_kept_leaf_as_stored(tiny_checkpoint, tmp_path):
    step = tiny_checkpoint(MODEL, chunking="orbax")
    kept = _kept(step)
    summary = merge_ok(step, tmp_path / "carried").stdout
    assert f"carried: {len(kept)} unchanged arrays" in summary
    inputs, outputs = _stores(step / "params", kept), _stores(tmp_path / "carried" / "params", kept)
    for leaf in kept:
        # The input's bytes, copied.
        assert stored_chunks(outputs[leaf.path]) == stored_chunks(inputs[leaf.path]), leaf.name
        assert outputs[leaf.path].spec().to_json()["metadata"] == inputs[leaf.path].spec().to_json()["metadata"]


def test_a_carried_output_is_the_checkpoint_re_encoding_writes(tiny_checkpoint, tmp_path):
    step = tiny_checkpoint(MODEL, chunking="orbax")
    merge_ok(step, tmp_path / "carried")
    summary = merge_ok(step, tmp_path / "encoded", "--config.carry=False").stdout
    assert "carried:" not in summary
    carried, encoded = restore_flat(tmp_path / "carried" / "params"), restore_flat(tmp_path / "encoded" / "params")
    assert carried.keys() == encoded.keys()
    for path, array in encoded.items():
        assert carried[path].dtype == array.dtype, path
        assert carried[path].tobytes() == array.tobytes(), path
    manifests = [json.loads((tmp_path / d / manifest.FILENAME).read_text()) for d in ("carried", "encoded")]
    assert manifests[0]["params"] == manifests[1]["params"]  # The same decoded-bytes digests, leaf by leaf.
    assert run_cli("--config.mode=check", f"--config.input={tmp_path / 'carried'}").returncode == 0


def test_check_catches_a_flipped_byte_in_a_carried_chunk(tiny_checkpoint, tmp_path):
    step = tiny_checkpoint(MODEL, chunking="orbax")
    merge_ok(step, tmp_path / "out")
    leaf = next(leaf for leaf in _kept(step) if leaf.nbytes >= 1024)
    params = tmp_path / "out" / "params"
    (chunk,) = stored_chunks(stored_array(params, leaf.path)).values()
    data = next(p for p in params.glob("ocdbt.process_*/d/*") if chunk in p.read_bytes())  # The file holding it.
    blob = bytearray(data.read_bytes())
    blob[blob.index(chunk) + len(chunk) // 2] ^= 0x01  # One bit in the middle of the carried chunk, on disk.
    data.write_bytes(bytes(blob))
    checked = run_cli("--config.mode=check", f"--config.input={tmp_path / 'out'}")
    assert checked.returncode == errors.NumericsError.exit_code
    assert f"parameter {leaf.name} differs from what openpi-merge wrote" in checked.stderr


def test_a_damaged_chunk_of_a_carried_leaf_fails_the_run_naming_it_and_leaves_no_output(tiny_checkpoint, tmp_path):
    step = tmp_path / "step"
    shutil.copytree(tiny_checkpoint(MODEL, chunking="orbax"), step)
    leaf = max(_kept(step), key=lambda leaf: leaf.nbytes)  # The embedder: carried as stored.
    store = stored_array(step / "params", leaf.path)
    ((key, chunk),) = stored_chunks(store).items()
    store.kvstore.write(key, chunk[:-64]).result()  # A truncated chunk: its decode fails.
    result = merge(step, tmp_path / "out")
    assert result.returncode == errors.InputError.exit_code, result.stderr
    assert f"at parameter {leaf.name}" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step"]  # No output, no staging left.


def test_a_kept_leaf_stored_in_another_chunking_is_encoded_again(tiny_checkpoint, tmp_path):
    step = tiny_checkpoint(MODEL, chunking="layer")
    kept = _kept(step)
    layered = [leaf for leaf in kept if len(leaf.shape) >= 3 and leaf.shape[0] > 1]
    assert layered  # SigLIP's stacked encoder leaves: a chunk per layer in the input, one chunk in the output.
    summary = merge_ok(step, tmp_path / "out").stdout
    assert f"carried: {len(kept) - len(layered)} unchanged arrays" in summary
    inputs, outputs = _stores(step / "params", layered), _stores(tmp_path / "out" / "params", layered)
    for leaf in layered:
        got, want = outputs[leaf.path], inputs[leaf.path]
        assert got.spec().to_json()["metadata"]["chunks"] != want.spec().to_json()["metadata"]["chunks"]
        assert np.array_equal(got.read().result(), want.read().result()), leaf.name
