"""openpi-merge: folds the LoRA adapters of an openpi fine-tune into its base weights.

  python -m openpi_merge --config=configs/pi0_lora.py --config.input=STEP_DIR --config.output=OUT_DIR

Reads the Orbax checkpoint, pairs every kernel with its LoRA factors, fuses ``W + s * dW(A, B)`` in float32 under
``jax.jit``, drops the LoRA leaves and writes a step dir that openpi serves under the base (non-LoRA) config. The merge
itself is ``pipeline``'s; this module owns the command line, signals and exit codes.
"""

from openpi_merge import signals

signals.install()  # Before the heavy imports below: a Ctrl-C during start-up ends the run with one line too.

import contextlib
import signal
import sys
import tempfile

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from openpi_merge import config, distributed, errors, pipeline, report

_CONFIG = config_flags.DEFINE_config_file("config", None, "Merge config file, e.g. configs/pi0_lora.py.")
# `--config.input=example:<model>` merges a tiny synthetic checkpoint of that model, written to a temporary dir.
_EXAMPLE_PREFIX = "example:"


@contextlib.contextmanager
def _resolve_example(settings: config.Settings):
    """Writes the built-in example checkpoint when the input names one, and yields the settings to merge with."""
    if not settings.input.startswith(_EXAMPLE_PREFIX):
        yield settings
        return
    from openpi_merge import synthetic  # Test support: only the built-in example needs it.

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


def _run(settings: config.Settings, outcome: report.Outcome, stop) -> str | None:
    """Runs the configured mode; returns what process 0 prints at the end."""
    if settings.mode == "inspect":
        pipeline.inspect(settings, outcome)
        return None
    if settings.mode == "check":
        return pipeline.check(settings, outcome, stop)
    return pipeline.merge(settings, outcome, stop)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    sys.unraisablehook = _drop_closed_loop_callbacks
    # jax 0.5.3 (openpi's pin) loses buffer donation from executables it loads from the persistent compilation
    # cache on CPU: a cached fuse step then hands back a kernel in freed memory. Compiling afresh is safe.
    jax.config.update("jax_enable_compilation_cache", False)
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # Orbax logs every step at INFO; --verbosity=0 brings that back.
    outcome, error, text = report.Outcome(), None, None
    try:
        settings = config.read_settings(_CONFIG.value)
        distributed.initialize(settings.distributed)
        with _resolve_example(settings) as settings:
            text = _run(settings, outcome, signals.stop)
    except errors.MergeError as e:
        error = e
    except KeyboardInterrupt:  # A SIGINT raised by a library's own handler, not ours: treat it the same.
        error = errors.InterruptError(signal.SIGINT, "interrupted by SIGINT: nothing was committed")
    if text and distributed.is_primary():
        print(text)
    if _CONFIG.value.report and distributed.is_primary():
        exit_code = error.exit_code if error else 0
        try:
            report.write(
                _CONFIG.value.report, _CONFIG.value.to_dict(), outcome, exit_code=exit_code, error=error and str(error)
            )
        except errors.MergeError as e:
            error = error or e
    if error:
        _fail(error)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
