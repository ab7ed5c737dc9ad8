"""One merge, as a line of named steps that hand each other values:

    plan -> claim -> write -> seal -> verify_reload -> export -> commit -> report

- ``plan_merge``: metadata only (``plan``): pairs, kept leaves, problems; the output and report paths checked.
- ``claim``: the output's committer (``commit.claim_output``: local dir or bucket prefix, chosen once) holds the
  output; ``stage`` gives the dir to write the step into.
- ``write``: every output array, fused and verified, into ``<staging>/params`` with its digest: one process
  streams slices (``stream``), several write groups (``groups``); both through ``writer``, Orbax's own save.
- ``seal``: ``assets/``, the provenance and the integrity manifest beside ``params/``.
- ``verify_reload`` (``verify_reload=True``): the written params re-read and compared, before anything is committed.
- ``export`` (``pytorch_output``, ``lerobot_output``): each export written from the staged params into its own
  claimed staging dir and proven (``export``). With exports but no ``output``, the Orbax params are staged in a
  hidden scratch claim (``commit.scratch_target``) that is never committed.
- ``commit``: the committer publishes the staged step, then each export's (``commit_all``; ``report`` is staged just
  before, so a report that cannot be written commits nothing); then the report takes its name.

Nothing reads an array before the plan is made and the output is claimed, so every mistake of input, config or
environment that can be seen early ends the run before its expensive part. ``stop`` is called at every step
boundary: it raises InterruptError when a signal arrived, so an interrupted run stops where no Orbax write is in
flight, and the committer removes what it had staged.
"""

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable

from openpi_merge import (
    checkpoint,
    commit,
    config,
    distributed,
    errors,
    export,
    fuse,
    groups,
    manifest,
    memory,
    plan,
    progress,
    provenance,
    reader,
    report,
    sharding,
    storage,
    stream,
    summary,
    writer,
)
from openpi_merge.openpi_layout import PARAMS_KEY

Stop = Callable[[], None]
_CHECK_BUDGET_BYTES = 10**9  # Arrays read back at a time (mode=check, digests, reload) without a set budget.


def _read_back_bytes(settings: config.Settings) -> int:
    """How much of a written checkpoint is read back at a time: the budget set, else ``_CHECK_BUDGET_BYTES``."""
    return settings.memory_budget_bytes or _CHECK_BUDGET_BYTES


@dataclasses.dataclass(frozen=True)
class Input:
    """The input checkpoint: where its parts are, and its parameters as the metadata describes them."""

    location: checkpoint.Source
    contents: checkpoint.Contents


def read_input(settings: config.Settings, outcome: report.Outcome) -> Input:
    """Reads metadata only and records the plan; with a reference, checks the output tree against it."""
    location = checkpoint.locate_input(settings.input)
    contents = checkpoint.read_contents(location.params_dir)
    reference = None
    if settings.reference:
        reference_location = checkpoint.locate_input(settings.reference, role="reference")
        reference = checkpoint.read_contents(reference_location.params_dir).leaves
    outcome.merge_plan = plan.make_plan(contents.leaves, settings, reference)
    return Input(location, contents)


def check_report_path(path: str, *, input_path: str, outputs: dict[str, str]) -> None:
    """Raises ConfigError unless a report can be written at ``path`` without touching the input, an output (``outputs``:
    the config field -> its path, e.g. ``output``, ``pytorch_output``) or an output's hidden siblings (lock, staging);
    EnvironmentFaultError if its dir is not writable. Checked before anything else (a report of a failed run must not
    land there either), from the paths as given."""
    if not path:
        return
    resolved = storage.resolve(path)
    named = {"the input": input_path, **{f"the {field}": given for field, given in outputs.items()}}
    for what, given in named.items():
        if given and _within(resolved, root := storage.resolve(given)):
            raise errors.ConfigError(f"report={path!r} lies inside {what} {root}: write the report elsewhere")
    for field, given in outputs.items():
        if not given or storage.is_remote(given) or storage.is_remote(resolved):
            continue
        target = storage.resolve(given)
        if resolved.parent == target.parent and resolved.name.startswith(commit.hidden_names(target)):
            raise errors.ConfigError(f"report={path!r} is a name the merge uses beside the {field}: choose another")
    if storage.is_remote(resolved):
        return
    if resolved.is_dir():
        raise errors.ConfigError(f"report={path!r} is a directory: name a file, e.g. {resolved / 'merge.json'}")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise errors.EnvironmentFaultError(f"cannot write the report {resolved}: {parent} is not writable")


