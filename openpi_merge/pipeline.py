"""One merge, as a line of named steps that hand each other values:

    read_plan -> check_paths -> claim (lock) -> layout -> stage -> produce + write (+ digests) -> assets + manifest
    -> reload check -> commit -> summary

Nothing reads an array before the plan is made, the paths are checked and the output is claimed (``commit``), so
every mistake of input, config or environment that can be seen early ends the run before its expensive part.

A single process streams the output a slice at a time (``stream``, ``slices``) and digests it as it writes. Several
processes produce arrays (restore, fuse, verify) with ``merged_arrays``: the whole plan at once, or, under a memory
budget, the groups ``groups`` makes, each produced when Orbax's save reaches it (``groups.save``); process 0 digests
what they wrote afterwards (``_digest_written``). ``stop`` is called at every step boundary: it raises
InterruptError when a signal arrived, so an interrupted run stops where no Orbax write is in flight, and
``commit.staged`` removes what it had written.
"""

import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable, Iterator

from openpi_merge import (
    checkpoint,
    commit,
    config,
    distributed,
    errors,
    fuse,
    groups,
    manifest,
    memory,
    objectstore_commit,
    plan,
    progress,
    provenance,
    report,
    sharding,
    slices,
    storage,
    stream,
    summary,
)

Stop = Callable[[], None]
_CHECK_BUDGET_BYTES = 10**9  # Arrays read back at a time (mode=check, digests, reload) without a set budget.


def _read_back_bytes(settings: config.Settings) -> int:
    """How much of a written checkpoint is read back at a time: the budget set, else ``_CHECK_BUDGET_BYTES``."""
    return settings.memory_budget_bytes or _CHECK_BUDGET_BYTES


@dataclasses.dataclass(frozen=True)
class Input:
    source: checkpoint.Source
    contents: checkpoint.Contents


def read_plan(settings: config.Settings, outcome: report.Outcome) -> Input:
    """Reads metadata only and records the plan; with a reference, checks the output tree against it."""
    source = checkpoint.locate_input(settings.input)
    contents = checkpoint.read_contents(source.params_dir)
    reference = None
    if settings.reference:
        reference_source = checkpoint.locate_input(settings.reference, role="reference")
        reference = checkpoint.read_contents(reference_source.params_dir).leaves
    outcome.merge_plan = plan.make_plan(contents.leaves, settings, reference)
    return Input(source, contents)


def check_report_path(path: str) -> None:
    """Raises ConfigError unless a report can be written at ``path`` (checked before the merge, not after it)."""
    if not path or storage.is_remote(path):
        return
    target = pathlib.Path(path).expanduser().resolve()
    if target.is_dir():
        raise errors.ConfigError(f"report={path!r} is a directory: name a file, e.g. {target / 'merge.json'}")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise errors.EnvironmentFaultError(f"cannot write the report {target}: {parent} is not writable")


def inspect(settings: config.Settings, outcome: report.Outcome) -> None:
    """Prints what a merge would do, from metadata alone; raises PlanError if the merge would hit a problem."""
    with outcome.stopwatch.phase("plan"):
        given = read_plan(settings, outcome)
    print(summary.render_plan(outcome.merge_plan, given.source.params_dir))
    outcome.merge_plan.raise_on_problems()


def check(settings: config.Settings, outcome: report.Outcome, stop: Stop) -> str:
    """``mode=check``: re-reads the step dir at ``input`` and compares it with its manifest."""
    with outcome.stopwatch.phase("check"):
        source = checkpoint.locate_input(settings.input)
        return manifest.check(
            source.root,
            sharding.make_layout(settings.mesh),
            budget_bytes=_read_back_bytes(settings),
            stop=stop,
        )


@dataclasses.dataclass
class _Context:
    """What producing a group needs: where to read, how to place, what to record, when to stop."""

    settings: config.Settings
    given: Input
    layout: sharding.Layout
    outcome: report.Outcome
    digests: manifest.Digests
    fused: progress.Progress
    stop: Stop


