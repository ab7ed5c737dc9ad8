"""Bounded-memory merges over several processes (``--config.memory_budget_gb``): restore, fuse and write the tree one
group at a time. (One process streams slices instead: ``stream``.)

Groups. The plan's units, pairs first and then kept leaves, are packed greedily into groups whose bytes (what a unit
restores plus what it writes) stay within the budget. A unit is a kept leaf, or a pair: its kernel, A and B are never
split. A unit larger than the budget makes a group of its own, and the run says so.

Design. orbax-checkpoint 0.11.13 (openpi's pin) has no incremental save, and the partial save of later releases
(``orbax.checkpoint.experimental.v1.partial``, a session of saves finalized into one checkpoint) is not in it. So the
output is written by one ordinary Orbax PyTree save, exactly as the in-memory mode writes it, except that its leaves
are placeholders (``_Pending``) for arrays not computed yet. A ``TypeHandler`` (Orbax's extension point for leaf types)
takes the placeholders; it presents itself as Orbax's own ``ArrayHandler``, so the tree metadata names ``jax.Array``
as in the in-memory output. When Orbax asks it to write them it walks the groups in order: has the group's arrays
produced (Orbax partial restore of its leaves, then the fuse and its verification), hands them to a fresh
``ArrayHandler`` and waits until that write is committed to the checkpoint's OCDBT database before starting the next
group. Everything on disk (OCDBT database, zarr metadata, sharding file, tree metadata, commit) is Orbax's own; only
the order in which leaves are produced differs. The values are those of the in-memory mode bit for bit, since each
pair is fused by the same compiled function. One optional record is left out: Orbax's per-host array metadata
(``array_metadatas/``, and the ``write_shape`` it adds to the tree metadata), because orbax 0.11.13's store rewrites
that file on every write call instead of adding to it; Orbax reads checkpoints without it, as it reads those of its
earlier releases.
"""

import asyncio
import collections
import dataclasses
import pathlib
from collections.abc import Callable, Sequence

import jax
import orbax.checkpoint as ocp

from openpi_merge import checkpoint, plan, slices

GB = 1e9


def nbytes(group: plan.Plan) -> int:
    """What a group restores plus what it writes."""
    return sum(leaf.nbytes for leaf in group.leaves_in + group.leaves_out)


def make_groups(merge_plan: plan.Plan, budget_bytes: int) -> tuple[plan.Plan, ...]:
    """Splits the plan into sub-plans (groups) of at most ``budget_bytes`` where possible: pairs first, then kept."""
    units = [plan.Plan(pairs=(p,), kept=(), notes=(), problems=()) for p in merge_plan.pairs]
    units += [plan.Plan(pairs=(), kept=(k,), notes=(), problems=()) for k in merge_plan.kept]
    groups: list[plan.Plan] = []
    for unit in units:
        if groups and nbytes(groups[-1]) + nbytes(unit) <= budget_bytes:
            last = groups[-1]
            groups[-1] = dataclasses.replace(last, pairs=last.pairs + unit.pairs, kept=last.kept + unit.kept)
        else:
            groups.append(unit)
    return tuple(groups)


def describe(groups: Sequence[plan.Plan], budget_bytes: int, how: str) -> list[str]:
    """Summary lines: the number of groups, and a note on each group over the budget (each a single pair or leaf)."""
    budget = f"memory_budget_gb={budget_bytes / GB:.3g}"
    return [f"streamed: {len(groups)} groups within {budget} ({how})"] + [
        f"note: {(g.pairs[0].kernel if g.pairs else g.kept[0]).name} needs {nbytes(g) / GB:.3g} GB to restore and "
        f"write, over {budget}: processed alone"
        for g in groups
        if nbytes(g) > budget_bytes
    ]


@dataclasses.dataclass(frozen=True)
class _Pending:
    """An output leaf that is restored (and fused) only when Orbax asks to write it."""

    path: plan.Path
    group: int


class _GroupWriter(slices.WriteOnlyArrayHandler):
    """Writes ``_Pending`` leaves group by group through Orbax's ``ArrayHandler``; see the module docstring."""

    def __init__(self, produce: Callable[[int], dict[plan.Path, jax.Array]]):
        self._produce = produce

    async def serialize(self, values: Sequence[_Pending], infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        by_group = collections.defaultdict(list)
        for value, info, arg in zip(values, infos, args, strict=True):
            by_group[value.group].append((value.path, info, arg))
        for group in sorted(by_group):
            arrays = self._produce(group)
            paths, group_infos, group_args = zip(*by_group[group], strict=True)
            # A fresh handler per group: it keeps per-call state (array metadata) that must not mix groups.
            futures = await ocp.type_handlers.ArrayHandler().serialize(
                [arrays.pop(path) for path in paths], group_infos, group_args
            )
            for committed in futures:
                await asyncio.to_thread(committed.result)
        return []


def save(
    params_dir: pathlib.Path,
    groups: Sequence[plan.Plan],
    produce: Callable[[plan.Plan], dict[plan.Path, jax.Array]],
    *,
    value_suffix: bool,
) -> None:
    """Writes the merged tree to ``params_dir``, calling ``produce(group)`` for its arrays only when Orbax writes it;
    a group's arrays are committed before the next group is produced."""
    pending = {leaf.path: _Pending(leaf.path, i) for i, group in enumerate(groups) for leaf in group.leaves_out}
    writer = _GroupWriter(lambda i: produce(groups[i]))
    registry = ocp.type_handlers.create_type_handler_registry((_Pending, writer))
    checkpoint.save(params_dir, pending, value_suffix=value_suffix, type_handler_registry=registry)
