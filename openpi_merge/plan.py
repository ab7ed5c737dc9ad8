"""Pairs every LoRA-carrying kernel with its adapter, from checkpoint metadata alone, and checks it all fits."""

import collections
import dataclasses

import numpy as np

from openpi_merge import config, errors, lora, openpi_layout
from openpi_merge.openpi_layout import is_lora_leaf

Path = openpi_layout.Path
# The dtypes a merged kernel and its factors may have: the fuse computes in float32 and rounds to the kernel's own.
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclasses.dataclass(frozen=True)
class Leaf:
    """A parameter as the checkpoint's metadata describes it; ``path`` has no ``params`` prefix or ``value`` suffix."""

    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def name(self) -> str:
        return "/".join(self.path)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class Pair:
    """A kernel, its LoRA factors, and how to fold them: ``merged = kernel + scale * einsum(update_equation, A, B)``."""

    kind: lora.ModuleKind
    expert: str
    kernel: Leaf
    lora_a: Leaf
    lora_b: Leaf
    rank: int
    alpha: float | None  # None for FeedForward kernels, whose LoRA is unscaled.
    scale: float
    lora_axes: tuple[int, int]  # The kernel axes A and B replace by the rank (negative: per layer or stacked alike).
    update_equation: str  # For one layer: A, B -> dW.
    batch_ndim: int  # Leading axes (openpi's scanned depth) that stack independent layers.
    out_dtype: np.dtype

    @property
    def lora_equations(self) -> tuple[str, str]:
        """openpi's (eqn_a, eqn_b) of this kernel's LoRA path, for one layer."""
        return lora.lora_equations(self.kind.equation, self.lora_axes)

    @property
    def merged_leaf(self) -> Leaf:
        """The kernel as it is written out."""
        return dataclasses.replace(self.kernel, dtype=self.out_dtype)


@dataclasses.dataclass(frozen=True)
class Plan:
    pairs: tuple[Pair, ...]
    kept: tuple[Leaf, ...]  # Leaves written as they are.
    notes: tuple[str, ...]  # Things worth telling the user that do not stop the merge.
    problems: tuple[str, ...]  # Misfits that stop the merge, each naming its path.
    model: str = ""  # The model family the plan was made for.
    settings: config.Settings | None = None  # What it was made with (None for the groups of a streamed merge).

    def raise_on_problems(self) -> None:
        if self.problems:
            more = f" (and {len(self.problems) - 1} more problems: run with --config.mode=inspect)"
            raise errors.PlanError(self.problems[0] + (more if len(self.problems) > 1 else ""))

    @property
    def leaves_in(self) -> tuple[Leaf, ...]:
        return self.kept + tuple(leaf for p in self.pairs for leaf in (p.kernel, p.lora_a, p.lora_b))

    @property
    def leaves_out(self) -> tuple[Leaf, ...]:
        return self.kept + tuple(p.merged_leaf for p in self.pairs)


def _match_kind(path: Path) -> tuple[lora.ModuleKind, str] | None:
    """The module kind of a kernel path and its expert suffix, or None if it is no LoRA-capable kernel."""
    if len(path) < 2:
        return None
    module, leaf = path[-2], path[-1]
    for kind in openpi_layout.MODULE_KINDS:
        for suffix in openpi_layout.EXPERT_SUFFIXES.values():
            if leaf == kind.kernel and module == kind.module + suffix:
                return kind, suffix
    return None


def _negative_axes(axes: tuple[int, int], layer_ndim: int, path: str) -> tuple[int, int]:
    """openpi's LoRA axes index the per-layer kernel; as negative axes they index the stored (scanned) array too."""
    if not all(-layer_ndim <= a < layer_ndim for a in axes):
        raise errors.PlanError(f"{path}: lora_axes {axes} do not fit its {layer_ndim}-d per-layer kernel")
    return axes[0] % layer_ndim - layer_ndim, axes[1] % layer_ndim - layer_ndim


