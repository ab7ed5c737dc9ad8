"""The integrity manifest of a merged step dir, and the check that a copy still matches it (``--config.mode=check``).

Orbax's format carries no checksums: a flipped byte in an array chunk reads back as a wrong weight, silently. So every
step dir openpi-merge writes carries ``openpi_merge_manifest.json`` beside ``params/`` and ``assets/`` (openpi's
loader reads only those two, so serving and conversion ignore it)::

    {"format": "openpi-merge-manifest/1", "value_suffix": true,
     "params": {"PaliGemma/llm/layers/attn/q_einsum/w": {"shape": [...], "dtype": "bfloat16", "sha256": "..."}, ...},
     "assets": {"<asset_id>/norm_stats.json": {"bytes": 1234, "sha256": "..."}, ...}}

A parameter's ``sha256`` is that of its array's bytes in C order, as ``numpy.ndarray.tobytes()`` gives them, of the
array as it was handed to Orbax to write: whoever restores the checkpoint can recompute it with numpy and hashlib.
The digests are computed while the output is written, and the same pass checks that kept float leaves hold no NaN or
Inf (merged kernels are checked by the fuse). ``check`` re-reads a step dir, a group of leaves at a time, and
compares the tree, every digest and every asset; it raises NumericsError naming the first parameter or file that
differs, InputError if there is no readable manifest.

This protects what openpi-merge writes, from the moment it is written: it cannot vouch for an input, whose format
has nothing to compare against.
"""

import concurrent.futures
import hashlib
import json
import pathlib
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from openpi_merge import checkpoint, errors, openpi_layout, plan, sharding, storage

FILENAME = openpi_layout.MANIFEST_FILE
FORMAT = "openpi-merge-manifest/1"
# The manifest of an export dir (``export``): every file's bytes and sha256, nothing that needs Orbax to check.
FILES_FORMAT = "openpi-merge-files/1"
_CHUNK_BYTES = 64 * 2**20  # Hashed and checked a chunk at a time: the finiteness test needs a bool per element.


def _host(array: jax.Array | np.ndarray) -> np.ndarray:
    """The whole array on this host (a view of a CPU array); arrays split across processes are read back instead
    (see ``digest_params``)."""
    return np.ascontiguousarray(np.asarray(array))


# IEEE binary formats by their bits: an element is NaN or Inf exactly when its bits, sign cleared, are at least the
# infinity's (exponent all ones). 0.10 s/GB against np.isfinite's 0.80 on bfloat16 (ml_dtypes' ufunc); as fast on
# float32.
_FINITE_BITS = {
    np.dtype(np.float16): (np.uint16, 0x7FFF, 0x7C00),
    np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7FFF, 0x7F80),
    np.dtype(np.float32): (np.uint32, 0x7FFF_FFFF, 0x7F80_0000),
    np.dtype(np.float64): (np.uint64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
}
_FINITE_STEP = 1 << 20  # Elements tested at a time: the masked copy stays in cache and its buffer is reused.


def _all_finite(flat: np.ndarray) -> bool:
    """Whether the 1-D ``flat`` holds no NaN or Inf."""
    bits = _FINITE_BITS.get(flat.dtype)
    if bits is None:  # float8 formats and the like: no infinity pattern to compare with.
        return bool(np.isfinite(flat).all())
    uint, magnitude, infinity = bits
    words = flat.view(uint)
    masked = np.empty(min(words.size, _FINITE_STEP), uint)
    for start in range(0, words.size, _FINITE_STEP):
        part = words[start : start + _FINITE_STEP]
        if int(np.bitwise_and(part, magnitude, out=masked[: part.size]).max()) >= infinity:
            return False
    return True


def _update(digest, array: np.ndarray, *, finite: bool) -> bool:
    """Adds the array's C-order bytes to ``digest``; returns whether (if ``finite``) it holds no NaN or Inf."""
    flat = np.ascontiguousarray(array).reshape(-1)
    step = max(1, _CHUNK_BYTES // max(1, array.itemsize))
    ok = True
    for start in range(0, flat.size, step):
        chunk = flat[start : start + step]
        digest.update(memoryview(chunk.view(np.uint8)))
        if finite and ok:
            ok = _all_finite(chunk)
    return ok


def _digest(array: np.ndarray, *, finite: bool) -> tuple[str, bool]:
    """sha256 of the array's C-order bytes, and (if ``finite``) whether it holds no NaN or Inf."""
    digest = hashlib.sha256()
    ok = _update(digest, array, finite=finite)
    return digest.hexdigest(), ok


def _entry(leaf: plan.Leaf, sha256: str) -> dict:
    return {"shape": list(leaf.shape), "dtype": leaf.dtype.name, "sha256": sha256}


def _is_float(dtype: np.dtype) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.inexact))


