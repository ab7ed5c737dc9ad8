"""The stream of slices (``stream``, ``reader``, ``writer``, ``memory``): blocks, bit-identity, peak memory."""

import json

import numpy as np
import pytest
from helpers import cli_command, restore_flat, run_cli

from openpi_merge import checkpoint, config, errors, memory, plan, reader, stream
from openpi_merge.testing import synthetic

MODEL = "pi0"


def _manifest(step_dir) -> dict:
    return json.loads((step_dir / "openpi_merge_manifest.json").read_text())["params"]


def _merge(source, out, *overrides) -> str:
    result = run_cli(*cli_command(MODEL, source, out, *overrides)[3:])
    assert result.returncode == 0, result.stderr
    return result.stdout


def _settings(**fields) -> config.Settings:
    cfg = config.make_config(MODEL)
    cfg.update(fields)
    return config.read_settings(cfg, openpi=None)


def _line(summary: str, start: str) -> str:
    return next(line.strip() for line in summary.splitlines() if line.strip().startswith(start))


def _slices(summary: str) -> int:
    return int(_line(summary, "streamed:").split()[1])


def test_budgets_that_split_kernels_into_layers_write_the_same_bits_as_no_budget(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(MODEL, chunking="layer")
    unlimited = _merge(source, tmp_path / "none", "--config.memory_budget_gb=none")
    split = _merge(source, tmp_path / "split", "--config.memory_budget_gb=0.0001")
    _merge(source, tmp_path / "auto")
    arrays = len(_manifest(tmp_path / "none"))
    assert _slices(unlimited) == arrays  # Without a budget every array is one slice...
    assert _slices(split) > arrays  # ...with a small one, stacked kernels go a layer (input chunk) at a time.
    assert _manifest(tmp_path / "split") == _manifest(tmp_path / "none") == _manifest(tmp_path / "auto")
    # What was written is what the manifest says: the output read back by Orbax hashes the same.
    restored = restore_flat(tmp_path / "split" / "params")
    assert len(restored) == arrays


def test_a_budget_below_one_layer_runs_each_layer_alone_and_says_so(tiny_checkpoint, tmp_path):
    summary = _merge(tiny_checkpoint(MODEL, chunking="layer"), tmp_path / "out", "--config.memory_budget_gb=1e-9")
    notes = [line for line in summary.splitlines() if "over the budget: processed alone" in line]
    assert any("mlp/gating_einsum needs" in line and "one layer" in line for line in notes), summary


def test_blocks_cover_every_row_once_in_whole_input_chunks(tiny_checkpoint):
    source = checkpoint.locate_input(str(tiny_checkpoint(MODEL, chunking="layer")))
    contents = checkpoint.read_contents(source.params_dir)
    settings = _settings(input=str(source.root), output="/nonexistent")
    merge_plan = plan.make_plan(contents.leaves, settings)
    inputs = reader.open_inputs(source.params_dir, merge_plan.leaves_in, value_suffix=contents.value_suffix)
    budget = 20_000
    blocks = stream.make_blocks(merge_plan, inputs, budget)
    by_leaf: dict = {}
    for block in blocks:
        by_leaf.setdefault(block.out.path, []).append(block)
        rows = inputs.chunk_rows(block.input_leaf.path)
        assert block.start % rows == 0
        assert block.nbytes <= budget or block.stop - block.start <= rows  # Over the budget: one chunk at most.
    assert by_leaf.keys() == {leaf.path for leaf in merge_plan.leaves_out}
    for leaf_blocks in by_leaf.values():
        leaf = leaf_blocks[0].out
        covered = [row for b in leaf_blocks for row in range(b.start, b.stop)]
        assert covered == list(range(leaf.shape[0] if leaf.shape else 1))
        assert leaf_blocks[0].first
        assert leaf_blocks[-1].last


def test_a_kernel_stored_in_one_chunk_is_one_block_whatever_the_budget(tiny_checkpoint):
    source = checkpoint.locate_input(str(tiny_checkpoint(MODEL)))
    contents = checkpoint.read_contents(source.params_dir)
    kernel = next(leaf for path, leaf in contents.leaves.items() if path[-1] == "gating_einsum")
    inputs = reader.open_inputs(source.params_dir, [kernel], value_suffix=contents.value_suffix)
    assert inputs.chunk_rows(kernel.path) == kernel.shape[0]  # A single-device Orbax save: one chunk for the array.


@pytest.mark.parametrize(
    ("text", "expected"), [("auto", None), ("none", 0), ("NONE", 0), ("2", 2 * 10**9), ("0.5", 5 * 10**8), ("1e-9", 1)]
)
def test_memory_budget_reads_auto_none_and_numbers(text, expected):
    settings = _settings(input="x", output="y", memory_budget_gb=text)
    assert settings.memory_budget_bytes == expected


@pytest.mark.parametrize("text", ["-1", "inf", "lots", "0", "-0", "1e-10", "1e-300", "nan"])
def test_memory_budget_refuses_what_is_not_a_budget(text):
    with pytest.raises(errors.ConfigError, match="must be auto, none, or a positive finite number"):
        _settings(input="x", output="y", memory_budget_gb=text)


def test_the_auto_budget_is_half_the_available_memory_at_most_4_gb():
    budget, how = memory.auto_budget()
    available = memory.available_bytes()
    assert budget == min(available // 2, 4 * 10**9)
    assert how.startswith("auto: ")
    with open("/proc/meminfo") as f:
        mem_available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert 0 < available <= mem_available * 1.05  # Read afresh a moment later: allow for other processes.


def _peak_gb(summary: str) -> float:
    return float(_line(summary, "peak memory:").split()[2])


@pytest.mark.alone
def test_a_streamed_merge_holds_far_less_memory_than_an_unlimited_one(tmp_path_factory):
    # A few hundred MB, one layer per chunk: big enough for what the arrays in flight take to stand out from the
    # baseline of Python, JAX, XLA and TensorStore (~0.3 GB, measured on the tiny checkpoint in the same way).
    source = synthetic.write_checkpoint(tmp_path_factory.mktemp("small"), MODEL, "small", chunking="layer")
    tree_gb = sum(leaf.nbytes for leaf in checkpoint.read_contents(source / "params").leaves.values()) / 1e9
    out = tmp_path_factory.mktemp("out")
    unlimited = _peak_gb(_merge(source, out / "none", "--config.memory_budget_gb=none"))
    budget = 0.05
    streamed = _peak_gb(_merge(source, out / "budget", f"--config.memory_budget_gb={budget}"))
    baseline = _peak_gb(_merge(synthetic.write_checkpoint(out / "tiny", MODEL), out / "tiny-out"))
    assert _manifest(out / "none") == _manifest(out / "budget")
    # The unlimited run holds the tree (read ahead whole)...
    assert unlimited - baseline > 0.8 * tree_gb, (unlimited, baseline, tree_gb)
    # ...the budgeted one its budget plus its largest block (one layer of gating_einsum with its float32
    # temporaries, 0.09 GB here), not the tree. Measured against the unlimited run, not the baseline: the two compile
    # the same programs for the same shapes, where the tiny checkpoint's baseline moved by 0.07 GB between runs and
    # the budgeted run's lead over it from 0.14 to 0.31 GB (2 cores, 2026-12-07). The gap stayed 0.54-0.79 of the
    # tree, with two busy loops on the cores as well.
    assert unlimited - streamed > 0.4 * tree_gb, (streamed, unlimited, tree_gb)


def _opened(step) -> tuple[plan.Plan, reader.Inputs]:
    source = checkpoint.locate_input(str(step))
    contents = checkpoint.read_contents(source.params_dir)
    merge_plan = plan.make_plan(contents.leaves, _settings(input=str(source.root), output="/nonexistent"))
    return merge_plan, reader.open_inputs(source.params_dir, merge_plan.leaves_in, value_suffix=contents.value_suffix)


def test_rows_read_a_chunk_at_a_time_assemble_into_the_rows_read_at_once(tiny_checkpoint):
    merge_plan, inputs = _opened(tiny_checkpoint(MODEL, chunking="quarters"))
    kernel = next(pair.kernel for pair in merge_plan.pairs if pair.kernel.path[-1] == "gating_einsum")
    for rows in (slice(0, kernel.shape[0]), slice(1, 2)):
        whole = inputs.read(kernel.path, rows).result()
        pieces = inputs.read_by_chunk(kernel.path, rows).result()
        assert len(pieces.regions) == 4  # Split by Orbax on its two largest axes: a layer spans four chunks.
        assert pieces.shape == whole.shape
        for index in np.ndindex(whole.shape[:2]):
            np.testing.assert_array_equal(pieces[index], whole[index])
        np.testing.assert_array_equal(pieces[()], whole)


def test_a_layer_within_one_chunk_is_a_view_of_the_piece_read_not_a_copy(tiny_checkpoint):
    merge_plan, inputs = _opened(tiny_checkpoint(MODEL, chunking="layer"))
    kernel = next(pair.kernel for pair in merge_plan.pairs if pair.kernel.path[-1] == "gating_einsum")
    rows = slice(0, 2)
    whole = inputs.read(kernel.path, rows).result()
    pieces = inputs.read_by_chunk(kernel.path, rows).result()
    assert len(pieces.regions) == 2  # One chunk a layer.
    for index in np.ndindex(whole.shape[:2]):
        layer = pieces[index]
        np.testing.assert_array_equal(layer, whole[index])
        assert np.shares_memory(layer, pieces.arrays[index[0]])
    assert not np.shares_memory(pieces[()], pieces.arrays[0])  # Spanning both: assembled.


def test_a_pair_over_the_budget_read_a_chunk_at_a_time_writes_the_same_bits_as_no_budget(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(MODEL, chunking="quarters")
    _merge(source, tmp_path / "none", "--config.memory_budget_gb=none")
    alone = _merge(source, tmp_path / "alone", "--config.memory_budget_gb=1e-9")  # Every block over it.
    assert "over the budget: processed alone" in alone
    assert _manifest(tmp_path / "alone") == _manifest(tmp_path / "none")
    one, two = restore_flat(tmp_path / "none" / "params"), restore_flat(tmp_path / "alone" / "params")
    assert one.keys() == two.keys()
    assert all(one[path].tobytes() == two[path].tobytes() for path in one)


def test_kept_leaves_are_interleaved_with_the_pairs_by_bytes_each_in_its_own_order(tiny_checkpoint):
    merge_plan, inputs = _opened(tiny_checkpoint(MODEL))
    blocks = stream.make_blocks(merge_plan, inputs, 10**12)
    kinds = [block.pair is None for block in blocks]
    pair_order = [block.pair.kernel.path for block in blocks if block.pair]
    kept_order = [block.out.path for block in blocks if block.pair is None]
    assert pair_order == [pair.kernel.path for pair in merge_plan.pairs]
    assert kept_order == [leaf.path for leaf in merge_plan.kept]
    # Neither kind waits for the other: each half of the stream holds both.
    half = len(blocks) // 2
    assert {True, False} <= set(kinds[:half])
    assert {True, False} <= set(kinds[half:])
    pair_bytes, kept_bytes = (sum(b.nbytes for b in blocks if (b.pair is None) == kept) for kept in (False, True))
    done = {False: 0, True: 0}
    for block in blocks:  # At every point, the kind that is behind by share of its bytes goes next.
        kept = block.pair is None
        share = {False: done[False] / pair_bytes, True: done[True] / kept_bytes}
        assert share[kept] <= share[not kept] or done[not kept] == (kept_bytes if not kept else pair_bytes)
        done[kept] += block.nbytes