def _plan_pair(
    kind: lora.ModuleKind,
    expert: config.ExpertSettings,
    kernel: Leaf,
    lora_a: Leaf,
    lora_b: Leaf,
    dtype: np.dtype | None,
    openpi_available: bool,
) -> Pair:
    layer_ndim = len(lora.split_equation(kind.equation)[1])
    batch_ndim = len(kernel.shape) - layer_ndim
    if batch_ndim < 0:
        raise errors.PlanError(f"{kernel.name} has shape {kernel.shape}; a {kind.name} kernel has {layer_ndim} axes")
    axes = _negative_axes(expert.lora_axes if kind.scaled else lora.FEEDFORWARD_AXES, layer_ndim, kernel.name)
    if len(lora_a.shape) != len(kernel.shape):
        raise errors.PlanError(f"{lora_a.name} has shape {lora_a.shape}, which does not fit kernel {kernel.shape}")
    for leaf in (kernel, lora_a, lora_b):
        if leaf.dtype.name not in FLOAT_DTYPES:
            raise errors.PlanError(
                f"{leaf.name} is {leaf.dtype.name}: openpi's LoRA kernels and factors are floating point "
                f"({', '.join(FLOAT_DTYPES)}); a quantised checkpoint must be dequantised before merging"
            )
    if 0 in kernel.shape:
        raise errors.PlanError(f"{kernel.name} has shape {kernel.shape}, with no elements: nothing to fold into")
    rank = lora_a.shape[axes[1]]
    if rank == 0:
        raise errors.PlanError(f"{lora_a.name} has shape {lora_a.shape}: LoRA rank 0 is no adapter (scale alpha / 0)")
    want_a, want_b = lora.factor_shapes(kernel.shape, axes, rank)
    for leaf, want in ((lora_a, want_a), (lora_b, want_b)):
        if leaf.shape != want:
            raise errors.PlanError(
                f"{leaf.name} has shape {leaf.shape}; kernel {kernel.shape} with LoRA rank {rank} on axes {axes} "
                f"needs {want}"
            )

    spec = expert.variant.lora(kind.lora_config)
    if kind.scaled:
        if spec is not None and rank != spec.rank and not expert.alpha_given:
            raise errors.PlanError(_rank_mismatch(kernel, rank, expert, spec, openpi_available))
        alpha = expert.alpha
        scale = lora.scale(alpha, rank, rslora=expert.rslora)
    else:
        alpha, scale = None, 1.0  # openpi's FeedForward adds its LoRA unscaled: no alpha, whatever the rank.
    return Pair(
        kind=kind,
        expert=expert.field,
        kernel=kernel,
        lora_a=lora_a,
        lora_b=lora_b,
        rank=rank,
        alpha=alpha,
        scale=scale,
        lora_axes=axes,
        update_equation=lora.update_equation(kind.equation, axes),
        batch_ndim=batch_ndim,
        out_dtype=dtype or kernel.dtype,
    )


def _rank_mismatch(kernel: Leaf, rank: int, expert: config.ExpertSettings, spec, openpi_available: bool) -> str:
    """Why a rank that is not the variant's stops the merge, and the ways out (never a guessed alpha)."""
    name, field = expert.variant.name, expert.field
    scale = "alpha / sqrt(rank)" if expert.rslora else "alpha / rank"
    way_out = (
        "or name the openpi config you trained with: --config.train_config=NAME"
        if openpi_available
        else "or run openpi-merge inside your openpi env with --config.train_config=NAME"
    )
    return (
        f"{kernel.name} has LoRA rank {rank} but {field}.variant={name} has attn rank {spec.rank}: it was trained "
        f"with another LoRAConfig, whose alpha (the attention LoRA's scale is {scale}) is not stored in checkpoints. "
        f"Pass the alpha of your training's attn LoRAConfig, --config.{field}.alpha=ALPHA, {way_out}"
    )


def _pair_kernel(
    kind: lora.ModuleKind, suffix: str, kernel: Leaf, leaves: dict[Path, Leaf], settings: config.Settings
) -> Pair:
    """Plans one LoRA-carrying kernel; raises PlanError naming the path if it does not fit openpi's layout."""
    a_path, b_path = (*kernel.path[:-1], kind.lora_a), (*kernel.path[:-1], kind.lora_b)
    if a_path not in leaves or b_path not in leaves:
        present, missing = (a_path, b_path) if a_path in leaves else (b_path, a_path)
        raise errors.PlanError(f"{'/'.join(present)} has no partner: {'/'.join(missing)} is missing")
    expert = settings.experts.get(suffix)
    if expert is None:
        raise errors.PlanError(
            f"{kernel.name} carries LoRA for an action expert, which model={settings.model} does not have"
        )
    if not expert.variant.has_lora:
        raise errors.PlanError(
            f"{kernel.name} carries LoRA but {expert.field}.variant={expert.variant.name} has none: "
            f"use --config.{expert.field}.variant={expert.variant.name}_lora"
        )
    if expert.variant.lora(kind.lora_config) is None:
        raise errors.PlanError(
            f"{kernel.name} carries LoRA but {expert.field}.variant={expert.variant.name} has no "
            f"{kind.lora_config!r} LoRAConfig: name the variant you trained with"
        )
    openpi_available = settings.openpi is not None
    return _plan_pair(kind, expert, kernel, leaves[a_path], leaves[b_path], settings.dtype, openpi_available)


