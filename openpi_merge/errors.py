"""User-facing errors: each one is printed as a single line and maps to a documented exit code."""


class MergeError(Exception):
    """An expected failure caused by the input, the config or the environment, not by a bug."""

    exit_code = 1


class ConfigError(MergeError):
    """The config is invalid: unknown variant, dtype or field, missing input/output."""

    exit_code = 2


class InputError(MergeError):
    """The input is missing, not an Orbax checkpoint, or unreadable."""

    exit_code = 3


class PlanError(MergeError):
    """The checkpoint's LoRA leaves do not pair with their kernels as openpi lays them out."""

    exit_code = 4


class NumericsError(MergeError):
    """The merge produced non-finite values or failed verification."""

    exit_code = 5


class OutputError(MergeError):
    """The output cannot be written where asked: it exists, or it lies inside the input."""

    exit_code = 6


class InterruptError(MergeError):
    """The run was stopped by Ctrl-C; as with every error, no output was committed."""

    exit_code = 130