def _within(path: storage.AnyPath, root: storage.AnyPath) -> bool:
    """Whether ``path`` is ``root`` or lies under it (local paths through links too, as both are resolved)."""
    if storage.is_remote(path) != storage.is_remote(root):
        return False
    if storage.is_remote(path):
        return str(path) == str(root) or str(path).startswith(str(root) + "/")
    return path == root or root in path.parents


def inspect(settings: config.Settings, outcome: report.Outcome) -> None:
    """Prints what a merge would do, from metadata alone; raises PlanError if the merge would hit a problem."""
    with outcome.stopwatch.phase("plan"):
        given = read_input(settings, outcome)
    print(summary.render_plan(outcome.merge_plan, given.location.params_dir))
    outcome.merge_plan.raise_on_problems()


def check(settings: config.Settings, outcome: report.Outcome, stop: Stop) -> str:
    """``mode=check``: re-reads the step dir (or export dir) at ``input`` and compares it with its manifest."""
    given = storage.resolve(settings.input)
    is_export = not storage.is_remote(given) and manifest.is_files(given)
    with outcome.stopwatch.phase("check"):
        return manifest.check(
            given if is_export else checkpoint.locate_input(settings.input).root,
            sharding.make_layout(settings.mesh),
            budget_bytes=_read_back_bytes(settings),
            stop=stop,
        )


@dataclasses.dataclass(frozen=True)
class Written:
    """What ``write`` wrote: each pair's Check, and the manifest's entry of every output array."""

    checks: list[fuse.Check]
    entries: dict[str, dict]


def _budget(settings: config.Settings) -> tuple[int, str]:
    """The memory budget in bytes (0: none) and where it came from."""
    if settings.memory_budget_bytes is None:
        return memory.auto_budget()
    return settings.memory_budget_bytes, "set" if settings.memory_budget_bytes else "none"


def _fuse_progress(settings: config.Settings, merge_plan: plan.Plan) -> Callable[[plan.Pair], None]:
    fused = progress.Progress("fuse", sum(p.kernel.nbytes for p in merge_plan.pairs), enabled=settings.progress)
    return lambda pair: fused.advance(pair.kernel.name, pair.kernel.nbytes)


@dataclasses.dataclass(frozen=True)
class Job:
    """What every step of one merge reads: its settings, input and plan; what it records; when it stops."""

    settings: config.Settings
    given: Input
    merge_plan: plan.Plan
    outcome: report.Outcome
    stop: Stop


def write_streamed(job: Job, staging: commit.Committer, params_dir: storage.AnyPath) -> Written:
    """One process: reads, fuses and writes the output a slice at a time (``stream``), digesting it as it goes."""
    settings, given, merge_plan, outcome, stop = job.settings, job.given, job.merge_plan, job.outcome, job.stop
    budget, how = _budget(settings)
    limit = budget or sum(leaf.nbytes for leaf in merge_plan.leaves_in + merge_plan.leaves_out)
    inputs = reader.open_inputs(
        given.location.params_dir, merge_plan.leaves_in, value_suffix=given.contents.value_suffix
    )
    blocks = stream.make_blocks(merge_plan, inputs, limit)
    outcome.details += stream.describe(blocks, limit, how)
    digests = manifest.Digests(check_finite=[leaf.path for leaf in merge_plan.kept])
    try:
        arrays = stream.output_arrays(blocks)
        options = staging.save_options
        with writer.slices(params_dir, arrays, value_suffix=given.contents.value_suffix, save_options=options) as out:
            streamed = stream.run(
                blocks,
                inputs,
                out,
                budget=limit,
                verify=settings.verify,
                device=sharding.single_device().device,
                digests=digests,
                stop=stop,
                on_pair=_fuse_progress(settings, merge_plan),
                carry_kept=settings.carry,
            )
        if streamed.carried:
            carried_gb = sum(leaf.nbytes for leaf in streamed.carried) / memory.GB
            outcome.details.append(
                f"carried: {len(streamed.carried)} unchanged arrays ({carried_gb:.3g} GB) copied as the input stores "
                "them, not encoded again"
            )
        return Written(streamed.checks, digests.entries())
    finally:
        digests.close()


