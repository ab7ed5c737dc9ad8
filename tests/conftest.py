"""Shared fixtures: small openpi-shaped LoRA checkpoints written by Orbax, real mounts (tmpfs, bind), and a GCS
emulator on 127.0.0.1."""

import fcntl
import os
import pathlib
import shutil
import signal
import subprocess

import pytest
from etils import epath

from openpi_merge import storage
from openpi_merge.testing import synthetic

# A suite started in the background by a script (scripts/test.sh runs both stacks at once) inherits SIGINT ignored,
# as the shell sets it for background jobs, and so would every merge it starts, which keeps it ignored: the signal
# tests start their merges with the disposition a user's interactive shell gives.
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _suite_lock(request):
    """scripts/test.sh runs the two stacks' suites at once, each told the same lock file (OPENPI_MERGE_SUITE_LOCK):
    every test holds it shared, and one marked ``alone`` (it measures memory or races signals against a start-up)
    exclusively, so that it runs while the other stack runs nothing. Without the variable: no lock."""
    path = os.environ.get("OPENPI_MERGE_SUITE_LOCK")
    if not path:
        yield
        return
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if request.node.get_closest_marker("alone") else fcntl.LOCK_SH)
        yield


@pytest.fixture(scope="session", autouse=True)
def _user_cache_of_the_session(tmp_path_factory):
    """The merges the tests start cache compiled programs in a dir of the session's, not in the user's cache
    (compile_cache: ``$XDG_CACHE_HOME/openpi-merge/jax``); tests of the cache set their own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Returns a function (model, value_suffix=True, **kw) -> step dir of a tiny synthetic LoRA checkpoint.

    Checkpoints are written once per session and shared: tests must not modify them (merges must not either, which
    the end-to-end tests check by hashing).
    """
    cache = {}

    def make(model: str, value_suffix: bool = True, **kwargs) -> pathlib.Path:
        key = (model, value_suffix, tuple(sorted(kwargs.items())))
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"{model}-{'value' if value_suffix else 'plain'}")
            cache[key] = synthetic.write_checkpoint(directory, model=model, value_suffix=value_suffix, **kwargs)
        return cache[key]

    return make


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def _mount_points_under(root: pathlib.Path) -> list[str]:
    """Mount points at or below ``root`` as the kernel lists them now (a mount moves with a renamed dir)."""
    points = [line.split()[4] for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines()]
    return [p for p in points if p == str(root) or p.startswith(f"{root}/")]


@pytest.fixture
def mounts(tmp_path):
    """Mounts for one test, unmounted afterwards wherever the test's runs moved them; skips where this process cannot
    mount."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) for a real tmpfs or bind mount")
    mounted = []

    def mount(*args: str) -> None:
        try:
            _mount(*args)
        except subprocess.CalledProcessError as e:
            pytest.skip(f"mount {' '.join(args)} failed here: {e.stderr.strip()}")
        mounted.append(args[-1])

    yield mount
    for point in [*reversed(mounted), *reversed(_mount_points_under(tmp_path))]:
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


GCS_BUCKET = "openpi-merge-test"


@pytest.fixture(scope="session")
def gcs():
    """One fake-gcs-server (in memory) for the session, with bucket ``GCS_BUCKET``; yields the emulator.

    Its environment variables are set in this process (and so in every CLI subprocess) before any client is used:
    gcsfs and tensorstore keep the first endpoint they see, so there is one emulator per session.
    """
    import gcs_emulator  # Only the gs:// tests need the test extra's emulator wrapper.

    emulator = gcs_emulator.start()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in gcs_emulator.environment(emulator.url).items():
            patch.setenv(name, value)
        emulator.create_bucket(GCS_BUCKET)
        yield emulator
    emulator.kill()


@pytest.fixture(scope="session")
def gcs_checkpoint(gcs, tiny_checkpoint):
    """Returns a function (model) -> gs:// step prefix holding the tiny checkpoint, as Orbax writes one on GCS.

    The local checkpoint is copied object by object, with Orbax's commit markers (step and params) added last, as
    orbax-checkpoint >= 0.11.14 leaves a step saved to gs:// (0.11.13 cannot save there at all).
    """
    cache = {}

    def make(model: str) -> epath.Path:
        if model not in cache:
            local = tiny_checkpoint(model)
            prefix = epath.Path(f"gs://{GCS_BUCKET}/inputs/{model}/{local.name}")
            storage.copy_tree(local, prefix)
            storage.write_marker(prefix / "params")
            storage.write_marker(prefix)
            cache[model] = prefix
        return cache[model]

    return make