def merged_arrays(ctx: _Context, group: plan.Plan, *, again: bool = False) -> fuse.Params:
    """Restores ``group``'s leaves, fuses and verifies its pairs, and (first pass) records their checks.

    ``again``: the reload check's second pass, by the same compiled steps, without verification or progress.
    """
    ctx.stop()
    whole = group is ctx.outcome.merge_plan
    paths = None if whole else [leaf.path for leaf in group.leaves_in]
    stopwatch = ctx.outcome.stopwatch
    with stopwatch.phase("reload" if again else "restore"):
        params = checkpoint.restore(ctx.given.source.params_dir, ctx.given.contents, ctx.layout, paths)
    ctx.stop()

    def after_pair(pair: plan.Pair) -> None:
        ctx.fused.advance(pair.kernel.name, pair.kernel.nbytes)
        ctx.stop()

    with stopwatch.phase("reload" if again else "fuse"):
        merged, checks = fuse.fuse_all(
            group, params, ctx.layout, verify=ctx.settings.verify and not again, on_pair=None if again else after_pair
        )
    if not again:
        ctx.outcome.checks += checks  # Digested after the save (``_digest_written``): the arrays span processes.
    return merged


def _digest_written(ctx: _Context, params_dir: storage.AnyPath) -> None:
    """Several processes: process 0 digests the written arrays in a child process that is no part of the job.

    The arrays are sharded over every process, and the digests need each whole. Gathering them with JAX collectives
    deadlocked intermittently next to Orbax's multi-process save, so a plain single-process reader (on the CPU, so it
    never contends for the job's accelerators) reads the staged arrays back, a group at a time, on process 0.
    Raises EnvironmentFaultError if that reader fails.
    """
    if not distributed.is_primary():
        return
    ctx.stop()
    budget = _read_back_bytes(ctx.settings)
    committed = "0" if storage.is_remote(params_dir) else "1"  # A bucket's save restores by its handler until then.
    command = [sys.executable, "-m", "openpi_merge.manifest", str(params_dir), str(budget), committed]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise errors.EnvironmentFaultError(f"cannot read back {params_dir} to checksum it: {last[:300]}")
    leaves = {leaf.name: leaf for leaf in ctx.outcome.merge_plan.leaves_out}
    for name, (sha256, finite) in json.loads(result.stdout.strip().splitlines()[-1]).items():
        ctx.digests.add_digested(leaves[name], sha256, finite)


def _budget(settings: config.Settings) -> tuple[int, str]:
    """The memory budget in bytes (0: none) and where it came from."""
    if settings.memory_budget_bytes is None:
        return memory.auto_budget()
    return settings.memory_budget_bytes, "set" if settings.memory_budget_bytes else "none"


def _stream(ctx: _Context, params_dir: storage.AnyPath) -> None:
    """One process: reads, fuses and writes the output a slice at a time (``stream``, ``slices``)."""
    merge_plan, contents = ctx.outcome.merge_plan, ctx.given.contents
    budget, how = _budget(ctx.settings)
    limit = budget or sum(leaf.nbytes for leaf in merge_plan.leaves_in + merge_plan.leaves_out)
    with ctx.outcome.stopwatch.phase("stream"):
        inputs = slices.open_inputs(
            ctx.given.source.params_dir, merge_plan.leaves_in, value_suffix=contents.value_suffix
        )
        blocks = stream.make_blocks(merge_plan, inputs, limit)
        ctx.outcome.details += stream.describe(blocks, limit, how)

        def after_pair(pair: plan.Pair) -> None:
            ctx.fused.advance(pair.kernel.name, pair.kernel.nbytes)

        arrays = stream.output_arrays(blocks)
        with slices.writing(params_dir, arrays, value_suffix=contents.value_suffix) as output:
            ctx.outcome.checks += stream.run(
                blocks,
                inputs,
                output.arrays,
                budget=limit,
                verify=ctx.settings.verify,
                device=ctx.layout.device,
                digests=ctx.digests,
                stop=ctx.stop,
                on_pair=after_pair,
            )


def _write(ctx: _Context, params_dir: storage.AnyPath) -> Iterator[fuse.Params] | None:
    """Writes the merged tree to ``params_dir``. Several processes: returns what the reload check compares it with,
    lazily (one process: None, the reload check compares digests)."""
    if distributed.is_single_process():
        _stream(ctx, params_dir)
        return None
    merge_plan, value_suffix = ctx.outcome.merge_plan, ctx.given.contents.value_suffix
    budget, how = _budget(ctx.settings)
    if budget:
        parts = groups.make_groups(merge_plan, budget)
        ctx.outcome.details += groups.describe(parts, budget, how)
        groups.save(
            params_dir,
            parts,
            functools.partial(merged_arrays, ctx),
            value_suffix=value_suffix,
        )
        return (merged_arrays(ctx, group, again=True) for group in parts)  # Lazy: runs only for the reload check.
    merged = merged_arrays(ctx, merge_plan)
    with ctx.outcome.stopwatch.phase("save"):
        checkpoint.save(params_dir, merged, value_suffix=value_suffix)
    return iter([merged])


