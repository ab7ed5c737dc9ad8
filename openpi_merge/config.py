"""The merge config: an ml_collections ConfigDict for the command line, read into frozen, validated settings."""

import dataclasses
import math
import re

import ml_collections
import ml_dtypes
import numpy as np
from ml_collections import config_dict

from openpi_merge import errors, variants

# The model families openpi fine-tunes with LoRA, and the LoRA variants of their experts in openpi's configs.
MODEL_EXPERTS: dict[str, dict[str, str]] = {
    "pi0": {"paligemma": "gemma_2b_lora", "action_expert": "gemma_300m_lora"},
    "pi05": {"paligemma": "gemma_2b_lora", "action_expert": "gemma_300m_lora"},
    "pi0_fast": {"paligemma": "gemma_2b_lora"},
}
# openpi names the action expert's modules with this suffix (q_einsum_1, mlp_1, ...); PaliGemma's have none.
EXPERT_SUFFIXES = {"paligemma": "", "action_expert": "_1"}
MODES = ("merge", "inspect", "check")
# dtype of merged kernels by config name; None keeps each kernel's own.
OUTPUT_DTYPES = {"keep": None, "float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}

MeshSpec = tuple[tuple[str, int], ...]  # (axis name, size) in order; one size may be -1.
_MESH_AXIS = re.compile(r"([A-Za-z_]\w*)=(-1|[1-9]\d*)")


def parse_mesh(text: str) -> MeshSpec:
    """Parses ``"fsdp=4,tp=2"``; the empty string is no mesh (one device)."""
    if not text.strip():
        return ()
    axes = []
    for part in text.split(","):
        match = _MESH_AXIS.fullmatch(part.strip())
        if not match:
            raise errors.ConfigError(f"mesh={text!r}: {part.strip()!r} is not NAME=SIZE (SIZE a positive int or -1)")
        axes.append((match[1], int(match[2])))
    names = [name for name, _ in axes]
    if len(set(names)) != len(names):
        raise errors.ConfigError(f"mesh={text!r} names an axis twice")
    if sum(size == -1 for _, size in axes) > 1:
        raise errors.ConfigError(f"mesh={text!r}: only one axis may be -1")
    return tuple(axes)


def make_config(model: str) -> ml_collections.ConfigDict:
    """The config of a merge for ``model``; every field can be overridden as ``--config.<field>=<value>``."""
    config = ml_collections.ConfigDict()
    config.model = model
    config.input = ""  # A training step dir holding params/, or a bare Orbax params dir.
    config.output = ""  # The new step dir to write; it must not exist unless overwrite is set.
    config.overwrite = False
    config.dtype = "keep"  # dtype of merged kernels: keep (the kernel's own), float32 or bfloat16.
    # merge; inspect: print the plan from metadata alone, write nothing; check: compare the step dir at input with
    # the manifest openpi-merge wrote into it.
    config.mode = "merge"
    config.verify = True  # Probe every merged kernel against its LoRA path before anything is committed.
    config.verify_reload = False  # Re-read the written checkpoint and compare it bit for bit before committing.
    config.reference = ""  # A base checkpoint (e.g. openpi's pi0_base params) whose tree the output must match.
    config.report = ""  # Path of a JSON report (plan, checks, timings, versions, exit status), for batch jobs.
    # Scale (see openpi_merge/sharding.py, stream.py and distributed.py).
    config.mesh = ""  # Device mesh, e.g. "fsdp=-1" or "fsdp=4,tp=2"; empty: JAX's default device alone.
    config.memory_budget_gb = 0.0  # > 0: restore, fuse and write group by group within about this much memory.
    config.distributed = ml_collections.ConfigDict(
        {
            "enabled": False,  # Call jax.distributed.initialize(); the fields below default to JAX's cluster detection.
            "coordinator_address": config_dict.placeholder(str),
            "num_processes": config_dict.placeholder(int),
            "process_id": config_dict.placeholder(int),
        }
    )
    for expert, variant in MODEL_EXPERTS[model].items():
        config[expert] = ml_collections.ConfigDict(
            {
                "variant": variant,
                "alpha": config_dict.placeholder(float),  # None: the variant's alpha.
                "rslora": False,
                "lora_axes": (-2, -1),  # openpi's LoRAConfig.axes, for the Einsum modules.
            }
        )
    return config


@dataclasses.dataclass(frozen=True)
class ExpertSettings:
    """LoRA settings of one Gemma expert; ``alpha`` is None unless the user gave one."""

    field: str
    variant: variants.Variant
    alpha: float | None
    rslora: bool
    lora_axes: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """Arguments of ``jax.distributed.initialize``; None lets JAX detect them (TPU pods, SLURM, Open MPI, k8s)."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str
    input: str
    output: str
    overwrite: bool
    dtype: np.dtype | None  # Of merged kernels; None keeps each kernel's own.
    mode: str
    verify: bool
    verify_reload: bool
    reference: str
    report: str
    experts: dict[str, ExpertSettings]  # Keyed by module-name suffix: "" for PaliGemma, "_1" for the action expert.
    mesh: MeshSpec  # Empty: JAX's default device alone.
    memory_budget_bytes: int  # 0: the whole tree in memory at once.
    distributed: DistributedSettings | None  # None: a single process.


def read_settings(config: ml_collections.ConfigDict) -> Settings:
    """Validates ``config`` and returns it as typed settings."""
    if config.model not in MODEL_EXPERTS:
        raise errors.ConfigError(f"model={config.model!r} is not one of {', '.join(MODEL_EXPERTS)}")
    if config.mode not in MODES:
        raise errors.ConfigError(f"mode={config.mode!r} is not one of {', '.join(MODES)}")
    for field in ("input", "output") if config.mode == "merge" else ("input",):
        if not config[field]:
            raise errors.ConfigError(f"no {field} given: pass --config.{field}=PATH")
    if config.dtype not in OUTPUT_DTYPES:
        raise errors.ConfigError(f"dtype={config.dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
    experts = {}
    for field in MODEL_EXPERTS[config.model]:
        expert = config[field]
        axes = tuple(expert.lora_axes)
        if len(axes) != 2 or not all(isinstance(a, int) for a in axes) or axes[0] == axes[1]:
            raise errors.ConfigError(f"{field}.lora_axes={axes} must be two different kernel axes, e.g. (-2, -1)")
        if expert.alpha is not None and not 0 < expert.alpha < math.inf:
            raise errors.ConfigError(f"{field}.alpha={expert.alpha} must be a positive finite number")
        experts[EXPERT_SUFFIXES[field]] = ExpertSettings(
            field=field,
            variant=variants.get(expert.variant, field=f"{field}.variant"),
            alpha=expert.alpha,
            rslora=bool(expert.rslora),
            lora_axes=axes,
        )
    mesh = parse_mesh(config.mesh)
    if not 0 <= config.memory_budget_gb < math.inf:
        raise errors.ConfigError(
            f"memory_budget_gb={config.memory_budget_gb} must be a positive finite number (or 0: no budget)"
        )
    return Settings(
        model=config.model,
        input=config.input,
        output=config.output,
        overwrite=bool(config.overwrite),
        dtype=OUTPUT_DTYPES[config.dtype],
        mode=config.mode,
        verify=bool(config.verify),
        verify_reload=bool(config.verify_reload),
        reference=config.reference,
        report=config.report,
        experts=experts,
        mesh=mesh,
        memory_budget_bytes=round(config.memory_budget_gb * 1e9),
        distributed=_read_distributed(config.distributed, mesh),
    )


def _read_distributed(distributed: ml_collections.ConfigDict, mesh: MeshSpec) -> DistributedSettings | None:
    if not distributed.enabled:
        return None
    if not mesh:
        raise errors.ConfigError("distributed.enabled needs a mesh over all processes' devices: --config.mesh=fsdp=-1")
    return DistributedSettings(
        coordinator_address=distributed.coordinator_address,
        num_processes=distributed.num_processes,
        process_id=distributed.process_id,
    )
