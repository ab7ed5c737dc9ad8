"""Merges over several processes: the plan in groups, each restored, fused and written before the next (one process
streams slices instead: ``stream``).

Groups. The plan's units, pairs first and then kept leaves, are packed greedily into groups whose bytes (what a unit
restores plus what it writes) stay within the budget; without a budget the whole plan is one group. A unit is a kept
leaf, or a pair: its kernel, A and B are never split. A unit larger than the budget makes a group of its own, and the
run says so.

``produce`` makes a group's output arrays: Orbax's partial restore of its leaves placed on the job's mesh (each
process reads its own shards), then the fuse and its verification (``fuse.fuse_all``). ``writer.groups`` calls it
when Orbax's save reaches the group. ``reproduce`` makes them again, by the same compiled steps without verification,
for the reload check. Every pair is fused by the program a single-device run uses, so the values are those of a
one-process merge bit for bit.
"""

import dataclasses
from collections.abc import Callable, Sequence

from openpi_merge import checkpoint, fuse, memory, plan, sharding, storage, writer


def nbytes(group: plan.Plan) -> int:
    """What a group restores plus what it writes."""
    return sum(leaf.nbytes for leaf in group.leaves_in + group.leaves_out)


def make_groups(merge_plan: plan.Plan, budget_bytes: int) -> tuple[plan.Plan, ...]:
    """Splits the plan into sub-plans (groups) of at most ``budget_bytes`` where possible (0: one group), pairs
    first, then kept leaves."""
    if not budget_bytes:
        return (merge_plan,)
    units = [plan.Plan(pairs=(p,), kept=(), notes=(), problems=()) for p in merge_plan.pairs]
    units += [plan.Plan(pairs=(), kept=(k,), notes=(), problems=()) for k in merge_plan.kept]
    packed: list[plan.Plan] = []
    for unit in units:
        if packed and nbytes(packed[-1]) + nbytes(unit) <= budget_bytes:
            last = packed[-1]
            packed[-1] = dataclasses.replace(last, pairs=last.pairs + unit.pairs, kept=last.kept + unit.kept)
        else:
            packed.append(unit)
    return tuple(packed)


def describe(parts: Sequence[plan.Plan], budget_bytes: int, how: str) -> list[str]:
    """Summary lines: the number of groups, and a note on each group over the budget (each a single pair or leaf)."""
    if not budget_bytes:
        return [f"streamed: 1 group, the whole tree ({how}: no memory budget)"]
    budget = f"memory_budget_gb={budget_bytes / memory.GB:.3g}"
    return [f"streamed: {len(parts)} groups within {budget} ({how})"] + [
        f"note: {(g.pairs[0].kernel if g.pairs else g.kept[0]).name} needs {nbytes(g) / memory.GB:.3g} GB to "
        f"restore and write, over {budget}: processed alone"
        for g in parts
        if nbytes(g) > budget_bytes
    ]


def output_arrays(parts: Sequence[plan.Plan]) -> list[writer.OutputArray]:
    """The output arrays of every group, with the group's index (Orbax's ArrayHandler writes each in its shards)."""
    return [
        writer.OutputArray(leaf.path, leaf.shape, leaf.dtype, group=index)
        for index, group in enumerate(parts)
        for leaf in group.leaves_out
    ]


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a group's leaves are restored from and how they are placed."""

    params_dir: storage.AnyPath
    contents: checkpoint.Contents
    layout: sharding.Layout


def produce(
    group: plan.Plan,
    source: Source,
    *,
    verify: bool,
    on_pair: Callable[[plan.Pair], None],
    stop: Callable[[], None],
) -> tuple[fuse.Params, list[fuse.Check]]:
    """Restores ``group``'s leaves, fuses and verifies its pairs; returns the output arrays and each pair's Check.

    Raises InputError for a leaf that does not read, NumericsError from the fuse, InterruptError from ``stop``.
    """
    stop()
    params = checkpoint.restore(source.params_dir, source.contents, source.layout, [x.path for x in group.leaves_in])
    stop()
    return fuse.fuse_all(group, params, source.layout, verify=verify, on_pair=on_pair)


def reproduce(group: plan.Plan, source: Source) -> fuse.Params:
    """``produce`` again, without verification: what the reload check compares the written arrays with."""
    params = checkpoint.restore(source.params_dir, source.contents, source.layout, [x.path for x in group.leaves_in])
    return fuse.fuse_all(group, params, source.layout, verify=False)[0]
