"""The stream of slices: every output array is read, fused (a pair's kernel) and written a slice at a time, the three
overlapping, in bounded memory. Used by single-process merges (``pipeline``): ``reader`` reads, ``writer.slices``
writes.

Blocks. A block is a run of rows along an array's first axis, the unit that is read, held and released:

- a kept leaf: rows that make whole chunks of the input array (``reader.Inputs.chunk_rows``), as many as fit half the
  budget;
- a pair: whole layers of the kernel (its first axis is openpi's scanned depth), likewise whole chunks; its LoRA
  factors (small: rank columns) are read whole with the pair's first block. An unstacked kernel is one block.
A block's bytes are what it reads plus what it writes (plus one layer's float32 temporaries for a pair). The input's
chunking sets the floor: a checkpoint written by a single-device Orbax save stores most arrays as one chunk (up to
2 GiB; larger ones split along their longest axis), so such an array is one block however small the budget. A block
over the budget runs alone, and the summary names it; a pair's such block is read one chunk after another
(``reader.Inputs.read_by_chunk``: a lower peak than decoding its chunks at once) and its layers are assembled from the
pieces as they are fused.

Order. Pairs in the plan's order and kept leaves in theirs, interleaved so that each kind has gone through the same
share of its bytes at every point (``make_blocks``): a kept leaf's work is TensorStore's and the digest thread's, a
pair's mostly the main thread's and XLA's, and side by side they keep both kinds busy (on a full pi0 merge on 2 cores,
pairs first then kept leaves took 34-35 s, interleaved 31-32 s).

Pipeline. ``run`` walks the blocks in order. Before fusing block *i* it issues the reads of the blocks after it that
fit the budget; TensorStore reads and decodes them in its threads meanwhile. A pair's layers are fused by
``fuse.LayerFuser`` (XLA runs them asynchronously, at most ``_LAYERS_AHEAD`` ahead of the writer), and each fused
layer is written as soon as it is computed: TensorStore encodes and writes it in its threads while the next layers
are fused, and one digest thread hashes it (``manifest.Digests``). A block's memory is released once its writes are
committed and its digests taken; blocks in flight (read issued, not yet released) hold at most the budget. Before the
read of a block over the budget, malloc's free memory goes back to the OS (``memory.release_free``).

Kept leaves. A kept leaf that is one block and whose output array has the input's zarr metadata is carried: its
stored chunks are copied as they are (``carry``) instead of encoded again; it is still read and decoded once, for its
digest. Any other kept leaf is written from the decoded block.

Failure. If ``run`` raises (a failed read, write or check, an interrupt), it first waits for every read, copy, write
and digest still in flight (``_drain``): nothing goes on writing into the output after the caller has removed it.

Every output layer is computed by the same compiled program as in any other mode, from the same inputs, so the
output is bit-identical to theirs. ``stop`` is called between layers and blocks.
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np
import tensorstore as ts

from openpi_merge import carry, fuse, manifest, memory, plan, reader, writer

_NOTES = 3  # Arrays over the budget named in the summary, largest first.
_LAYERS_AHEAD = 2  # Fused layers dispatched to XLA ahead of the one being written.


@dataclasses.dataclass(frozen=True)
class Block:
    """Rows ``[start, stop)`` of output leaf ``out``; ``pair`` is None for a kept leaf."""

    out: plan.Leaf
    pair: plan.Pair | None
    start: int
    stop: int
    nbytes: int
    first: bool
    last: bool

    @property
    def input_leaf(self) -> plan.Leaf:
        """The input leaf whose rows the block reads: the pair's kernel, or the kept leaf itself."""
        return self.pair.kernel if self.pair else self.out

    def over(self, budget: int) -> bool:
        """Whether the block alone needs more than ``budget``: it then runs alone (module docstring)."""
        return self.nbytes > budget


# --- Blocks ---


def _row_bytes(leaf: plan.Leaf) -> int:
    return writer.nbytes(leaf.shape[1:], leaf.dtype) if leaf.shape else leaf.nbytes


