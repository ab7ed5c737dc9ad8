"""The deploy exports of a merge: the merged policy in openpi's PyTorch layout (``pytorch_output``) and as a LeRobot
policy dir (``lerobot_output``), each written from what the Orbax output holds, proven, and committed like it.

Contract, for each export dir E of a run (local dirs only: ``config`` refuses object storage and multi-process runs):

1. Resolve (``targets``): E must not be, contain or lie inside the input, the output or another export; OutputError
   (exit 6) otherwise. Checked with the output's paths, before any array is read.
2. Claim: E is held through ``commit.claim`` (its lock; an existing E refused without ``overwrite``, and replaced
   with it only when it holds an openpi-merge manifest, a ``params/`` dir, or nothing; free space for its bytes).
3. Write (``write``), into E's staging dir: the files of its kind from the merged arrays as the staged Orbax params
   hold them (``Merged``, read back a slice at a time through ``reader``: the export is what the checkpoint holds),
   ``assets/`` copied from the input's step dir, and a manifest of every file (``manifest.write_files``) that
   ``mode=check`` on E verifies.
4. Prove, still before anything is committed: the written ``model.safetensors`` is re-read and every tensor checked
   against the merged arrays through its PyTorch module's own equation on random probes (``torch_export.check``,
   numpy only); NumericsError (exit 5) on any failure. With ``export_check``, openpi's own code loads E and its
   actions are compared with openpi's JAX LoRA model on the input (``framework_check``).
5. Commit: ``pipeline.merge`` commits every claim once all are written and proven, the Orbax output first, then the
   exports in the order of ``config.EXPORT_FIELDS``; each commit is its own atomic rename or exchange (``commit``).

Killed or failed before the commits: no output and no export is committed, and each claim removes its staging dir.
"""

import dataclasses
import pathlib
from collections.abc import Iterator, Mapping

import numpy as np

from openpi_merge import checkpoint, config, errors, lerobot_export, manifest, plan, reader, storage, torch_export
from openpi_merge.openpi_layout import ASSETS_DIR, NORM_STATS_FILE


@dataclasses.dataclass(frozen=True)
class Target:
    """One export of a run: its kind (a key of ``config.EXPORT_FIELDS``) and its dir, resolved."""

    kind: str
    path: pathlib.Path
    asset_id: str | None = None  # LeRobot: whose norm_stats.json its processors normalise with.

    @property
    def field(self) -> str:
        return config.EXPORT_FIELDS[self.kind]


def targets(
    settings: config.Settings, source: checkpoint.Source, output: storage.AnyPath | None, merge_plan: plan.Plan
) -> list[Target]:
    """The run's exports, resolved and checked against the tree's shapes before any array is read; raises
    OutputError for one that overlaps the input, the output or another, PlanError for a tree its layout cannot take,
    and for LeRobot's the errors of ``norm_stats_id``."""
    taken: list[tuple[pathlib.Path, str]] = [] if output is None else [(pathlib.Path(output), "the output")]
    resolved = []
    for kind, given in settings.exports.items():
        path = checkpoint.resolve_output(given, source, config.EXPORT_FIELDS[kind])
        target = Target(kind, path, norm_stats_id(settings, source) if kind == "lerobot" else None)
        for other, what in taken:
            if target.path == other or other in target.path.parents or target.path in other.parents:
                raise errors.OutputError(f"{target.field}={target.path} overlaps {what} {other}: choose separate dirs")
        taken.append((target.path, target.field))
        resolved.append(target)
    if resolved:
        shapes = {key: shape for key, (shape, _) in _expected(merge_plan, settings).items()}
        if "lerobot" in settings.exports:
            lerobot_export.check_shapes(
                shapes,
                model=settings.model,
                paligemma_variant=settings.experts[""].variant.name,
                action_expert_variant=settings.experts["_1"].variant.name,
            )
    return resolved


def _expected(merge_plan: plan.Plan, settings: config.Settings) -> dict[str, tuple[tuple, np.dtype]]:
    try:
        return torch_export.expected({leaf.path: leaf.shape for leaf in merge_plan.leaves_out}, settings.model)
    except KeyError as e:
        names = " and ".join(config.EXPORT_FIELDS[kind] for kind in settings.exports)
        raise errors.PlanError(f"{names}: the merged tree lacks {e} that openpi's PyTorch model needs") from e