class Digests:
    """Digests of the arrays as they are written, ``entries`` waits for them. A streamed array is hashed slice by
    slice, in order, on one thread of its own: ``update`` each slice (first axis, in order), then ``finish``; arrays
    of a multi-process run are digested elsewhere and recorded with ``add_digested``.
    """

    def __init__(self, check_finite: Iterable[plan.Path] = ()) -> None:
        self._check_finite = set(check_finite)
        self._lane = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="openpi-merge-digest-slices")
        self._pending: dict[plan.Path, tuple[plan.Leaf, concurrent.futures.Future]] = {}
        self._running: dict[plan.Path, tuple[object, list[bool]]] = {}

    def update(self, leaf: plan.Leaf, block: np.ndarray) -> concurrent.futures.Future:
        """Hashes the next slice of ``leaf`` (after every slice given before); the future is done once it is."""
        digest, ok = self._running.setdefault(leaf.path, (hashlib.sha256(), [True]))
        finite = leaf.path in self._check_finite and _is_float(leaf.dtype)

        def run() -> None:
            ok[0] = _update(digest, block, finite=finite) and ok[0]

        return self._lane.submit(run)

    def finish(self, leaf: plan.Leaf) -> None:
        """Records ``leaf``'s digest once every slice given to ``update`` is hashed."""
        digest, ok = self._running.pop(leaf.path, (hashlib.sha256(), [True]))
        self._pending[leaf.path] = (leaf, self._lane.submit(lambda: (digest.hexdigest(), ok[0])))

    def wait(self) -> None:
        """Waits for every digest started so far; raises NumericsError for a kept leaf holding NaN or Inf."""
        for path, (_, future) in self._pending.items():
            if not future.result()[1]:
                raise errors.NumericsError(
                    f"{'/'.join(path)} holds NaN or Inf in the input: the fine-tune is broken there (this leaf is "
                    "copied, not merged); fix or re-export the checkpoint"
                )

    def add_digested(self, leaf: plan.Leaf, sha256: str, finite: bool) -> None:
        """Records a digest computed elsewhere (``digest_params``, in a process of its own)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result((sha256, finite or not (leaf.path in self._check_finite and _is_float(leaf.dtype))))
        self._pending[leaf.path] = (leaf, future)

    def entries(self) -> dict[str, dict]:
        self.wait()
        return {leaf.name: _entry(leaf, future.result()[0]) for leaf, future in self._pending.values()}

    def close(self) -> None:
        self._lane.shutdown(wait=True, cancel_futures=True)


def _file_entry(path: storage.AnyPath) -> dict:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _files(root: storage.AnyPath, leave_out: tuple[str, ...] = ()) -> dict[str, dict]:
    """Each file under ``root`` (its path relative to it) with its bytes and sha256."""
    return {name: _file_entry(root / name) for name in storage.files(root) if name not in leave_out}


def _assets(step_dir: storage.AnyPath) -> dict[str, dict]:
    return _files(step_dir / "assets")


def write(step_dir: storage.AnyPath, params: dict[str, dict], *, value_suffix: bool) -> None:
    """Writes the manifest of a step dir whose ``params/`` and ``assets/`` are written (``params``: ``entries()``)."""
    document = {
        "format": FORMAT,
        "value_suffix": value_suffix,
        "params": dict(sorted(params.items())),
        "assets": _assets(step_dir),
    }
    (step_dir / FILENAME).write_text(json.dumps(document, indent=1) + "\n")


def write_files(directory: storage.AnyPath, *, kind: str) -> None:
    """Writes the manifest of an export dir whose files are all written: each file's bytes and sha256."""
    document = {"format": FILES_FORMAT, "kind": kind, "files": _files(directory, leave_out=(FILENAME,))}
    (directory / FILENAME).write_text(json.dumps(document, indent=1) + "\n")


def is_files(directory: pathlib.Path) -> bool:
    """Whether ``directory``'s manifest is an export's (``FILES_FORMAT``); False for any other or unreadable one."""
    try:
        return json.loads((directory / FILENAME).read_text()).get("format") == FILES_FORMAT
    except (OSError, ValueError, RecursionError, AttributeError):
        return False


