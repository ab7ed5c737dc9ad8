"""openpi-merge: folds the LoRA adapters of an openpi fine-tune into its base weights.

  python -m openpi_merge --config=configs/pi0_lora.py --config.input=STEP_DIR --config.output=OUT_DIR

Reads the Orbax checkpoint, pairs every kernel with its LoRA factors, fuses ``W + s * dW(A, B)`` in float32 under
``jax.jit``, drops the LoRA leaves and writes a step dir that openpi serves under the base (non-LoRA) config.
"""

import contextlib
import functools
import signal
import sys
import tempfile

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from openpi_merge import (
    checkpoint,
    config,
    distributed,
    errors,
    fuse,
    plan,
    progress,
    report,
    sharding,
    stream,
    summary,
    synthetic,
)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Merge config file, e.g. configs/pi0_lora.py.")
# `--config.input=example:<model>` merges a tiny synthetic checkpoint of that model, written to a temporary dir.
_EXAMPLE_PREFIX = "example:"


def _plan(settings: config.Settings, outcome: report.Outcome) -> tuple[checkpoint.Source, checkpoint.Contents]:
    """Reads metadata only and records the plan; with a reference, checks the output tree against it."""
    source = checkpoint.locate_input(settings.input)
    contents = checkpoint.read_contents(source.params_dir)
    reference = None
    if settings.reference:
        reference = checkpoint.read_contents(checkpoint.locate_input(settings.reference).params_dir).leaves
    outcome.merge_plan = plan.make_plan(contents.leaves, settings, reference)
    return source, contents


def inspect(settings: config.Settings, outcome: report.Outcome) -> None:
    """Prints what a merge would do, from metadata alone; raises PlanError if the merge would hit a problem."""
    with outcome.stopwatch.phase("plan"):
        source, _ = _plan(settings, outcome)
    print(summary.render_plan(outcome.merge_plan, source.params_dir))
    outcome.merge_plan.raise_on_problems()


def merge(settings: config.Settings, outcome: report.Outcome) -> str:
    """Runs one merge and returns its summary: plan -> restore -> fuse (+ verify) -> save (+ reload check).

    With a memory budget, restore and fuse run group by group inside the save, as Orbax writes (see ``stream``).
    """
    stopwatch = outcome.stopwatch
    with stopwatch.phase("plan"):
        source, contents = _plan(settings, outcome)
        outcome.output = checkpoint.check_output(settings.output, source, overwrite=settings.overwrite)
        outcome.merge_plan.raise_on_problems()
        layout = sharding.make_layout(settings.mesh)
        outcome.devices = layout.describe()
    merge_plan, details = outcome.merge_plan, [f"devices: {outcome.devices}"]
    fused = progress.Progress("fuse", len(merge_plan.pairs))

    def merged_arrays(group: plan.Plan, *, again: bool = False) -> fuse.Params:
        """Restores the group's leaves (all, for the whole plan), fuses and verifies its pairs.

        ``again``: a second pass for the reload check (and timed as part of it), by the same compiled steps, without
        verification or progress.
        """
        paths = None if group is merge_plan else [leaf.path for leaf in group.leaves_in]
        with stopwatch.phase("reload" if again else "restore"):
            params = checkpoint.restore(source.params_dir, contents, layout, paths)
        with stopwatch.phase("reload" if again else "fuse"):
            merged, checks = fuse.fuse_all(
                group,
                params,
                layout,
                verify=settings.verify and not again,
                on_pair=None if again else lambda pair: fused.advance(pair.kernel.name),
            )
        outcome.checks += checks
        return merged

    if settings.memory_budget_bytes:
        groups = stream.make_groups(merge_plan, settings.memory_budget_bytes)
        details += stream.describe(groups, settings.memory_budget_bytes)
        write = functools.partial(stream.save, groups=groups, produce=merged_arrays)
        written = (merged_arrays(group, again=True) for group in groups)  # Lazy: runs only for the reload check.
    else:
        merged = merged_arrays(merge_plan)
        write = functools.partial(checkpoint.save, params=merged)
        written = iter([merged])

    with checkpoint.staged_output(outcome.output, overwrite=settings.overwrite) as staging:
        params_dir = staging / checkpoint.PARAMS_KEY
        with stopwatch.phase("save"):
            write(params_dir, value_suffix=contents.value_suffix)
            if distributed.is_primary():
                checkpoint.copy_assets(source, staging)
        if settings.verify_reload:
            with stopwatch.phase("reload"):
                checkpoint.check_written(
                    params_dir, merge_plan.leaves_out, written, value_suffix=contents.value_suffix, layout=layout
                )
    rendered = summary.render(merge_plan, outcome.checks, outcome.output, stopwatch)
    return "\n".join([rendered, *(f"  {line}" for line in details)])


