"""What a run did, collected as it goes, and written as JSON for batch jobs (``--config.report=PATH.json``)."""

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import pathlib
import platform

import jax

from openpi_merge import errors, fuse, plan, provenance, storage, summary

_PACKAGES = ("openpi-merge", "jax", "jaxlib", "flax", "orbax-checkpoint", "tensorstore", "numpy", "ml_dtypes")


@dataclasses.dataclass
class Outcome:
    """Filled in by the run as it progresses, so a failed run reports how far it got."""

    stopwatch: summary.Stopwatch = dataclasses.field(default_factory=summary.Stopwatch)
    merge_plan: plan.Plan | None = None
    checks: list[fuse.Check] = dataclasses.field(default_factory=list)
    output: pathlib.Path | None = None
    devices: str | None = None  # Where the arrays lived: one device, or a mesh over every process's devices.
    details: list[str] = dataclasses.field(default_factory=list)  # Summary lines beyond the table: devices, notes.
    provenance: dict = dataclasses.field(default_factory=dict)  # Written into the output step dir, once written.
    config: dict = dataclasses.field(default_factory=dict)  # The config as given, for the report.
    report_written: bool = False  # The run published its report itself (a merge, right after its commit).
    exports: list[dict] = dataclasses.field(default_factory=list)  # Each export written: files, dtype, proof.


def _leaf(leaf: plan.Leaf) -> dict:
    return {"path": leaf.name, "shape": list(leaf.shape), "dtype": leaf.dtype.name}


def _check(check: fuse.Check | None) -> dict | None:
    if check is None:
        return None
    return {
        "relative_error": check.relative_error,
        "bound_ratio": check.bound_ratio,
        "changed_fraction": check.changed_fraction,
        "rounding_loss": check.rounding_loss,
    }


def _pair(pair: plan.Pair, check: fuse.Check | None) -> dict:
    return {
        "kernel": pair.kernel.name,
        "module": pair.kind.name,
        "expert": pair.expert,
        "shapes": {
            "kernel": list(pair.kernel.shape),
            "lora_a": list(pair.lora_a.shape),
            "lora_b": list(pair.lora_b.shape),
        },
        "rank": pair.rank,
        "alpha": pair.alpha,
        "scale": pair.scale,
        "dtype": {"in": pair.kernel.dtype.name, "out": pair.out_dtype.name},
        "check": _check(
            check
        ),  # Verification (None when off) and what rounding to the output dtype left of the update.
    }


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def render(config: dict, outcome: Outcome, *, exit_code: int, error: str | None) -> str:
    """The report as JSON text; any part of ``outcome`` may still be unset."""
    merge_plan = outcome.merge_plan
    checks = {check.pair.kernel.path: check for check in outcome.checks}
    document = {
        "status": "ok" if exit_code == 0 else "error",
        "exit_code": exit_code,
        "error": error,
        "config": config,
        "output": str(outcome.output) if outcome.output else None,
        "plan": None
        if merge_plan is None
        else {
            "pairs": [_pair(p, checks.get(p.kernel.path)) for p in merge_plan.pairs],
            "settings": provenance.experts(merge_plan),
            "kept": [_leaf(leaf) for leaf in merge_plan.kept],
            "problems": list(merge_plan.problems),
            "notes": list(merge_plan.notes),
            "leaves": {"in": len(merge_plan.leaves_in), "out": len(merge_plan.leaves_out)},
            "bytes": {
                "in": sum(leaf.nbytes for leaf in merge_plan.leaves_in),
                "out": sum(leaf.nbytes for leaf in merge_plan.leaves_out),
            },
        },
        "verification": fuse.worst_by_kind(outcome.checks),  # Worst per expert and module kind.
        "exports": outcome.exports,
        "provenance": outcome.provenance,
        "seconds": outcome.stopwatch.seconds,
        "backend": jax.default_backend(),
        "devices": outcome.devices,
        "versions": _versions(),
    }
    return json.dumps(document, indent=2) + "\n"


@dataclasses.dataclass
class Staged:
    """A report written before the commit it reports, in these states:

    - staged: a local report is complete in a hidden file beside its path (a full disk fails here, before the
      commit, so a run never commits and then fails on its report); a bucket report waits in memory.
    - published (``publish``, after the commit): the file takes its name (a bucket object is written whole).
    - discarded (``discard``, the commit failed): the hidden file is removed; the run writes an error report instead.
    """

    path: str
    text: str
    partial: pathlib.Path | None  # None for a bucket report.

    def publish(self, target: object) -> None:
        """Raises EnvironmentFaultError, saying the output is complete, if the report cannot take its place."""
        try:
            if self.partial is None:
                storage.resolve(self.path).write_text(self.text)
            else:
                os.replace(self.partial, pathlib.Path(self.path).expanduser().resolve())
        except Exception as e:  # gcsfs and the HTTP layers under it raise many types; a local rename an OSError.
            raise errors.EnvironmentFaultError(
                f"the output {target} is complete (committed), but the report {self.path} could not be written: "
                f"{storage.reason(e)}"
            ) from e
        self.partial = None

    def discard(self) -> None:
        if self.partial is not None:
            with contextlib.suppress(OSError):
                self.partial.unlink(missing_ok=True)


def _partial(target: pathlib.Path) -> pathlib.Path:
    return target.with_name(f".{target.name}.tmp")


def _write_partial(path: str, text: str) -> pathlib.Path:
    """Writes ``text`` to the hidden file beside the local report ``path``, flushed to disk; returns it. Raises
    EnvironmentFaultError (and leaves no hidden file) if the filesystem refuses."""
    target = pathlib.Path(path).expanduser().resolve()
    partial = _partial(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with partial.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise errors.os_fault(e, target, "cannot write the report") from e
    return partial


def stage(settings, outcome: Outcome) -> Staged | None:
    """Stages the success report of the run (``Staged``); None without ``report``. Raises EnvironmentFaultError if a
    local report cannot be written."""
    if not settings.report:
        return None
    text = render(outcome.config, outcome, exit_code=0, error=None)
    if storage.is_remote(settings.report):
        return Staged(settings.report, text, None)
    return Staged(settings.report, text, _write_partial(settings.report, text))


def write(path: str, config: dict, outcome: Outcome, *, exit_code: int, error: str | None) -> None:
    """Writes the report atomically (a reader never sees half a file); any part of ``outcome`` may still be unset.

    Raises EnvironmentFaultError if the file cannot be written.
    """
    text = render(config, outcome, exit_code=exit_code, error=error)
    if storage.is_remote(path):
        try:
            storage.resolve(path).write_text(text)  # An object appears whole or not at all.
        except Exception as e:  # gcsfs and the HTTP layers under it raise many types.
            raise errors.EnvironmentFaultError(f"cannot write the report {path}: {storage.reason(e)}") from e
        return
    staged = Staged(path, text, _write_partial(path, text))
    try:
        os.replace(staged.partial, pathlib.Path(path).expanduser().resolve())
    except OSError as e:
        staged.discard()
        raise errors.os_fault(e, pathlib.Path(path).expanduser().resolve(), "cannot write the report") from e
