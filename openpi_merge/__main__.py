"""openpi-merge: folds the LoRA adapters of an openpi fine-tune into its base weights.

  python -m openpi_merge --config=configs/pi0_lora.py --config.input=STEP_DIR --config.output=OUT_DIR

Reads the Orbax checkpoint, pairs every kernel with its LoRA factors, fuses ``W + s * dW(A, B)`` in float32 under
``jax.jit``, drops the LoRA leaves and writes a step dir that openpi serves under the base (non-LoRA) config.
"""

import contextlib
import signal
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

from openpi_merge import checkpoint, config, errors, fuse, plan, summary, synthetic

_CONFIG = config_flags.DEFINE_config_file("config", None, "Merge config file, e.g. configs/pi0_lora.py.")
# `--config.input=example:<model>` merges a tiny synthetic checkpoint of that model, written to a temporary dir.
_EXAMPLE_PREFIX = "example:"


def merge(settings: config.Settings) -> str:
    """Runs one merge and returns its summary: plan -> restore -> fuse -> save."""
    stopwatch = summary.Stopwatch()
    with stopwatch.phase("plan"):
        source = checkpoint.locate_input(settings.input)
        target = checkpoint.check_output(settings.output, source, overwrite=settings.overwrite)
        contents = checkpoint.read_contents(source.params_dir)
        merge_plan = plan.make_plan(contents.leaves, settings)
    with stopwatch.phase("restore"):
        params = checkpoint.restore(source.params_dir, contents)
    with stopwatch.phase("fuse"):
        merged = fuse.fuse_all(merge_plan, params)
    with stopwatch.phase("save"), checkpoint.staged_output(target) as staging:
        checkpoint.save(staging / checkpoint.PARAMS_KEY, merged, value_suffix=contents.value_suffix)
        checkpoint.copy_assets(source, staging)
    return summary.render(merge_plan, target, stopwatch)


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
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # Orbax logs every step at INFO; --verbosity=0 brings that back.
    try:
        with _resolve_example(config.read_settings(_CONFIG.value)) as settings:
            print(merge(settings))
    except errors.MergeError as e:
        _fail(e)
    except KeyboardInterrupt:
        _fail(errors.InterruptError("interrupted: nothing was written"))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
