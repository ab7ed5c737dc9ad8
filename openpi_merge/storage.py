"""Where a checkpoint lives: a local directory, or a prefix in object storage (``gs://bucket/path``, ``s3://...``).

Local paths stay ``pathlib.Path``s, resolved as before. A path with a scheme becomes an ``etils.epath.Path``, the type
Orbax takes: Orbax reads and writes the arrays there itself (tensorstore's ``gcs`` kvstore), nothing is copied to local
disk. What Orbax does not do is done here, through fsspec (the layer under epath: gcsfs for ``gs://``): listing a
prefix, copying ``assets/`` object by object, removing a prefix (the one change Orbax's save needs on object storage
is ``objectstore_commit.DeferredCommit``). gcsfs is an optional dependency (``pip install openpi-merge[gcs]``);
tested schemes: ``gs://`` only.

Object storage has no directories: a "dir" exists once an object exists under its prefix, listings can be cached by
the client (every listing here drops the cache first), and nothing can be renamed atomically (see
``objectstore_commit`` for the commit protocol built on that).
"""

import pathlib
import posixpath
from typing import TypeAlias

import fsspec  # Installed with Orbax (etils[epath]); gcsfs plugs into it for gs://.
from etils import epath

from openpi_merge import errors

# A local dir, or an object-storage prefix. Both have ``/``, ``name``, ``parent``, ``exists``, ``is_dir``, ``iterdir``.
AnyPath: TypeAlias = pathlib.Path | epath.Path
# Orbax's own marker of a finished checkpoint on object storage (orbax.checkpoint's COMMIT_SUCCESS_FILE).
COMMIT_FILE = "commit_success.txt"


def is_remote(path: str | AnyPath) -> bool:
    """Whether ``path`` names object storage (has a ``scheme://``)."""
    return "://" in str(path)


def resolve(path: str) -> AnyPath:
    """A local path made absolute, or an object-storage path without a trailing ``/``."""
    if is_remote(path):
        scheme, _, rest = path.partition("://")
        return epath.Path(f"{scheme}://{rest.rstrip('/')}")
    return pathlib.Path(path).expanduser().resolve()


def bucket(path: AnyPath) -> str:
    """``gs://bucket`` of ``gs://bucket/a/b``."""
    scheme, _, rest = str(path).partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _filesystem(path: AnyPath):
    """The fsspec filesystem for ``path`` (gcsfs for gs://) and the path as it names it; its listing cache dropped."""
    try:
        fs, root = fsspec.core.url_to_fs(str(path))
    except (ImportError, ValueError) as e:  # gcsfs (s3fs, ...) missing: fsspec says which package to install.
        raise errors.ConfigError(f"{path}: {e} (for gs://: pip install 'openpi-merge[gcs]')") from e
    fs.invalidate_cache()
    return fs, root


_DENIED = ("Forbidden", "PERMISSION_DENIED", "403", "Access denied", "AccessDenied")


def reason(error: BaseException) -> str:
    """The first line of an error from a storage client, short enough for a one-line message; a refused permission
    (gcsfs: "Forbidden", tensorstore: PERMISSION_DENIED) says where credentials come from."""
    text = str(error).strip()
    line = (text.splitlines()[0] if text else type(error).__name__)[:300]
    if isinstance(error, PermissionError) or any(word in line for word in _DENIED):
        return (
            f"permission denied ({line}): check the credentials (GOOGLE_APPLICATION_CREDENTIALS, or "
            "`gcloud auth application-default login`, or the VM's service account)"
        )
    return line


def bucket_exists(path: AnyPath) -> bool:
    fs, _ = _filesystem(path)
    return fs.exists(bucket(path).partition("://")[2])


def objects(prefix: AnyPath) -> list[str]:
    """Every object under ``prefix``, as names relative to it, sorted; [] if there is none."""
    fs, root = _filesystem(prefix)
    root = root.rstrip("/")
    return sorted(posixpath.relpath(name, root) for name in fs.find(root) if name.startswith(root + "/"))


def remove(prefix: AnyPath, names: list[str] | None = None) -> None:
    """Deletes ``names`` under ``prefix`` (default: every object under it)."""
    fs, root = _filesystem(prefix)
    names = objects(prefix) if names is None else names
    if names:
        fs.rm([f"{root.rstrip('/')}/{name}" for name in names])


def copy_objects(source: AnyPath, target: AnyPath, names: list[str]) -> None:
    """Copies ``names`` from one prefix to another in the same store, server side (no bytes pass through here)."""
    fs, source_root = _filesystem(source)
    _, target_root = _filesystem(target)
    for name in names:
        fs.copy(f"{source_root}/{name}", f"{target_root}/{name}")


def files(root: AnyPath) -> list[str]:
    """Every file under ``root``, as sorted names relative to it; [] if there is none."""
    if is_remote(root):
        return objects(root)
    # epath's rglob refuses to walk a bucket (it would cost a request per dir on GCS); locally pathlib's does it.
    return sorted(p.relative_to(root).as_posix() for p in pathlib.Path(root).rglob("*") if p.is_file())


def copy_tree(source: AnyPath, target: AnyPath) -> None:
    """Copies every file under ``source`` to the same relative path under ``target``, object by object.

    Either side may be local or remote; the files are small (``assets/``: norm stats), so bytes pass through here.
    """
    for name in files(source):
        destination = epath.Path(target) / name
        if not is_remote(destination):
            destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes((epath.Path(source) / name).read_bytes())


def write_marker(prefix: AnyPath) -> None:
    """Writes Orbax's commit marker into ``prefix``, with the text Orbax writes."""
    (epath.Path(prefix) / COMMIT_FILE).write_text(f"Checkpoint commit was successful to {prefix}")