def _read(step_dir: storage.AnyPath) -> dict:
    """The manifest of ``step_dir``, validated; raises InputError for a missing, unreadable or malformed one."""
    path = step_dir / FILENAME
    if not path.is_file():
        raise errors.InputError(
            f"{step_dir} has no {FILENAME}: only step dirs written by openpi-merge carry one and can be checked"
        )
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested deeper than Python's limit.
        raise errors.InputError(f"{path} is unreadable ({str(e)[:200]}): the copy is damaged; copy it again") from e
    if not isinstance(document, dict) or document.get("format") not in (FORMAT, FILES_FORMAT):
        raise errors.InputError(f"{path} is not an openpi-merge manifest of format {FORMAT} or {FILES_FORMAT}")
    if problem := _malformed(document):
        raise errors.InputError(f"{path} is not a valid openpi-merge manifest ({problem}): copy it again")
    return document


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _malformed(document: dict) -> str | None:
    """What is wrong with a manifest's structure, or None: every field the check reads, with its type."""
    if document["format"] == FILES_FORMAT:
        files = document.get("files")
        if not isinstance(files, dict) or not isinstance(document.get("kind"), str):
            return "files must be an object and kind a string"
        return _malformed_files("files", files)
    params, assets = document.get("params"), document.get("assets")
    if not isinstance(params, dict) or not isinstance(assets, dict):
        return "params and assets must be objects"
    for name, entry in params.items():
        if not isinstance(entry, dict) or not _is_sha256(entry.get("sha256")):
            return f"params[{name!r}] needs a sha256 of 64 hex digits"
        shape, dtype = entry.get("shape"), entry.get("dtype")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape) and isinstance(dtype, str)):
            return f"params[{name!r}] needs a shape (a list of sizes) and a dtype name"
    return _malformed_files("assets", assets)


def _malformed_files(field: str, files: dict) -> str | None:
    for name, entry in files.items():
        if not isinstance(entry, dict) or not _is_sha256(entry.get("sha256")) or type(entry.get("bytes")) is not int:
            return f"{field}[{name!r}] needs bytes (an integer) and a sha256 of 64 hex digits"
    return None


def groups(leaves: list[plan.Leaf], budget_bytes: int) -> Iterator[list[plan.Leaf]]:
    """``leaves`` in order, in runs of at most ``budget_bytes`` (a larger leaf alone)."""
    group: list[plan.Leaf] = []
    for leaf in leaves:
        if group and sum(x.nbytes for x in group) + leaf.nbytes > budget_bytes:
            yield group
            group = []
        group.append(leaf)
    if group:
        yield group


def check(
    step_dir: pathlib.Path,
    layout: sharding.Layout,
    *,
    budget_bytes: int,
    stop: Callable[[], None] = lambda: None,
) -> str:
    """Confirms that ``step_dir`` holds exactly what its manifest records; returns a one-line verdict.

    Reads about ``budget_bytes`` of arrays at a time (a larger leaf alone). Raises NumericsError naming the first
    parameter or asset file that differs, InputError if the dir has no manifest or no readable checkpoint.
    """
    if not storage.is_remote(step_dir) and step_dir.is_dir():
        # A copy is checked for what it holds itself: a link could make it read (and vouch for) anything on the
        # machine, or a file outside the copy that happens to have the right bytes.
        checkpoint.refuse_links(step_dir, "a checked copy must hold regular files only, nothing outside it is read")
    document = _read(step_dir)
    if document["format"] == FILES_FORMAT:
        return _check_files(step_dir, document)
    try:
        return _check(step_dir, document, layout, budget_bytes, stop)
    except errors.InputError as e:  # The manifest is there, so what fails to read was damaged after the merge.
        raise errors.NumericsError(f"{step_dir} is damaged: {e}; copy it again from the original") from e


def _check(step_dir: pathlib.Path, document: dict, layout: sharding.Layout, budget_bytes: int, stop) -> str:
    source = checkpoint.locate_input(str(step_dir))
    contents = checkpoint.read_contents(source.params_dir)
    recorded: dict[str, dict] = document["params"]
    stored = {leaf.name: leaf for leaf in contents.leaves.values()}
    for name in sorted(recorded.keys() | stored.keys()):
        if name not in stored:
            raise errors.NumericsError(f"{step_dir}: parameter {name} is in the manifest but not in params/")
        if name not in recorded:
            raise errors.NumericsError(f"{step_dir}: parameter {name} is in params/ but not in the manifest")
        leaf, entry = stored[name], recorded[name]
        if [list(leaf.shape), leaf.dtype.name] != [entry["shape"], entry["dtype"]]:
            raise errors.NumericsError(
                f"{step_dir}: parameter {name} is {leaf.dtype.name}{list(leaf.shape)}, the manifest says "
                f"{entry['dtype']}{entry['shape']}"
            )
    digests = _read_digests(source.params_dir, contents, layout, budget_bytes, finite=False, stop=stop)
    for leaf, sha256, _ in digests:
        if sha256 != recorded[leaf.name]["sha256"]:
            raise errors.NumericsError(
                f"{step_dir}: parameter {leaf.name} differs from what openpi-merge wrote (sha256 mismatch): the "
                "copy is damaged; copy it again from the original"
            )
    assets = _assets(step_dir)
    _refuse_changed(step_dir, document["assets"], assets, "assets/")
    return (
        f"openpi-merge: {step_dir} matches its manifest: {len(recorded)} parameters "
        f"({sum(leaf.nbytes for leaf in contents.leaves.values()) / 1e9:.3g} GB) and {len(assets)} asset files"
    )