def _runs(size: int, rows: int) -> list[tuple[int, int, int]]:
    """``(start, stop, size)`` of consecutive runs of ``rows`` covering ``range(size)``."""
    return [(start, min(start + rows, size), size) for start in range(0, size, rows)]


def _pair_blocks(pair: plan.Pair, inputs: reader.Inputs, target: int) -> list[Block]:
    kernel, out = pair.kernel, pair.merged_leaf
    factors = pair.lora_a.nbytes + pair.lora_b.nbytes
    layer = writer.nbytes(kernel.shape[pair.batch_ndim :], np.float32)
    if pair.batch_ndim == 0:
        return [Block(out, pair, 0, 1, kernel.nbytes + out.nbytes + factors + 4 * layer, True, True)]
    chunk = inputs.chunk_rows(kernel.path)
    per_row = _row_bytes(kernel) + _row_bytes(out)
    fixed = 4 * layer + factors
    rows = chunk * max(1, (target - fixed) // max(1, chunk * per_row))
    return [
        Block(out, pair, a, b, (b - a) * per_row + fixed, a == 0, b == n) for a, b, n in _runs(kernel.shape[0], rows)
    ]


def _kept_blocks(leaf: plan.Leaf, inputs: reader.Inputs, target: int) -> list[Block]:
    if not leaf.shape or leaf.shape[0] == 0:
        return [Block(leaf, None, 0, 1, 2 * leaf.nbytes, True, True)]
    chunk = inputs.chunk_rows(leaf.path)
    rows = chunk * max(1, target // max(1, 2 * chunk * _row_bytes(leaf)))
    return [
        Block(leaf, None, a, b, 2 * (b - a) * _row_bytes(leaf), a == 0, b == n)
        for a, b, n in _runs(leaf.shape[0], rows)
    ]


def _interleaved(pairs: list[Block], kept: list[Block]) -> list[Block]:
    """Both lists in their order, merged so that each has gone through the same share of its bytes at every point."""
    total_pairs, total_kept = max(1, sum(b.nbytes for b in pairs)), max(1, sum(b.nbytes for b in kept))
    merged, done_pairs, done_kept, i, j = [], 0, 0, 0, 0
    while i < len(pairs) or j < len(kept):
        if j == len(kept) or (i < len(pairs) and done_pairs / total_pairs <= done_kept / total_kept):
            merged.append(pairs[i])
            done_pairs, i = done_pairs + pairs[i].nbytes, i + 1
        else:
            merged.append(kept[j])
            done_kept, j = done_kept + kept[j].nbytes, j + 1
    return merged


def make_blocks(merge_plan: plan.Plan, inputs: reader.Inputs, budget: int) -> list[Block]:
    """The plan's output in blocks of about half the budget (two in flight), whole chunks each, pairs and kept leaves
    interleaved (module docstring)."""
    target = max(1, budget // 2)
    pairs = [b for pair in merge_plan.pairs for b in _pair_blocks(pair, inputs, target)]
    kept = [b for leaf in merge_plan.kept for b in _kept_blocks(leaf, inputs, target)]
    return _interleaved(pairs, kept)


def output_arrays(blocks: Sequence[Block]) -> list[writer.OutputArray]:
    """How each output array is written: a fused kernel a layer at a time, a kept leaf in its blocks' rows."""
    arrays = {}
    for block in blocks:
        if block.out.path in arrays:
            continue
        rows = 1 if block.pair and block.pair.batch_ndim else block.stop - block.start
        arrays[block.out.path] = writer.OutputArray(
            block.out.path, block.out.shape, block.out.dtype, writer.write_shape(block.out.shape, rows)
        )
    return list(arrays.values())


def _what(block: Block) -> str:
    if block.pair is not None and block.pair.batch_ndim and block.stop - block.start == 1:
        return "one layer and its float32 temporaries"
    return "one chunk of the input (the input stores it in chunks this large)"


def describe(blocks: Sequence[Block], budget: int, how: str) -> list[str]:
    """Summary lines: the budget, the blocks, and the largest arrays whose smallest slice is over the budget."""
    arrays = len({block.out.path for block in blocks})
    lines = [
        f"streamed: {len(blocks)} slices of {arrays} arrays within memory_budget_gb={budget / memory.GB:.3g} ({how})"
    ]
    over: dict[str, Block] = {}
    for block in sorted((b for b in blocks if b.over(budget)), key=lambda b: -b.nbytes):
        over.setdefault(block.out.name, block)
    lines += [
        f"note: {name} needs {block.nbytes / memory.GB:.3g} GB for {_what(block)}, over the budget: processed alone"
        for name, block in list(over.items())[:_NOTES]
    ]
    if len(over) > _NOTES:
        lines.append(f"note: {len(over) - _NOTES} more arrays over the budget, processed alone")
    return lines


# --- The pipeline ---


@dataclasses.dataclass(frozen=True)
class Streamed:
    """What ``run`` did: each pair's Check, and the kept leaves it carried as stored (``carry``)."""

    checks: list[fuse.Check]
    carried: list[plan.Leaf]


@dataclasses.dataclass
class _Reads:
    block: Block
    reads: dict[str, reader.Read]


def _issue_reads(block: Block, inputs: reader.Inputs, budget: int) -> _Reads:
    leaf = block.input_leaf
    whole = not leaf.shape or (block.pair is not None and block.pair.batch_ndim == 0)
    rows = None if whole else slice(block.start, block.stop)
    # A pair's block over the budget runs alone: its chunks are read one after another, which lowers the peak.
    read = inputs.read_by_chunk if block.pair is not None and block.over(budget) else inputs.read
    reads = {"data": read(leaf.path, rows)}
    if block.pair and block.first:
        reads["a"] = inputs.read(block.pair.lora_a.path)
        reads["b"] = inputs.read(block.pair.lora_b.path)
    return _Reads(block, reads)


def _write(store: ts.TensorStore, index, array: np.ndarray) -> ts.Future:
    target = store if index is None else store[index]
    return target.write(array, can_reference_source_data_indefinitely=True).commit


def run(
    blocks: Sequence[Block],
    inputs: reader.Inputs,
    outputs: dict[plan.Path, ts.TensorStore],
    *,
    budget: int,
    verify: bool,
    device: jax.Device,
    digests: manifest.Digests,
    stop: Callable[[], None],
    on_pair: Callable[[plan.Pair], None] = lambda pair: None,
    carry_kept: bool = True,
) -> Streamed:
    """Streams ``blocks`` from ``inputs`` to ``outputs`` (module docstring); returns each pair's Check and the kept
    leaves carried as stored (none without ``carry_kept``).

    Raises InputError naming the parameter for a read that fails (``reader``), NumericsError (NaN or Inf; a failed
    verification) from the fuse or the digests, InterruptError from ``stop``, and what TensorStore raises for a
    failed write.
    """
    seeds = {pair.kernel.path: i for i, pair in enumerate(dict.fromkeys(b.pair for b in blocks if b.pair))}
    reads: collections.deque[_Reads] = collections.deque()
    in_flight: collections.deque[tuple[Block, list]] = collections.deque()
    held, next_read = 0, 0
    factors: dict[plan.Path, tuple[np.ndarray, np.ndarray]] = {}
    fusers: dict[plan.Path, fuse.LayerFuser] = {}
    checks: list[fuse.Check] = []
    carried: list[plan.Leaf] = []

    def release_until(limit: int) -> None:
        nonlocal held
        while in_flight and held > limit:
            block, futures = in_flight.popleft()
            for future in futures:
                future.result()
            held -= block.nbytes

    def issue(upcoming: Block) -> None:
        nonlocal held, next_read
        reads.append(_issue_reads(upcoming, inputs, budget))
        held += upcoming.nbytes
        next_read += 1

    try:
        for block in blocks:
            while in_flight and all(future.done() for future in in_flight[0][1]):
                release_until(held - in_flight[0][0].nbytes)  # Already written and hashed: release it.
            if not reads:  # This block's read is not out yet: make room for it (a block over the budget runs alone).
                release_until(max(0, budget - block.nbytes))
                if block.over(budget):
                    memory.release_free()  # What malloc holds free would add to this block's peak.
                issue(block)
            while next_read < len(blocks) and held + blocks[next_read].nbytes <= budget:  # Read ahead.
                issue(blocks[next_read])
            current = reads[0]
            data = current.reads.pop("data").result()
            reads.popleft()
            futures: list = []
            in_flight.append((block, futures))  # Filled below; drained from here on if the run raises.
            stop()
            if block.pair is None:
                source, target = inputs.stores[block.out.path], outputs[block.out.path]
                if carry_kept and block.first and block.last and carry.carriable(source, target):
                    futures.append(carry.copy(source, target))
                    carried.append(block.out)
                else:
                    index = None if not block.out.shape else slice(block.start, block.stop)
                    futures.append(_write(target, index, data))
                futures.append(digests.update(block.out, data))
            else:
                _fuse_block(
                    block, data, current, factors, fusers, seeds, outputs, digests, verify, device, stop, futures
                )
            del data, current
            if block.last:
                if block.pair is not None:
                    factors.pop(block.pair.kernel.path)
                    checks.append(fusers.pop(block.pair.kernel.path).finish())
                    on_pair(block.pair)
                digests.finish(block.out)
            stop()
        release_until(0)
    except BaseException:
        _drain(reads, in_flight)
        raise
    return Streamed(checks, carried)


def _drain(reads: Sequence[_Reads], in_flight: Sequence[tuple[Block, list]]) -> None:
    """Waits for every read, copy, write and digest still in flight, their errors dropped: once ``run`` has raised,
    nothing may go on writing into the output it leaves (which the caller then removes)."""
    pending = [read.future for r in reads for read in r.reads.values()]
    for future in pending + [f for _, futures in in_flight for f in futures]:
        with contextlib.suppress(BaseException):
            future.result()


def _fuse_block(
    block: Block,
    data: np.ndarray | reader.Pieces,
    reads: _Reads,
    factors: dict[plan.Path, tuple[np.ndarray, np.ndarray]],
    fusers: dict[plan.Path, fuse.LayerFuser],
    seeds: dict[plan.Path, int],
    outputs: dict[plan.Path, ts.TensorStore],
    digests: manifest.Digests,
    verify: bool,
    device: jax.Device,
    stop: Callable[[], None],
    futures: list[concurrent.futures.Future | ts.Future],
) -> None:
    """Fuses and writes the layers of one block of a pair, adding the futures of its writes and digests to
    ``futures`` as each is started."""
    pair = block.pair
    assert pair is not None
    key = pair.kernel.path
    if block.first:
        factors[key] = (reads.reads.pop("a").result(), reads.reads.pop("b").result())
        fusers[key] = fuse.layer_fuser(pair, verify=verify, seed=seeds[key], device=device)
    lora_a, lora_b = factors[key]
    fuser = fusers[key]
    if pair.batch_ndim == 0:
        layers = [((), ())]
    else:
        local = np.ndindex(data.shape[: pair.batch_ndim])
        layers = [(index, (index[0] + block.start, *index[1:])) for index in local]
    dispatched: collections.deque = collections.deque()

    def write_oldest() -> None:
        index, stored = dispatched.popleft()
        host = np.asarray(stored)  # Waits for XLA to compute this layer; later layers go on meanwhile.
        futures.append(_write(outputs[pair.merged_leaf.path], index or None, host))
        futures.append(digests.update(pair.merged_leaf, host))
        stop()

    for local, index in layers:
        dispatched.append((index, fuser.fuse(index, data[local], lora_a[index], lora_b[index])))
        if len(dispatched) > _LAYERS_AHEAD:
            write_oldest()
    while dispatched:
        write_oldest()
