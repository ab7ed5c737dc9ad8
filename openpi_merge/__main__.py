"""openpi-merge: folds the LoRA adapters of an openpi fine-tune into its base weights.

  openpi-merge --config=pi0_lora --config.input=STEP_DIR --config.output=OUT_DIR
  (the same as python -m openpi_merge ...; --config also takes a path to a config file, as ml_collections does)

Reads the Orbax checkpoint, pairs every kernel with its LoRA factors, fuses ``W + s * dW(A, B)`` in float32 under
``jax.jit``, drops the LoRA leaves and writes a step dir that openpi serves under the base (non-LoRA) config. The merge
itself is ``pipeline``'s; this module owns the command line, signals and exit codes.
"""

import sys

from openpi_merge import signals

signals.install()  # First of all: a Ctrl-C during start-up ends the run with one line too (see signals).

import os
import pathlib

from openpi_merge import memory

for _name in ("stdout", "stderr"):  # Started with a stream closed (2>&-): write to nothing rather than fail.
    if getattr(sys, _name) is None:
        setattr(sys, _name, open(os.devnull, "w"))  # noqa: SIM115 (open for the life of the process)

if __name__ == "__main__" or pathlib.Path(sys.argv[0]).name == "openpi-merge":  # The program, not an import of it.
    with signals.held():  # A signal during the restart stays pending for the restarted program (see signals).
        if not signals.received():
            memory.restart_with_huge_pages()  # Restarts the process in place (see memory), or returns.
memory.limit_arenas()  # Before TensorStore and XLA start their threads.

import contextlib
import dataclasses
import difflib
import importlib.util
import shutil
import signal
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

from openpi_merge import __version__, compile_cache, config, distributed, errors, openpi_layout, pipeline, report

_CONFIG = config_flags.DEFINE_config_file("config", None, "Merge config: a shipped name (pi0_lora) or a file path.")
# `--config.input=example:<model>` merges a tiny synthetic checkpoint of that model, written next to the output.
_EXAMPLE_PREFIX = "example:"
_CONFIGS_DIR = pathlib.Path(__file__).resolve().parent / "configs"
_SHIPPED = tuple(sorted(p.stem for p in _CONFIGS_DIR.glob("*.py") if not p.name.startswith("_")))
_HELP_FLAGS = ("--help", "-h", "-?", "--helpfull", "--helpshort", "--helpxml")
_TRUE, _FALSE = ("true", "t", "1"), ("false", "f", "0")  # What absl accepts for a boolean, in any case.


@contextlib.contextmanager
def _resolve_example(settings: config.Settings):
    """Writes the built-in example checkpoint when the input names one, and yields the settings to merge with.

    The example's input is kept next to the output (``<output>.input/``), so the user can look at both.
    """
    if not settings.input.startswith(_EXAMPLE_PREFIX):
        yield settings
        return
    model = settings.input.removeprefix(_EXAMPLE_PREFIX)
    if model not in openpi_layout.MODELS:
        raise errors.ConfigError(f"input={settings.input!r}: built-in examples are {', '.join(openpi_layout.MODELS)}")
    from openpi_merge.testing import synthetic  # Test support: loaded only for the example, never by a real merge.

    with contextlib.ExitStack() as stack:
        if anchor := settings.output or next(iter(settings.exports.values()), ""):
            output = pathlib.Path(anchor).expanduser().resolve()
            directory, kept = output.with_name(f"{output.name}.input"), True
            if directory.exists():
                # Replaced only when it holds nothing but step dirs, as an earlier example run left it.
                if not settings.overwrite or not all(p.name.isdigit() for p in directory.iterdir()):
                    raise errors.OutputError(f"{directory} exists and is not an earlier example's input: remove it")
                shutil.rmtree(directory)
        else:
            directory = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="openpi-merge-example-")))
            kept = False
        step_dir = synthetic.write_checkpoint(directory, model=model, scale="tiny")
        where = "kept there to compare with the output" if kept else "a temporary dir, deleted at exit"
        print(f"openpi-merge: wrote a tiny synthetic {model} LoRA checkpoint to {step_dir} ({where})")
        yield dataclasses.replace(settings, input=str(step_dir))


