"""User-facing errors: each one is printed as a single line and maps to a documented exit code."""

import errno
import signal


class MergeError(Exception):
    """An expected failure caused by the input, the config or the environment, not by a bug."""

    exit_code = 1


class ConfigError(MergeError):
    """The config is invalid: unknown variant, dtype or field, missing input/output."""

    exit_code = 2


class InputError(MergeError):
    """The input is missing, not an Orbax checkpoint, unfinished, or unreadable."""

    exit_code = 3


class PlanError(MergeError):
    """The checkpoint's LoRA leaves do not pair with their kernels as openpi lays them out."""

    exit_code = 4


class NumericsError(MergeError):
    """NaN or Inf, failed verification, or a checkpoint that does not match what was written (its manifest)."""

    exit_code = 5


class OutputError(MergeError):
    """The output cannot be written where asked: it exists, overlaps the input, or another run is writing it."""

    exit_code = 6


class EnvironmentFaultError(MergeError):
    """The machine refused: disk full, permission denied, read-only filesystem, busy mount point, and the like."""

    exit_code = 7


class InterruptError(MergeError):
    """The run was stopped by SIGINT (exit 130) or SIGTERM (exit 143) before it committed anything."""

    exit_code = 130  # SIGINT's; an instance takes its own signal's.

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
        self.signal_name = signal.Signals(signum).name


# What to do about an OSError, by errno: the second half of a one-line message that already names the path.
_FIXES = {
    errno.ENOSPC: "no space left on the device: free space there or write elsewhere",
    errno.EDQUOT: "disk quota exceeded: free space there or write elsewhere",
    errno.EACCES: "permission denied: pick a directory you can write, or fix its permissions",
    errno.EPERM: "operation not permitted: pick a directory you can write, or fix its permissions",
    errno.EROFS: "read-only filesystem: write the output to a writable one",
    errno.EBUSY: "busy (a mount point?): write into a directory inside it instead",
    errno.EXDEV: "on another filesystem than its parent (a mount point?): write into a directory inside it instead",
    errno.ENAMETOOLONG: "path too long: choose a shorter output path",
    errno.ELOOP: "too many levels of symbolic links: check the path",
    errno.EIO: "I/O error from the device: check the disk",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
}
_BY_TEXT = {  # TensorStore and some libraries report OS errors as text only.
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "Permission denied": errno.EACCES,
    "Read-only file system": errno.EROFS,
    "Device or resource busy": errno.EBUSY,
    "Invalid cross-device link": errno.EXDEV,
}


def os_errno(error: BaseException) -> int | None:
    """The errno behind ``error`` or any exception it was raised from, read from the text where no errno is set."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _FIXES:
            return error.errno
        for text, code in _BY_TEXT.items():
            if text in str(error):
                return code
        error = error.__cause__ or error.__context__
    return None


def environment_fault(error: BaseException, path: object, doing: str) -> EnvironmentFaultError | None:
    """``error`` as one line naming ``path`` and the fix, if it is an environment fault we recognise; else None."""
    code = os_errno(error)
    if code is None:
        return None
    return EnvironmentFaultError(f"{doing} {path}: {_FIXES[code]}")


def os_fault(error: OSError, path: object, doing: str) -> EnvironmentFaultError:
    """An OSError as one line naming ``path``, with the fix where its errno is one we know."""
    return environment_fault(error, path, doing) or EnvironmentFaultError(f"{doing} {path}: {error.strerror or error}")