def make_plan(leaves: dict[Path, Leaf], settings: config.Settings, reference: dict[Path, Leaf] | None = None) -> Plan:
    """Pairs kernels with LoRA factors by openpi's module table, collecting every misfit as a problem.

    With a ``reference`` (a base checkpoint's leaves), an output tree that differs from it is a problem too.
    """
    lora_paths = {path for path in leaves if is_lora_leaf(path)}
    pairs, problems, consumed, suffixes_with_lora = [], [], set(), set()
    if not lora_paths:
        problems.append("no LoRA leaves in the checkpoint: nothing to merge (is it a base or merged one?)")
    elif wrong_model := _wrong_model(leaves, settings):
        problems.append(wrong_model)
    for path, kernel in leaves.items():
        match = _match_kind(path)
        if match is None:
            continue
        kind, suffix = match
        factors = {(*path[:-1], kind.lora_a), (*path[:-1], kind.lora_b)} & lora_paths
        if not factors:
            continue
        consumed.update(factors)
        suffixes_with_lora.add(suffix)
        try:
            pairs.append(_pair_kernel(kind, suffix, kernel, leaves, settings))
        except errors.PlanError as e:
            problems.append(str(e))

    if unpaired := sorted(lora_paths - consumed):
        problems.append(
            f"{'/'.join(unpaired[0])} is a LoRA leaf with no kernel to fold into "
            f"(known modules: {', '.join(k.name for k in openpi_layout.MODULE_KINDS)}); {len(unpaired)} such leaves"
        )
    for suffix, expert in settings.experts.items():
        if lora_paths and expert.variant.has_lora and suffix not in suffixes_with_lora:
            problems.append(
                f"{expert.field}.variant={expert.variant.name} has LoRA but the checkpoint has none for it: "
                f"set --config.{expert.field}.variant={expert.variant.name.removesuffix('_lora')}"
            )

    merged = {pair.kernel.path for pair in pairs}
    kept = tuple(leaf for path, leaf in leaves.items() if not is_lora_leaf(path) and path not in merged)
    problems += [  # Orbax refuses to save an array without elements ("Cannot save arrays with zero size").
        f"{leaf.name} has shape {leaf.shape}, with no elements: Orbax cannot save it; drop it from the checkpoint"
        for leaf in kept
        if 0 in leaf.shape
    ]
    if reference is not None and not problems:
        problems += _reference_mismatches(kept + tuple(p.merged_leaf for p in pairs), reference)
    notes = _notes(pairs) + _ffn_rank_notes(pairs, settings)
    return Plan(
        pairs=tuple(pairs), kept=kept, notes=notes, problems=tuple(problems), model=settings.model, settings=settings
    )


_MODEL_EVIDENCE = {
    "pi0": "an action expert (modules ending in _1) with plain RMSNorm",
    "pi05": "an action expert whose norms carry adaRMS Dense_0 leaves",
    "pi0_fast": "a single Gemma expert and no action projections (gemma_fast's tree)",
}


def _wrong_model(leaves: dict[Path, Leaf], settings: config.Settings) -> str | None:
    """A problem when the tree is another model family's than the config's, naming the config to use."""
    detected = openpi_layout.detect_model(leaves)
    if detected is None or detected == settings.model:
        return None
    title = openpi_layout.MODEL_TITLES
    return (
        f"the checkpoint is a {title[detected]} model ({_MODEL_EVIDENCE[detected]}) but model={settings.model} "
        f"({title[settings.model]}): use --config={openpi_layout.MODEL_CONFIGS[detected]}"
    )


def _ffn_rank_notes(pairs: list[Pair], settings: config.Settings) -> tuple[str, ...]:
    """FFN LoRA is unscaled, so a rank that is not the variant's changes nothing in the maths: said, not stopped."""
    notes = {}
    for pair in pairs:
        expert = settings.experts[openpi_layout.EXPERT_SUFFIXES[pair.expert]]
        spec = expert.variant.lora("ffn")
        if not pair.kind.scaled and spec is not None and pair.rank != spec.rank:
            notes[pair.expert] = (
                f"{pair.expert}'s MLP LoRA has rank {pair.rank}, not {expert.variant.name}'s ffn rank {spec.rank}: "
                "FFN LoRA is unscaled, so the merge needs no alpha for it"
            )
    return tuple(notes.values())


def _reference_mismatches(leaves_out: tuple[Leaf, ...], reference: dict[Path, Leaf]) -> list[str]:
    """How the output tree would differ from the reference's: missing or extra paths, shapes, dtypes."""
    out = {leaf.path: leaf for leaf in leaves_out}
    mismatches = [f"{'/'.join(p)} is in the reference but not in the output" for p in reference if p not in out]
    mismatches += [f"{'/'.join(p)} is in the output but not in the reference" for p in out if p not in reference]
    for path in out.keys() & reference.keys():
        got, want = out[path], reference[path]
        if got.shape != want.shape:
            mismatches.append(f"{got.name} would have shape {got.shape}; the reference has {want.shape}")
        elif got.dtype != want.dtype:
            mismatches.append(
                f"{got.name} would be {got.dtype.name}; the reference has {want.dtype.name} (see --config.dtype)"
            )
    return sorted(mismatches)


def _notes(pairs: list[Pair]) -> tuple[str, ...]:
    trained = collections.Counter(p.expert for p in pairs if p.kernel.dtype == np.float32)
    return tuple(
        f"{count} {expert} kernels are stored float32, not bfloat16: the base was trained too; the merge is the same"
        for expert, count in trained.items()
    )