def _fail(error: errors.MergeError) -> None:
    print(f"openpi-merge: error: {error}", file=sys.stderr)
    sys.exit(error.exit_code)


def usage() -> str:
    """``--help``: every config field with its default and meaning, from ``config.FIELDS`` (as the README table)."""
    lines = [
        "openpi-merge: folds the LoRA adapters of an openpi (pi0, pi0.5, pi0-FAST) fine-tune into its base weights.",
        "",
        "usage: openpi-merge --config=NAME --config.input=STEP_DIR --config.output=OUT_DIR [--config.FIELD=VALUE ...]",
        "       (or python -m openpi_merge ...)",
        "",
        f"configs shipped with openpi-merge, by name from any directory: {', '.join(_SHIPPED)}",
        "  (example[:pi0|pi05|pi0_fast] merges a tiny synthetic checkpoint); --config also takes a config file path.",
        "look before merging, nothing written: --config.mode=inspect",
        "",
        "fields (--config.FIELD=VALUE):",
    ]
    for field in config.FIELDS:
        lines.append(f"  {config.field_name(field.name)}  (default: {field.shown.replace('`', '')})")
        lines.append(f"      {field.meaning.replace('`', '')}")
    lines += ["", "exit codes:", "  0  merged; the output is complete"]
    codes = sorted({(c.exit_code, c.__doc__ or "") for c in _error_classes(errors.MergeError)})
    lines += [f"  {code}  {doc.splitlines()[0]}" for code, doc in codes if code != errors.MergeError.exit_code]
    return "\n".join(lines)


def _error_classes(base: type) -> list[type]:
    return [c for sub in base.__subclasses__() for c in (sub, *_error_classes(sub))]


def _config_path(spec: str) -> str:
    """A ``--config`` value as a file path: a shipped config's name, or a path (``configs/<name>.py`` of this repo
    resolves to the shipped config from any directory)."""
    path, colon, arg = spec.partition(":")
    if "/" not in path and not path.endswith(".py"):
        if path not in _SHIPPED:
            raise errors.ConfigError(f"--config={spec}: no shipped config {path!r}; shipped: {', '.join(_SHIPPED)}")
        return str(_CONFIGS_DIR / f"{path}.py") + colon + arg
    if pathlib.Path(path).expanduser().is_file():
        return spec
    candidate = pathlib.Path(path)
    if candidate.parent.name == "configs" and candidate.stem in _SHIPPED:
        return str(_CONFIGS_DIR / candidate.name) + colon + arg
    raise errors.ConfigError(
        f"--config={spec}: no such file {pathlib.Path(path).expanduser().resolve()}; "
        f"shipped configs go by name, e.g. --config={_SHIPPED[0]} ({', '.join(_SHIPPED)})"
    )