def write_in_groups(job: Job, staging: commit.Committer, params_dir: storage.AnyPath) -> Written:
    """Several processes: each group restored, fused and written in turn (``groups``); process 0 then digests what
    was written (``_digest_written``)."""
    settings, given, merge_plan, outcome, stop = job.settings, job.given, job.merge_plan, job.outcome, job.stop
    budget, how = _budget(settings)
    parts = groups.make_groups(merge_plan, budget)
    outcome.details += groups.describe(parts, budget, how)
    source = groups.Source(given.location.params_dir, given.contents, sharding.make_layout(settings.mesh))
    checks: list[fuse.Check] = []
    on_pair = _fuse_progress(settings, merge_plan)

    def produce(index: int) -> fuse.Params:
        arrays, group_checks = groups.produce(parts[index], source, verify=settings.verify, on_pair=on_pair, stop=stop)
        checks.extend(group_checks)
        return arrays

    writer.groups(
        params_dir,
        groups.output_arrays(parts),
        produce,
        value_suffix=given.contents.value_suffix,
        save_options=staging.save_options,
    )
    stop()
    entries = _digest_written(params_dir, merge_plan, settings, orbax_committed=staging.staged_readable_by_orbax)
    return Written(checks, entries)


def _digest_written(
    params_dir: storage.AnyPath, merge_plan: plan.Plan, settings: config.Settings, *, orbax_committed: bool
) -> dict[str, dict]:
    """Several processes: process 0 digests the written arrays in a child process that is no part of the job.

    The arrays are sharded over every process, and the digests need each whole. Gathering them with JAX collectives
    deadlocked intermittently next to Orbax's multi-process save, so a plain single-process reader (on the CPU, so it
    never contends for the job's accelerators) reads the staged arrays back, a group at a time, on process 0.
    Raises EnvironmentFaultError if that reader fails, NumericsError for a kept leaf holding NaN or Inf.
    """
    if not distributed.is_primary():
        return {}
    budget = str(_read_back_bytes(settings))
    command = [sys.executable, "-m", "openpi_merge.manifest", str(params_dir), budget, "1" if orbax_committed else "0"]
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise errors.EnvironmentFaultError(f"cannot read back {params_dir} to checksum it: {last[:300]}")
    digests = manifest.Digests(check_finite=[leaf.path for leaf in merge_plan.kept])
    leaves = {leaf.name: leaf for leaf in merge_plan.leaves_out}
    for name, (sha256, finite) in json.loads(result.stdout.strip().splitlines()[-1]).items():
        digests.add_digested(leaves[name], sha256, finite)
    digests.close()
    return digests.entries()


def seal(
    given: Input, merge_plan: plan.Plan, step_dir: storage.AnyPath, target: storage.AnyPath, written: Written
) -> dict:
    """Process 0: copies ``assets/`` and writes the provenance and the manifest into the staged step dir; returns the
    provenance document."""
    if not distributed.is_primary():
        return {}
    asset_ids = checkpoint.copy_assets(given.location, step_dir)
    document = provenance.make(merge_plan, input_path=given.location.root, output=target, asset_ids=asset_ids)
    provenance.write(step_dir, document)
    manifest.write(step_dir, written.entries, value_suffix=given.contents.value_suffix)
    return document


def verify_reload(
    settings: config.Settings,
    given: Input,
    merge_plan: plan.Plan,
    params_dir: storage.AnyPath,
    written: Written,
    *,
    orbax_committed: bool,
    stop: Stop,
) -> None:
    """Re-reads the written params and raises NumericsError unless they are what was written: one process compares
    digests with those taken while writing; several processes compare the arrays with the same groups produced again
    (``groups.reproduce``), shard by shard."""
    if distributed.is_single_process():
        manifest.check_written(
            params_dir, written.entries, budget_bytes=_read_back_bytes(settings), committed=orbax_committed, stop=stop
        )
        return
    source = groups.Source(given.location.params_dir, given.contents, sharding.make_layout(settings.mesh))
    budget, _ = _budget(settings)
    checkpoint.check_written(
        params_dir,
        merge_plan.leaves_out,
        (groups.reproduce(group, source) for group in groups.make_groups(merge_plan, budget)),
        value_suffix=given.contents.value_suffix,
        layout=source.layout,
        committed=orbax_committed,
    )