@contextlib.contextmanager
def _resolve_example(settings: config.Settings):
    """Writes the built-in example checkpoint when the input names one, and yields the settings to merge with."""
    if not settings.input.startswith(_EXAMPLE_PREFIX):
        yield settings
        return
    model = settings.input.removeprefix(_EXAMPLE_PREFIX)
    if model not in synthetic.MODELS:
        raise errors.ConfigError(f"input={settings.input!r}: built-in examples are {', '.join(synthetic.MODELS)}")
    with tempfile.TemporaryDirectory(prefix="openpi-merge-example-") as tmp:
        step_dir = synthetic.write_checkpoint(tmp, model=model, scale="tiny")
        print(f"openpi-merge: wrote a tiny synthetic {model} LoRA checkpoint to {step_dir}")
        yield config.Settings(**{**vars(settings), "input": str(step_dir)})


def _fail(error: errors.MergeError) -> None:
    print(f"openpi-merge: error: {error}", file=sys.stderr)
    sys.exit(error.exit_code)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config mistakes (bad file, unknown field, bad value) as one-line errors."""
    try:
        rest = flags.FLAGS(argv)
        if _CONFIG.value is None:
            raise errors.ConfigError("no config given: pass --config=configs/<name>.py")
        _ = _CONFIG.value.keys()  # A config file that fails to load raises only when first used.
    except errors.ConfigError as e:
        _fail(e)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        _fail(errors.ConfigError(str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__))
    return rest


def _drop_closed_loop_callbacks(unraisable) -> None:
    """Silences tensorstore callbacks that land on Orbax's already-closed event loop after a failed read.

    Newer Orbax releases read metadata on a short-lived asyncio loop; when a damaged checkpoint fails that read,
    pending tensorstore callbacks report "Event loop is closed" as unraisable errors, after the real error was handled.
    """
    if not (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)):
        sys.__unraisablehook__(unraisable)


def _stop_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # Unwinds like an error, so a staged output is removed.


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    sys.unraisablehook = _drop_closed_loop_callbacks
    # jax 0.5.3 (openpi's pin) loses buffer donation from executables it loads from the persistent compilation
    # cache on CPU: a cached fuse step then hands back a kernel in freed memory. Compiling afresh is safe.
    jax.config.update("jax_enable_compilation_cache", False)
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every step at INFO, and logs a failed background write (a bucket gone mid-save) with its traceback
        # at ERROR before re-raising it, which the one-line error then reports. --verbosity=0 brings both back.
        logging.set_verbosity(logging.FATAL)
    outcome, error = report.Outcome(), None
    try:
        settings = config.read_settings(_CONFIG.value)
        distributed.initialize(settings.distributed)
        with _resolve_example(settings) as settings:
            if settings.mode == "inspect":
                inspect(settings, outcome)
            else:
                text = merge(settings, outcome)
                if distributed.is_primary():
                    print(text)
    except KeyboardInterrupt:
        error = errors.InterruptError("interrupted: nothing was written")
    except errors.MergeError as e:
        error = e
    if _CONFIG.value.report and distributed.is_primary():
        exit_code = error.exit_code if error else 0
        report.write(
            _CONFIG.value.report, _CONFIG.value.to_dict(), outcome, exit_code=exit_code, error=error and str(error)
        )
    if error:
        _fail(error)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