def _refuse_changed(where: pathlib.Path, recorded: dict, found: dict, prefix: str = "") -> None:
    """Raises NumericsError naming the first file (``prefix`` + name) missing, extra or changed against ``recorded``."""
    for name in sorted(recorded.keys() | found.keys()):
        if found.get(name) != recorded.get(name):
            raise errors.NumericsError(
                f"{where}: {prefix}{name} differs from what openpi-merge wrote (missing, extra or changed): the copy "
                "is damaged; copy it again from the original"
            )


def _check_files(directory: pathlib.Path, document: dict) -> str:
    """An export dir against its manifest: the same files, each with the same bytes."""
    found = _files(directory, leave_out=(FILENAME,))
    _refuse_changed(directory, document["files"], found)
    total = sum(entry["bytes"] for entry in found.values())
    return (
        f"openpi-merge: {directory} matches its manifest: the {document['kind']} export's {len(found)} files "
        f"({total / 1e9:.3g} GB)"
    )


def _read_digests(
    params_dir: storage.AnyPath,
    contents: checkpoint.Contents,
    layout: sharding.Layout,
    budget_bytes: int,
    *,
    committed: bool = True,
    finite: bool = True,
    stop: Callable[[], None] = lambda: None,
) -> Iterator[tuple[plan.Leaf, str, bool]]:
    """(leaf, sha256, finite) of every stored array in name order, restored about ``budget_bytes`` at a time;
    ``finite=False`` skips the NaN/Inf test (then always True)."""
    for group in groups(sorted(contents.leaves.values(), key=lambda leaf: leaf.name), budget_bytes):
        stop()
        arrays = checkpoint.restore(params_dir, contents, layout, [leaf.path for leaf in group], committed=committed)
        for leaf in group:
            yield leaf, *_digest(_host(arrays.pop(leaf.path)), finite=finite and _is_float(leaf.dtype))


def check_written(
    params_dir: storage.AnyPath,
    entries: dict[str, dict],
    *,
    budget_bytes: int,
    committed: bool,
    stop: Callable[[], None],
) -> None:
    """The reload check of a streamed merge: re-reads the written ``params_dir`` through Orbax and raises
    NumericsError unless it holds exactly the parameters of ``entries`` with their digests. ``committed``: whether
    Orbax's Checkpointer may read it (``checkpoint.restore``)."""
    contents = checkpoint.read_contents(params_dir)
    stored = {leaf.name: leaf for leaf in contents.leaves.values()}
    if stored.keys() != entries.keys():
        raise errors.NumericsError(f"{params_dir} does not hold the tree that was written")
    for leaf, sha256, _ in _read_digests(
        params_dir,
        contents,
        sharding.single_device(),
        budget_bytes,
        committed=committed,
        finite=False,
        stop=stop,
    ):
        if _entry(leaf, sha256) != entries[leaf.name]:
            raise errors.NumericsError(f"{params_dir}: {leaf.name} reads back different from what was written")


def digest_params(params_dir: storage.AnyPath, *, budget_bytes: int, committed: bool) -> dict[str, list]:
    """``{leaf name: [sha256, finite]}`` of every array in a params dir, read a group at a time on this process alone.

    A multi-process merge runs this in a child process of process 0 (``python -m openpi_merge.manifest``): gathering
    whole arrays across processes with JAX collectives deadlocked intermittently next to Orbax's multi-process save.
    """
    contents = checkpoint.read_contents(params_dir)
    digests = _read_digests(params_dir, contents, sharding.single_device(), budget_bytes, committed=committed)
    return {leaf.name: [sha256, finite] for leaf, sha256, finite in digests}


if __name__ == "__main__":  # python -m openpi_merge.manifest PARAMS_DIR BUDGET_BYTES COMMITTED: digests as JSON.
    import sys

    directory, budget, is_committed = sys.argv[1:]
    result = digest_params(storage.resolve(directory), budget_bytes=int(budget), committed=is_committed == "1")
    print(json.dumps(result))
