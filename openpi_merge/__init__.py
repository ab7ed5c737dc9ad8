"""openpi-merge: fold the LoRA adapters of an openpi (pi0, pi0.5, pi0-FAST) fine-tune into its base weights."""

# ``_signal`` and ``sys`` are built into the interpreter: importing them runs no Python code, so the early handler
# below is in place a few bytecodes after the package starts (``signal`` itself builds its enums first, ~1 ms in which
# a Ctrl-C would still be a KeyboardInterrupt traceback).
import _signal
import sys as _sys

__version__ = "0.1.0"

# Signals that came before ``signals.install`` took over (see there), in the program only.
early_signals: list[int] = []


def _started_as_program() -> bool:
    """Whether this import is the start of the program (``python -m openpi_merge``, the ``openpi-merge`` script)
    rather than a library's or a test's import of the package."""
    argv = getattr(_sys, "orig_argv", [])
    as_module = _sys.argv[:1] == ["-m"] and "-m" in argv and argv[argv.index("-m") + 1 :][:1] == ["openpi_merge"]
    return as_module or _sys.argv[0].rsplit("/", 1)[-1] == "openpi-merge"


if _started_as_program():
    # First of all, with nothing imported: Python imports and compiles __main__ after this, and a Ctrl-C meanwhile
    # would be a KeyboardInterrupt traceback. ``signals.install`` takes over what arrives here. A signal ignored when
    # the program started (SIGINT of a background job that a script started: the shell's choice) stays ignored.
    for _signum in (_signal.SIGINT, _signal.SIGTERM):
        if _signal.getsignal(_signum) != _signal.SIG_IGN:
            _signal.signal(_signum, lambda signum, frame: early_signals.append(signum))