def write_exports(
    job: Job, claims: list[tuple[export.Target, commit.Claim]], params_dir: storage.AnyPath, token: str
) -> list[export.Proof]:
    """Each export, from the staged params, into its own staging dir, proven (``export``)."""
    merged = export.Merged(params_dir, job.merge_plan, value_suffix=job.given.contents.value_suffix)
    proofs = []
    for target, claim in claims:
        job.stop()
        staging = claim.stage(token)
        try:
            proofs.append(export.write(target, staging, merged, job.settings, job.given.location))
        except OSError as e:
            if fault := claim.write_fault(e):
                raise fault from e
            raise
    return proofs


def commit_all(committer: commit.Committer | None, exports: list[commit.Claim], stop: Stop) -> None:
    """Commits the output (None: none asked for), then each export. ``stop`` guards the first commit only: once one
    is committed the rest follow (each a rename), so that an interrupt never splits what one run wrote."""
    for claim in ([committer] if committer is not None else []) + exports:
        claim.commit(stop)
        stop = _no_stop


def _no_stop() -> None:
    pass


def merge(settings: config.Settings, outcome: report.Outcome, stop: Stop) -> str:
    """Runs one merge and returns its summary (module docstring)."""
    stopwatch = outcome.stopwatch
    stopwatch.ticker = progress.PhaseTicker() if settings.progress else None
    with stopwatch.phase("plan"):
        given = read_input(settings, outcome)
        merge_plan = outcome.merge_plan
        merge_plan.raise_on_problems()
        target = checkpoint.resolve_output(settings.output, given.location) if settings.output else None
        exports = export.targets(settings, given.location, target, merge_plan)
        outcome.output = target
    outcome.devices = sharding.make_layout(settings.mesh).describe()
    outcome.details.append(f"devices: {outcome.devices}")
    needed = sum(leaf.nbytes for leaf in merge_plan.leaves_out)
    write = write_streamed if distributed.is_single_process() else write_in_groups
    with contextlib.ExitStack() as held:
        export_claims = [
            held.enter_context(
                commit.claim(
                    t.path,
                    overwrite=settings.overwrite,
                    needed_bytes=export.nbytes(merge_plan, settings.export_dtype),
                    role=t.field,
                )
            )
            for t in exports
        ]
        # No output: the Orbax params are staged beside the first export and never committed.
        committer = held.enter_context(
            commit.claim_output(
                target or commit.scratch_target(exports[0].path),
                overwrite=settings.overwrite or target is None,
                needed_bytes=needed,
                primary=distributed.is_primary(),
                barrier=distributed.barrier,
            )
        )
        token = distributed.shared_token()
        step_dir = committer.stage(token)
        params_dir = step_dir / PARAMS_KEY
        job = Job(settings, given, merge_plan, outcome, stop)
        try:
            with stopwatch.phase("write"):
                written = write(job, committer, params_dir)
            stop()
            with stopwatch.phase("seal"):
                outcome.checks = written.checks
                outcome.provenance = seal(given, merge_plan, step_dir, target or exports[0].path, written)
        except (OSError, ValueError, RuntimeError) as e:  # Orbax, TensorStore and the storage clients raise all three.
            if fault := committer.write_fault(e):
                raise fault from e
            raise
        if settings.verify_reload:
            with stopwatch.phase("reload"):
                verify_reload(
                    settings,
                    given,
                    merge_plan,
                    params_dir,
                    written,
                    orbax_committed=committer.staged_readable_by_orbax,
                    stop=stop,
                )
        proofs = []
        if exports:
            with stopwatch.phase("export"):
                proofs = write_exports(job, list(zip(exports, export_claims, strict=True)), params_dir, token)
        outcome.exports = [proof.to_json() for proof in proofs]
        outcome.details.append(f"peak memory: {memory.peak_rss_bytes() / 1e9:.3g} GB resident")
        staged_report = report.stage(settings, outcome) if distributed.is_primary() else None
        try:
            commit_all(committer if target is not None else None, export_claims, stop)
        except BaseException:
            if staged_report is not None:
                staged_report.discard()
            raise
    notes = committer.notes + [note for claim in export_claims for note in claim.notes]
    outcome.details += [f"note: {note}" for note in notes]
    if staged_report is not None:
        staged_report.publish(target or ", ".join(str(t.path) for t in exports))
        outcome.report_written = True
    rendered = summary.render(
        merge_plan,
        outcome.checks,
        target,
        stopwatch,
        outcome.provenance.get("assets"),
        [line for proof in proofs for line in proof.describe()],
    )
    return "\n".join([rendered, *(f"  {line}" for line in outcome.details)])
