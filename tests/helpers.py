"""Ways to run a merge as a user would and to read what it wrote."""

import contextlib
import dataclasses
import hashlib
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from flax import traverse_util

from openpi_merge import checkpoint, lerobot_export, reader
from openpi_merge.testing import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
# What a merged step dir holds: openpi's two parts, the provenance and the integrity manifest.
STEP_DIR_NAMES = ["assets", "openpi_merge.json", "openpi_merge_manifest.json", "params"]


def _env(hook: str | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OPENPI_MERGE_TEST_HOOK", None)
    if hook:
        env["OPENPI_MERGE_TEST_HOOK"] = hook  # See openpi_merge.commit.test_point.
    return env


def cli_command(model: str, source: object, out: object, *overrides: str) -> list[str]:
    """The command line of a merge of ``source`` into ``out`` with the repo's config for ``model``."""
    args = (f"--config=configs/{model}_lora.py", f"--config.input={source}", f"--config.output={out}")
    return [sys.executable, "-m", "openpi_merge", *args, *overrides]


def merge_args(step: object, out: object, *overrides: str, model: str = "pi0") -> list[str]:
    """The arguments of a merge of ``step`` into ``out`` with the repo's config for ``model``."""
    return [f"--config=configs/{model}_lora.py", f"--config.input={step}", f"--config.output={out}", *overrides]


def merge(step: object, out: object, *overrides: str, model: str = "pi0", hook: str | None = None):
    """Runs a merge as a user would (``run_cli``); the CompletedProcess, whatever its exit code."""
    return run_cli(*merge_args(step, out, *overrides, model=model), hook=hook)


def merge_ok(step: object, out: object, *overrides: str, model: str = "pi0") -> subprocess.CompletedProcess:
    """``merge``, which must succeed."""
    result = merge(step, out, *overrides, model=model)
    assert result.returncode == 0, result.stderr
    return result


def start_merge(step: object, out: object, *overrides: str, model: str = "pi0", hook: str | None = None, **kw):
    """Starts a merge without waiting for it (``start_cli``)."""
    return start_cli(*merge_args(step, out, *overrides, model=model), hook=hook, **kw)


def run_cli(*args: str, cwd: pathlib.Path = REPO, hook: str | None = None) -> subprocess.CompletedProcess:
    """Runs ``python -m openpi_merge`` as a user would, from the repo root; ``hook``: a test hook to set."""
    return subprocess.run(
        [sys.executable, "-m", "openpi_merge", *args],
        cwd=cwd,
        env=_env(hook),
        capture_output=True,
        text=True,
        timeout=600,
    )


def start_cli(*args: str, hook: str | None = None, ignoring_sigint: bool = False) -> subprocess.Popen:
    """Starts ``python -m openpi_merge`` without waiting for it; ``communicate()`` gives (stdout, stderr).
    ``ignoring_sigint``: started with SIGINT ignored, as a shell starts a background job (through ``sh``, which
    ``exec``s it: no Python runs in a forked child of this multithreaded process)."""
    command = [sys.executable, "-m", "openpi_merge", *args]
    if ignoring_sigint:
        command = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *command]
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=_env(hook),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: pathlib.Path, process: subprocess.Popen | None = None, timeout: float = 300) -> None:
    """Waits until ``path`` exists; fails if ``process`` ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended before {path.name} appeared: {process.communicate()}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def error_line(returncode: int, stderr: str, want_code: int, message: str) -> str:
    """Asserts a clean failure: the exit code, no traceback, exactly one error line holding ``message``."""
    assert returncode == want_code, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("openpi-merge: error:")]
    assert len(lines) == 1, stderr
    assert message in lines[0], lines[0]
    return lines[0]


def tree_hashes(root: pathlib.Path) -> dict[str, str]:
    """sha256 of every file under root (hidden ones too), a marker per dir and the target of each link, by path."""

    def entry(p: pathlib.Path) -> str:
        if p.is_symlink():
            return f"link to {os.readlink(p)}"
        return "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()

    return {str(p.relative_to(root)): entry(p) for p in sorted(root.rglob("*"))}


def stored_paths(params_dir: pathlib.Path) -> list[tuple[str, ...]]:
    """Every parameter's full key path as stored, 'params' prefix and any 'value' suffix included."""
    with ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(params_dir)
    return list(traverse_util.flatten_dict(dict(getattr(metadata, "item_metadata", metadata))))


def restore_flat(params_dir: pathlib.Path) -> dict[tuple[str, ...], np.ndarray]:
    """Restores params the way openpi's ``model.restore_params`` does, as numpy, keyed by path without 'value'."""
    with ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(params_dir)
        metadata = getattr(metadata, "item_metadata", metadata)  # orbax-checkpoint 0.11 returns the tree itself.
        item = {"params": metadata["params"]}
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(restore_type=np.ndarray), item)
        params = checkpointer.restore(params_dir, ocp.args.PyTreeRestore(item=item, restore_args=restore_args))[
            "params"
        ]
    flat = traverse_util.flatten_dict(params)
    if all(path[-1] == "value" for path in flat):
        flat = {path[:-1]: v for path, v in flat.items()}
    return flat


def stored_array(params_dir: pathlib.Path, path: tuple[str, ...]) -> ts.TensorStore:
    """Parameter ``path`` (no 'params' prefix, no 'value' suffix) opened as the merge's reader opens it, for its
    stored chunks."""
    contents = checkpoint.read_contents(params_dir)
    return reader.open_inputs(params_dir, [contents.leaves[path]], value_suffix=contents.value_suffix).stores[path]


def stored_chunks(store: ts.TensorStore) -> dict[bytes, bytes]:
    """An array's stored chunk keys and their bytes, as its database holds them (zarr metadata left out)."""
    kv = store.kvstore
    keys = [k for k in kv.list().result() if k.rsplit(b"/", 1)[-1] not in (b".zarray", b"zarr.json")]
    return {k: kv.read(k).result().value for k in keys}


def file_hashes(root: pathlib.Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def write_params(params_dir: pathlib.Path, flat: dict[tuple[str, ...], np.ndarray], value_suffix: bool = True) -> None:
    """Writes a hand-made params checkpoint in openpi's layout (single top-level 'params' key)."""
    suffix = ("value",) if value_suffix else ()
    tree = traverse_util.unflatten_dict({path + suffix: v for path, v in flat.items()})
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(params_dir, {"params": tree})


def gemma_fields(g: synthetic.GemmaDims) -> dict:
    """A synthetic Gemma's dims as LeRobot's and transformers' Gemma configs name them (no LoRA rank)."""
    return {f.name: getattr(g, f.name) for f in dataclasses.fields(g) if f.name != "rank"}


@contextlib.contextmanager
def lerobot_sized_like(dims: synthetic.ModelDims):
    """lerobot_export's tables of LeRobot's Gemma variants and SigLIP set to ``dims``, in this process (LeRobot
    builds only full-size ones; the names stay, as LeRobot's config accepts only gemma_2b and gemma_300m)."""

    with pytest.MonkeyPatch.context() as patch:
        variants = {"gemma_2b": gemma_fields(dims.paligemma), "gemma_300m": gemma_fields(dims.action_expert)}
        patch.setattr(lerobot_export, "GEMMA_VARIANTS", variants)
        s = dims.siglip
        patch.setattr(lerobot_export, "SIGLIP", {"width": s.width, "depth": s.depth, "mlp_dim": s.mlp_dim})
        yield