def norm_stats_id(settings: config.Settings, source: checkpoint.Source) -> str:
    """The asset id whose ``assets/<asset_id>/norm_stats.json`` the LeRobot export converts: ``asset_id``, else the
    input's only one. Raises PlanError when the input has none (or not the one named), ConfigError when it has several
    and none is named."""
    assets = source.assets_dir
    ids = sorted(p.name for p in assets.iterdir() if (p / NORM_STATS_FILE).is_file()) if assets else []
    where = f"{assets}" if assets else f"the input {source.root} (no assets/ dir)"
    if settings.asset_id:
        if settings.asset_id not in ids:
            raise errors.PlanError(
                f"lerobot_output: asset_id={settings.asset_id!r} has no {NORM_STATS_FILE} in {where}; "
                f"the input has norm stats for: {', '.join(ids) or 'none'}"
            )
        return settings.asset_id
    if not ids:
        raise errors.PlanError(
            f"lerobot_output: no <asset_id>/{NORM_STATS_FILE} in {where}: LeRobot's processors need openpi's norm "
            "stats; give the training step dir (it holds assets/) as input"
        )
    if len(ids) > 1:
        raise errors.ConfigError(
            f"lerobot_output: the input has norm stats for {', '.join(ids)}: choose one with --config.asset_id"
        )
    return ids[0]


def nbytes(merge_plan: plan.Plan, dtype: str) -> int:
    """About what an export writes: every output parameter in the export dtype (norms kept float32 add little)."""
    itemsize = torch_export.DTYPES[dtype].itemsize
    return sum(int(np.prod(leaf.shape, dtype=np.int64)) for leaf in merge_plan.leaves_out) * itemsize


class _Stored:
    """One merged parameter as the staged params hold it: its shape and dtype, and reads of any index of it."""

    def __init__(self, inputs: reader.Inputs, leaf: plan.Leaf) -> None:
        self._inputs, self._leaf = inputs, leaf
        self.shape, self.dtype = leaf.shape, leaf.dtype

    def __getitem__(self, index) -> np.ndarray:
        return np.asarray(self._inputs.read(self._leaf.path, None if index == () else index).result())


class Merged(Mapping):
    """The merged tree (path -> ``_Stored``) of a written params dir, read a slice at a time, never all at once."""

    def __init__(self, params_dir: storage.AnyPath, merge_plan: plan.Plan, *, value_suffix: bool) -> None:
        inputs = reader.open_inputs(params_dir, merge_plan.leaves_out, value_suffix=value_suffix)
        self._leaves = {leaf.path: _Stored(inputs, leaf) for leaf in merge_plan.leaves_out}

    def __getitem__(self, path: plan.Path) -> _Stored:
        return self._leaves[tuple(path)]

    def __iter__(self) -> Iterator[plan.Path]:
        return iter(self._leaves)

    def __len__(self) -> int:
        return len(self._leaves)