def _load_config(spec: str):
    """The ConfigDict a config file builds (ml_collections' ``get_config``, with the text after ``:`` if any)."""
    path, _, arg = spec.partition(":")
    try:
        module_spec = importlib.util.spec_from_file_location("openpi_merge_user_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # A config file is user code: any failure of it is a config error.
        raise errors.ConfigError(f"--config={spec}: cannot load it: {type(e).__name__}: {e}") from None


def _leaf_fields(cfg, prefix: str = "") -> dict[str, object]:
    fields = {}
    for key in cfg:
        value = cfg[key]
        if hasattr(value, "keys") and hasattr(value, "lock"):  # A nested ConfigDict.
            fields |= _leaf_fields(value, f"{prefix}{key}.")
        else:
            fields[f"{prefix}{key}"] = cfg.get_type(key) if hasattr(cfg, "get_type") else type(value)
    return fields


def _check_overrides(argv: list[str], spec: str) -> None:
    """Names the full field of an unknown override (with the closest one) and says what a boolean accepts."""
    fields = _leaf_fields(_load_config(spec))
    for arg in argv[1:]:
        if not arg.startswith("--config.") or "=" not in arg:
            continue
        name, _, value = arg.removeprefix("--config.").partition("=")
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f": did you mean --config.{close[0]}?" if close else "; --help lists every field"
            raise errors.ConfigError(f"--config.{name} is not a config field{hint}")
        if fields[name] is bool and value.lower() not in _TRUE + _FALSE:
            raise errors.ConfigError(f"--config.{name}={value}: a boolean takes True or False (or 1/0, t/f)")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with ``--help`` from the config fields and config mistakes as one-line errors."""
    if any(arg in _HELP_FLAGS for arg in argv[1:]):
        print(usage())
        sys.exit(0)
    if "--version" in argv[1:]:
        print(f"openpi-merge {__version__}")
        sys.exit(0)
    argv = list(argv)
    if not any(arg.startswith("--config=") for arg in argv[1:]):
        if "--config.mode=check" in argv[1:]:  # check reads no model field: any shipped config serves.
            argv.insert(1, f"--config={openpi_layout.MODEL_CONFIGS[openpi_layout.MODELS[0]]}")
        elif any(arg.startswith("--config.") for arg in argv[1:]):
            _fail(errors.ConfigError(f"no config given: pass --config=NAME ({', '.join(_SHIPPED)}) or a config file"))
    try:
        for i, arg in enumerate(argv):
            if arg.startswith("--config="):
                argv[i] = f"--config={_config_path(arg.removeprefix('--config='))}"
                _check_overrides(argv, argv[i].removeprefix("--config="))
        rest = flags.FLAGS(argv)
        if _CONFIG.value is None:
            raise errors.ConfigError(f"no config given: pass --config=NAME ({', '.join(_SHIPPED)}) or a config file")
        _ = _CONFIG.value.keys()  # A config file that fails to load raises only when first used.
    except errors.ConfigError as e:
        _fail(e)
    except flags.IllegalFlagValueError as e:
        _fail(errors.ConfigError(str(e).strip().removeprefix("flag ")))
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


def _run(settings: config.Settings, outcome: report.Outcome) -> str | None:
    """Runs the configured mode; returns what process 0 prints at the end."""
    if settings.mode == "inspect":
        pipeline.inspect(settings, outcome)
        return None
    if settings.mode == "check":
        return pipeline.check(settings, outcome, signals.stop)
    return pipeline.merge(settings, outcome, signals.stop)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    sys.unraisablehook = _drop_closed_loop_callbacks
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every step at INFO, and a failed background write (a full disk, a bucket gone mid-save) with its
        # traceback at ERROR before it re-raises it, which the one-line error then reports. --verbosity=0 shows all.
        logging.set_verbosity(logging.FATAL)
    outcome, error, text = report.Outcome(config=_CONFIG.value.to_dict()), None, None
    cfg = _CONFIG.value
    try:
        outputs = {f: cfg.get(f, "") for f in ("output", *config.EXPORT_FIELDS.values())} if cfg.mode == "merge" else {}
        pipeline.check_report_path(cfg.report, input_path=cfg.input, outputs=outputs)
    except errors.MergeError as e:  # No report is written where it would land.
        signals.hold()
        _fail(e)
    try:
        settings = config.read_settings(_CONFIG.value)  # Inside the try: a config error gets a report too.
        distributed.initialize(settings.distributed)
        # Before anything compiles; only a multi-process run compiles programs that donate their inputs.
        compile_cache.enable(_CONFIG.value.get("compilation_cache", ""), donates=not distributed.is_single_process())
        with _resolve_example(settings) as settings:
            text = _run(settings, outcome)
    except errors.MergeError as e:
        error = e
    except KeyboardInterrupt:  # A SIGINT raised by a library's own handler, not ours: treated the same.
        error = errors.InterruptError(signal.SIGINT, "interrupted by SIGINT: nothing was committed")
    if text and distributed.is_primary():
        print(text)
    if _CONFIG.value.report and distributed.is_primary() and not outcome.report_written:
        exit_code = error.exit_code if error else 0
        try:
            report.write(
                _CONFIG.value.report, _CONFIG.value.to_dict(), outcome, exit_code=exit_code, error=error and str(error)
            )
        except errors.MergeError as e:
            error = error or e
    signals.hold()  # From here the run's outcome is decided: a late signal must not kill the shutdown (see signals).
    if error:
        _fail(error)


def cli() -> None:
    """The ``openpi-merge`` console script."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    cli()