@contextlib.contextmanager
def _claimed(settings: config.Settings, target: storage.AnyPath, needed_bytes: int) -> Iterator[commit.Claim | None]:
    """Holds the output for the run: the local lock and its checks (``commit``); on object storage, where no lock
    outlives its holder, the checks of ``objectstore_commit`` alone."""
    if storage.is_remote(target):
        objectstore_commit.check_target(target, overwrite=settings.overwrite)
        yield None
        return
    with commit.claim(
        target, overwrite=settings.overwrite, needed_bytes=needed_bytes, primary=distributed.is_primary()
    ) as held:
        yield held


def _staged(
    settings: config.Settings, target: storage.AnyPath, held: commit.Claim | None, stop: Stop
) -> contextlib.AbstractContextManager[storage.AnyPath]:
    """The dir to write the step into, committed when the block completes: ``commit.staged`` or, on object storage,
    ``objectstore_commit.staged``."""
    if held is None:
        return objectstore_commit.staged(target, overwrite=settings.overwrite)
    return commit.staged(held, distributed.shared_token(), barrier=distributed.barrier, stop=stop)


def merge(settings: config.Settings, outcome: report.Outcome, stop: Stop) -> str:
    """Runs one merge and returns its summary (module docstring)."""
    stopwatch = outcome.stopwatch
    stopwatch.ticker = progress.PhaseTicker() if settings.progress else None
    with stopwatch.phase("plan"):
        given = read_plan(settings, outcome)
        merge_plan = outcome.merge_plan
        merge_plan.raise_on_problems()
        target = checkpoint.resolve_output(settings.output, given.source)
        outcome.output = target
        check_report_path(settings.report)
    needed = sum(leaf.nbytes for leaf in merge_plan.leaves_out)
    with _claimed(settings, target, needed) as held:
        outcome.details += [f"note: {note}" for note in (held.notes if held else [])]
        layout = sharding.make_layout(settings.mesh)
        outcome.devices = layout.describe()
        outcome.details.insert(0, f"devices: {outcome.devices}")
        kept_finite = [leaf.path for leaf in merge_plan.kept]
        digests = manifest.Digests(check_finite=kept_finite)
        fused = progress.Progress("fuse", sum(p.kernel.nbytes for p in merge_plan.pairs), enabled=settings.progress)
        ctx = _Context(settings, given, layout, outcome, digests, fused, stop)
        try:
            with _staged(settings, target, held, stop) as staging:
                params_dir = staging / checkpoint.PARAMS_KEY
                try:
                    written = _write(ctx, params_dir)
                    with stopwatch.phase("digest"):
                        if not distributed.is_single_process():
                            _digest_written(ctx, params_dir)
                        entries = digests.entries()
                    stop()
                    if distributed.is_primary():
                        with stopwatch.phase("save"):
                            checkpoint.copy_assets(given.source, staging)
                            outcome.provenance = provenance.write(
                                staging, provenance.make(merge_plan, input_path=given.source.root, output=target)
                            )
                            manifest.write(staging, entries, value_suffix=given.contents.value_suffix)
                except (OSError, ValueError, RuntimeError) as e:  # Orbax and TensorStore raise all three.
                    if fault := errors.environment_fault(e, staging.parent, "cannot write the output in"):
                        raise fault from e
                    raise
                if settings.verify_reload and written is None:
                    with stopwatch.phase("reload"):
                        manifest.check_written(params_dir, entries, budget_bytes=_read_back_bytes(settings), stop=stop)
                elif settings.verify_reload:
                    with stopwatch.phase("reload"):
                        checkpoint.check_written(
                            params_dir,
                            merge_plan.leaves_out,
                            written,
                            value_suffix=given.contents.value_suffix,
                            layout=layout,
                        )
                stop()
        finally:
            digests.close()
    outcome.details.append(f"peak memory: {memory.peak_rss_bytes() / 1e9:.3g} GB resident")
    rendered = summary.render(merge_plan, outcome.checks, target, stopwatch)
    return "\n".join([rendered, *(f"  {line}" for line in outcome.details)])