class _Written(Mapping):
    """The tensors of a written ``model.safetensors``, each read from the file when asked for; ``prefix``: only the
    keys under it, without it (LeRobot's ``model.``)."""

    def __init__(self, path: pathlib.Path, prefix: str = "", leave_out: tuple[str, ...] = ()) -> None:
        from safetensors import safe_open  # Core dependency, imported where used.

        self._file = safe_open(str(path), framework="numpy")
        self._prefix = prefix
        keys = self._file.keys()  # A safe_open handle is no Mapping: keys() is its listing.
        self._keys = {k.removeprefix(prefix): None for k in keys if k.startswith(prefix) and k not in leave_out}

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(self._prefix + key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@dataclasses.dataclass(frozen=True)
class Proof:
    """What was written to one export and what its proof measured, for the summary and the report."""

    target: Target
    files: list[str]
    dtype: str
    kinds: dict[str, dict]  # torch_export.check's figures per module kind.
    framework: str | None = None  # What ``export_check`` saw, when it ran.

    def describe(self) -> list[str]:
        lines = [f"{self.target.field}: {self.target.path} ({self.dtype}; {', '.join(self.files)})"]
        for kind, stats in sorted(self.kinds.items()):
            lines.append(
                f"  {kind}: {stats['tensors']} tensors, worst error {stats['max_rel_error']:.2g} of the largest "
                f"output; {stats['bound_ratio']:.2g} of float32 rounding's bound against the stored values, "
                f"{stats['rounding_ratio']:.2g} of {self.dtype} rounding's against the merged ones"
            )
        if self.framework:
            lines.append(f"  {self.framework}")
        return lines

    def to_json(self) -> dict:
        return {
            "field": self.target.field,
            "path": str(self.target.path),
            "dtype": self.dtype,
            "files": self.files,
            "proof": self.kinds,
            "framework_check": self.framework,
        }


def write(
    target: Target, staging: pathlib.Path, merged: Merged, settings: config.Settings, source: checkpoint.Source
) -> Proof:
    """Writes ``target``'s files into its staging dir, proves them, and writes their manifest; returns the proof.

    Raises PlanError for a tree the export's layout cannot take, NumericsError if the proof fails, InputError for an
    unreadable merged array or asset, and lets OSError through for the caller's committer to name.
    """
    if target.kind == "lerobot":
        return _write_lerobot(target, staging, merged, settings, source)
    tensors = torch_export.StateDict(merged, settings.model, settings.export_dtype)  # targets() checked the tree.
    action_in = merged[("action_in_proj", "kernel")].shape
    torch_export.write(
        staging,
        tensors,
        config_json=torch_export.config_json(
            action_dim=int(action_in[0]),
            action_horizon=settings.action_horizon,
            paligemma_variant=settings.experts[""].variant.name,
            action_expert_variant=settings.experts["_1"].variant.name,
            dtype=settings.export_dtype,
        ),
    )
    del tensors
    kinds = torch_export.check(_Written(staging / torch_export.SAFETENSORS_FILE), merged, settings.model)
    framework = None
    if settings.export_check:
        from openpi_merge import framework_check  # Imports torch and openpi: only when asked for.

        framework = framework_check.pytorch(staging, settings, pathlib.Path(source.params_dir), int(action_in[0]))
    asset_ids = checkpoint.copy_assets(source, staging)
    manifest.write_files(staging, kind=target.kind)
    files = [torch_export.SAFETENSORS_FILE, torch_export.CONFIG_FILE]
    files.append(f"{ASSETS_DIR}/ ({', '.join(asset_ids)})" if asset_ids else "no assets/: the input carried none")
    return Proof(target, files, settings.export_dtype, kinds, framework)


def _write_lerobot(
    target: Target, staging: pathlib.Path, merged: Merged, settings: config.Settings, source: checkpoint.Source
) -> Proof:
    """The LeRobot policy dir (``lerobot_export``) from openpi's layout made in LeRobot's dtypes (it keeps all of
    SigLIP float32, which openpi's bfloat16 mix rounds), proven like the PyTorch export on its ``model.``-prefixed
    tensors."""
    assert target.asset_id is not None, target  # targets() found it.
    assert source.assets_dir is not None, source
    want = lerobot_export.DTYPES[settings.export_dtype]
    tensors = torch_export.StateDict(
        merged, settings.model, "float32", dtype_of=lambda k: lerobot_export.stored_dtype(k, want)
    )
    stats_path = source.assets_dir / target.asset_id / NORM_STATS_FILE
    written = lerobot_export.write(
        staging,
        tensors,
        model=settings.model,
        norm_stats=lerobot_export.read_norm_stats(stats_path),
        action_dim=int(merged[("action_in_proj", "kernel")].shape[0]),
        action_horizon=settings.action_horizon,
        state_dim=settings.lerobot_state_dim,
        image_keys=list(settings.lerobot_image_keys),
        paligemma_variant=settings.experts[""].variant.name,
        action_expert_variant=settings.experts["_1"].variant.name,
        dtype=settings.export_dtype,
    )
    del tensors
    model_file = staging / lerobot_export.MODEL_FILE
    head = lerobot_export.PREFIX + lerobot_export.PALIGEMMA_LM_HEAD
    stored = _Written(model_file, lerobot_export.PREFIX, leave_out=(head,))
    kinds = torch_export.check(stored, merged, settings.model)
    tied = _Written(model_file)
    if tied[head].tobytes() != tied[lerobot_export.PREFIX + lerobot_export.EMBED_TOKENS].tobytes():
        raise errors.NumericsError(f"{model_file}: {head} is not a copy of the token embedding it must equal")
    asset_ids = checkpoint.copy_assets(source, staging)
    manifest.write_files(staging, kind=target.kind)
    files = [*written, f"{ASSETS_DIR}/ ({', '.join(asset_ids)}; norm stats of {target.asset_id})"]
    return Proof(target, files, settings.export_dtype, kinds)
