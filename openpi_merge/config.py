"""The merge config: an ml_collections ConfigDict for the command line, read into frozen, validated settings.

``FIELDS`` is the one source of every field: its default, and its meaning as ``--help`` and the README table show it.
Each expert's LoRA settings are resolved here, each with where it came from: the command line, openpi's own config
(when openpi is importable: ``openpi_config``), or the built-in table of openpi's stock variants.
"""

import dataclasses
import importlib.util
import math
import pathlib
import re
from typing import Any

import ml_collections
import ml_dtypes
import numpy as np
from ml_collections import config_dict

from openpi_merge import errors, openpi_config, openpi_layout, storage

MODES = ("merge", "inspect", "check")
EXPORT_FIELDS = {"pytorch": "pytorch_output", "lerobot": "lerobot_output"}  # Export kind -> its config field.
EXPORT_DTYPES = ("bfloat16", "float32")
# dtype of merged kernels by config name; None keeps each kernel's own.
OUTPUT_DTYPES = {"keep": None, "float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
EXPERT = "{expert}"  # In a field name: each expert of the model (paligemma, action_expert).

MeshSpec = tuple[tuple[str, int], ...]  # (axis name, size) in order; one size may be -1.
_MESH_AXIS = re.compile(r"([A-Za-z_]\w*)=(-1|[1-9]\d*)")


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field: ``value`` is its default, or a type for a field unset by default (a placeholder of that type:
    a new one per field, since ml_collections links fields that share a placeholder); ``shown`` the default as the
    help shows it."""

    name: str
    value: Any
    shown: str
    meaning: str


FIELDS: tuple[Field, ...] = (
    Field("model", None, "per config", "`pi0`, `pi05` or `pi0_fast`: which experts exist"),
    Field("input", "", "(required)", "a training step dir holding `params/`, or a bare Orbax params dir; "
          "`example:<model>` writes a tiny synthetic one next to the output"),
    Field("output", "", "(required)", "the step dir to write; must not exist unless `overwrite`, must not overlap the "
          "input. May be left out when an export (`pytorch_output`, `lerobot_output`) is given"),
    Field("overwrite", False, "`False`", "replace an existing output (only once the new one is complete)"),
    Field("pytorch_output", "", '`""`', "also write the merged policy in openpi's PyTorch layout here "
          "(`model.safetensors`, `config.json`, `assets/`), a dir openpi's `serve_policy.py` serves; pi0 and pi0.5. "
          "See Deploy in the README"),
    Field("lerobot_output", "", '`""`', "also write the merged policy as a LeRobot policy dir here (`config.json`, "
          "`model.safetensors`, processor files with the norm stats) for LeRobot 0.6's `PI0Policy` / "
          "`PI05Policy.from_pretrained`; LeRobot's model sizes only. See Deploy in the README"),
    Field("export_dtype", "bfloat16", "`bfloat16`", "dtype of the exports' weights: `bfloat16` (what openpi's "
          "PyTorch model runs in; its norms and embeddings stay float32) or `float32`"),
    Field("export_check", False, "`False`", "before committing, load the PyTorch export with openpi's own "
          "`load_pytorch` (strict: every key) and compare its actions with openpi's JAX LoRA model on the unmerged "
          "input; needs torch and openpi importable (openpi's env). See Deploy in the README"),
    Field("action_horizon", int, "train_config's, else 50", "actions per chunk, as the exports' `config.json` "
          "records it (not stored in checkpoints; openpi's `Pi0Config` default is 50)"),
    Field("lerobot_image_keys", ",".join(openpi_layout.IMAGE_KEYS), "openpi's 3 slots", "the LeRobot export's "
          "cameras, comma-separated: its `observation.images.<name>` features, in the order of openpi's slots (base, "
          "left wrist, right wrist), 1 to 3 names; the slots fewer names leave become LeRobot's `empty_cameras`, fed "
          "as masked images as openpi feeds a missing camera"),
    Field("lerobot_state_dim", 0, "`0`", "length of the LeRobot export's `observation.state` (the robot's state "
          "before openpi pads it); `0`: the length of the state norm stats"),
    Field("asset_id", "", "the only one", "which `assets/<asset_id>/norm_stats.json` the LeRobot export normalises "
          "with, when the input carries several"),
    Field("train_config", str, "from the input path", "an openpi TrainConfig name (e.g. "
          "`pi0_libero_low_mem_finetune`): model, variants and LoRA configs come from openpi's own code (openpi must "
          "be importable). Unset: taken from an input path `<base>/<config name>/<exp>/<step>` that openpi knows"),
    Field("dtype", "keep", "`keep`", "dtype of merged kernels: `keep` (the kernel's own, bfloat16 in a LoRA "
          "fine-tune), `float32`, `bfloat16`"),
    Field("mode", "merge", "`merge`", "`merge`; `inspect`: read metadata only, print every pair and where each "
          "setting came from, and every problem the merge would hit, write nothing; `check`: re-read the step dir at "
          "`input` (a merged output or a copy of one) and compare every array and asset file with the manifest the "
          "merge wrote into it"),
    Field("verify", True, "`True`", "before anything is committed, check every stored kernel: random probes through "
          "the update it got vs openpi's LoRA path (A, then B), and each element vs the float32 sum it rounds; fail "
          "beyond what rounding explains"),
    Field("verify_reload", False, "`False`", "re-read the written checkpoint and compare it bit for bit before "
          "committing"),
    Field("carry", True, "`True`", "copy each unchanged array's stored chunks as they are when the output would "
          "store it in the same encoding (one process), instead of decoding and encoding it again; the manifest "
          "hashes it decoded either way"),
    Field("reference", "", '`""`', "a base checkpoint (e.g. openpi's `pi0_base`) whose tree, shapes and dtypes the "
          "output must match, checked before any array is read"),
    Field("report", "", '`""`', "write a JSON report here: config, settings and their sources, plan, verification "
          "and rounding per pair, provenance, seconds per phase, versions, exit status"),
    Field("progress", True, "`True`", "progress on stderr with elapsed time and ETA: a bar on a terminal, a line "
          "every 10 s otherwise; `False`: quiet"),
    Field(f"{EXPERT}.variant", str, "train_config's, else the stock LoRA variant",
          "openpi Gemma variant of the expert (`gemma_2b_lora` for paligemma, `gemma_300m_lora` for the action "
          "expert); read through openpi's `get_config` when openpi is importable"),
    Field(f"{EXPERT}.alpha", float, "the variant's", "LoRA alpha of the attention LoRAConfig "
          "used in training (scale `alpha / rank`); not stored in checkpoints. FFN LoRA is unscaled: no alpha"),
    Field(f"{EXPERT}.rslora", bool, "the variant's", "rank-stabilised LoRA: scale "
          "`alpha / sqrt(rank)`"),
    Field(f"{EXPERT}.lora_axes", tuple, "the variant's (`(-2, -1)`)", "openpi's "
          "`LoRAConfig.axes` for the attention Einsum modules"),
    Field("mesh", "", '`""`', "device mesh, e.g. `fsdp=-1` or `fsdp=4,tp=2` (`-1`: the devices the other axes leave); "
          "empty: one device. See Scale in the README"),
    Field("memory_budget_gb", "auto", "`auto`", "memory the arrays in flight may take, in GB: `auto` (half of what "
          "is available, at most 4), a number, or `none` (no limit). See Scale in the README"),
    Field("compilation_cache", "", "per-user dir", "where JAX's persistent compilation cache keeps the merge's "
          "compiled programs, so later merges load them instead of compiling (`$XDG_CACHE_HOME/openpi-merge/jax`, "
          "else `~/.cache/openpi-merge/jax`); a path; `none`: off. Off for multi-process runs under jaxlib < 0.6 "
          "(openpi's pin), whose cached programs lose buffer donation"),
    Field("distributed.enabled", False, "`False`", "run as one process of a multi-host job "
          "(`jax.distributed.initialize()`); needs a `mesh`"),
    Field("distributed.coordinator_address", str, "JAX's detection", "`host:port` of "
          "process 0's coordinator; unset, JAX detects TPU pods, SLURM, Open MPI and Kubernetes"),
    Field("distributed.num_processes", int, "JAX's detection", "the job's process count"),
    Field("distributed.process_id", int, "JAX's detection", "this process's index"),
)  # fmt: skip


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    if isinstance(value, type):
        value = config_dict.placeholder(value)
    *parents, name = dotted.split(".")
    for parent in parents:
        if parent not in config:
            config[parent] = ml_collections.ConfigDict()
        config = config[parent]
    config[name] = value


def make_config(model: str) -> ml_collections.ConfigDict:
    """The config of a merge for ``model``; every field can be overridden as ``--config.<field>=<value>``."""
    config = ml_collections.ConfigDict()
    for field in FIELDS:
        value = model if field.name == "model" else field.value
        if field.name.startswith(EXPERT):
            for expert in openpi_layout.MODEL_EXPERTS[model]:
                _set(config, field.name.replace(EXPERT, expert), value)
        else:
            _set(config, field.name, value)
    return config


def field_name(name: str) -> str:
    return name.replace(EXPERT, "{paligemma,action_expert}")


def markdown_table() -> str:
    """The fields table of the README, generated from FIELDS."""
    rows = [f"| `{field_name(f.name)}` | {f.shown} | {f.meaning} |" for f in FIELDS]
    return "\n".join(["| field | default | meaning |", "|---|---|---|", *rows])


@dataclasses.dataclass(frozen=True)
class ExpertSettings:
    """LoRA settings of one Gemma expert, resolved, and where each came from (``sources``: field -> words)."""

    field: str
    variant: openpi_layout.Variant
    alpha: float | None  # The attention LoRA's alpha; None when the variant has no attention LoRA and none was given.
    alpha_given: bool  # Given on the command line: then a rank that differs from the variant's is no problem.
    rslora: bool
    lora_axes: tuple[int, int]
    sources: dict[str, str]  # "variant", "alpha", "rslora", "lora_axes" -> where it came from.


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
    carry: bool
    reference: str
    report: str
    experts: dict[str, ExpertSettings]  # Keyed by module-name suffix: "" for PaliGemma, "_1" for the action expert.
    mesh: MeshSpec  # Empty: JAX's default device alone.
    memory_budget_bytes: int | None  # None: auto (``memory.auto_budget``); 0: no limit.
    distributed: DistributedSettings | None  # None: a single process.
    train_config: str | None = None  # The openpi TrainConfig the settings came from, if any.
    train_config_source: str | None = None  # "command line" or "input path".
    openpi: str | None = None  # Where openpi was imported from; None: not importable.
    progress: bool = True
    exports: dict[str, str] = dataclasses.field(default_factory=dict)  # Export kind -> its dir, as given.
    export_dtype: str = "bfloat16"
    export_check: bool = False
    asset_id: str = ""
    lerobot_image_keys: tuple[str, ...] = openpi_layout.IMAGE_KEYS
    lerobot_state_dim: int | None = None  # None: the length of the state norm stats.
    action_horizon: int = 50  # The exports' config.json: given, else train_config's, else openpi's default.


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


def _train_spec(
    config: ml_collections.ConfigDict, openpi: openpi_config.OpenPI | None
) -> tuple[openpi_config.TrainSpec | None, str | None]:
    """The openpi TrainConfig to take settings from: named, or found in the input path; and which of the two."""
    if config.train_config:
        if openpi is None:
            raise errors.ConfigError(
                f"train_config={config.train_config!r} needs openpi importable here: install openpi-merge into "
                "openpi's environment, or pass the variants and alpha as --config.<expert>.* fields"
            )
        spec = openpi.train_config(config.train_config)
        if spec is None:
            raise errors.ConfigError(
                f"train_config={config.train_config!r} is not one of openpi's TrainConfigs "
                "(openpi.training.config.get_config does not know it)"
            )
        return spec, "command line"
    if openpi is None or not config.input or config.input.startswith("example:"):
        return None, None
    step_dir = pathlib.Path(config.input).expanduser().resolve()
    if step_dir.name == openpi_layout.PARAMS_KEY:
        step_dir = step_dir.parent
    name = openpi_layout.train_config_from_path(step_dir)
    spec = openpi.train_config(name) if name else None
    return spec, "input path" if spec else None


def _variant(
    model: str, name: str, field: str, openpi: openpi_config.OpenPI | None
) -> tuple[openpi_layout.Variant, str]:
    """A variant by name and where its LoRA configs came from: openpi's own get_config, or the stock table."""
    if openpi is not None:
        variant = openpi.variant(model, name)
        if variant is None:
            raise errors.ConfigError(f"{field}={name!r} is not a variant openpi's get_config knows")
        return variant, openpi.describe_variant(model, name)
    if name not in openpi_layout.STOCK_VARIANTS:
        raise errors.ConfigError(
            f"{field}={name!r} is not an openpi Gemma variant; known: {', '.join(openpi_layout.STOCK_VARIANTS)} "
            "(a variant of your own needs openpi importable, or a stock name plus --config.<expert>.alpha)"
        )
    return openpi_layout.STOCK_VARIANTS[name], "stock"


def _expert(
    model: str, field: str, expert: ml_collections.ConfigDict, train: openpi_config.TrainSpec | None, openpi
) -> ExpertSettings:
    if expert.variant is not None:
        name, variant_source = expert.variant, "command line"
    elif train is not None:
        name, variant_source = train.variants[field], f"train_config {train.name}"
    else:
        name, variant_source = openpi_layout.MODEL_EXPERTS[model][field], f"default for model={model}"
    variant, table = _variant(model, name, f"{field}.variant", openpi)
    attn = variant.attn
    sources = {"variant": variant_source}

    def pick(key: str, given: Any, from_variant: Any, hint: str) -> Any:
        if given is not None:
            sources[key] = "command line"
            return given
        if table == "stock":
            sources[key] = f"stock default of {name}: {hint}"
        else:
            sources[key] = table
        return from_variant

    alpha = pick("alpha", expert.alpha, attn and attn.alpha, f"pass --config.{field}.alpha if you changed it")
    rslora = pick("rslora", expert.rslora, bool(attn and attn.rslora), f"pass --config.{field}.rslora=True if set")
    axes = pick(
        "lora_axes",
        None if expert.lora_axes is None else tuple(expert.lora_axes),
        attn.axes if attn else (-2, -1),
        f"pass --config.{field}.lora_axes if you changed them",
    )
    if len(axes) != 2 or not all(isinstance(a, int) for a in axes) or axes[0] == axes[1]:
        raise errors.ConfigError(f"{field}.lora_axes={axes} must be two different kernel axes, e.g. (-2, -1)")
    if alpha is not None and not 0 < alpha < math.inf:
        raise errors.ConfigError(f"{field}.alpha={alpha} must be a positive finite number")
    return ExpertSettings(
        field=field,
        variant=variant,
        alpha=None if alpha is None else float(alpha),
        alpha_given=expert.alpha is not None,
        rslora=bool(rslora),
        lora_axes=(axes[0], axes[1]),
        sources=sources,
    )


def read_settings(config: ml_collections.ConfigDict, *, openpi: openpi_config.OpenPI | bool | None = True) -> Settings:
    """Validates ``config`` and returns it as typed settings.

    ``openpi``: True imports openpi if it can (``openpi_config.load``); None resolves without it (the stock table).
    """
    if config.mode not in MODES:
        raise errors.ConfigError(f"mode={config.mode!r} is not one of {', '.join(MODES)}")
    for field in _PATH_FIELDS:
        _refuse_undecodable(field, config[field])
    if openpi is True:
        openpi = None if config.mode == "check" else openpi_config.load()  # check reads no LoRA setting.
    if config.model not in openpi_layout.MODEL_EXPERTS:
        raise errors.ConfigError(f"model={config.model!r} is not one of {', '.join(openpi_layout.MODEL_EXPERTS)}")
    if not config.input:
        raise errors.ConfigError("no input given: pass --config.input=PATH")
    exports = _exports(config) if config.mode == "merge" else {}
    if config.mode == "merge" and not config.output and not exports:
        raise errors.ConfigError(
            "no output given: pass --config.output=PATH"
            " (or an export: --config.pytorch_output, --config.lerobot_output)"
        )
    if config.dtype not in OUTPUT_DTYPES:
        raise errors.ConfigError(f"dtype={config.dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
    train, train_source = _train_spec(config, openpi)
    if train is not None and train.model != config.model:
        raise errors.ConfigError(
            f"train_config {train.name} (from the {train_source}) is a {openpi_layout.MODEL_TITLES[train.model]} "
            f"model but the config is for {openpi_layout.MODEL_TITLES[config.model]}: use "
            f"--config={openpi_layout.MODEL_CONFIGS[train.model]}"
        )
    experts = {
        openpi_layout.EXPERT_SUFFIXES[field]: _expert(config.model, field, config[field], train, openpi)
        for field in openpi_layout.MODEL_EXPERTS[config.model]
    }
    mesh = parse_mesh(config.mesh)
    memory_budget_bytes = _memory_budget(config.memory_budget_gb)
    return Settings(
        model=config.model,
        input=config.input,
        output=config.output,
        overwrite=bool(config.overwrite),
        dtype=OUTPUT_DTYPES[config.dtype],
        mode=config.mode,
        verify=bool(config.verify),
        verify_reload=bool(config.verify_reload),
        carry=bool(config.carry),
        reference=config.reference,
        report=config.report,
        experts=experts,
        mesh=mesh,
        memory_budget_bytes=memory_budget_bytes,
        distributed=_read_distributed(config.distributed, mesh),
        train_config=train and train.name,
        train_config_source=train_source,
        openpi=openpi and openpi.location,
        progress=bool(config.progress),
        exports=exports,
        export_dtype=config.export_dtype,
        export_check=bool(config.export_check),
        asset_id=config.asset_id,
        lerobot_image_keys=_image_keys(config.lerobot_image_keys),
        lerobot_state_dim=_state_dim(config.lerobot_state_dim),
        action_horizon=_action_horizon(config.action_horizon, train),
    )


def _image_keys(text: str) -> tuple[str, ...]:
    slots = len(openpi_layout.IMAGE_KEYS)
    keys = tuple(k.strip().removeprefix("observation.images.") for k in text.split(","))
    if not 0 < len(keys) <= slots or not all(keys) or len(set(keys)) != len(keys):
        raise errors.ConfigError(
            f"lerobot_image_keys={text!r} must be 1 to {slots} distinct comma-separated camera names, in the order "
            f"of openpi's slots (default {','.join(openpi_layout.IMAGE_KEYS)})"
        )
    bad = [k for k in keys if not all(c.isalnum() or c in "_-" for c in k)]
    if bad:
        raise errors.ConfigError(
            f"lerobot_image_keys: {bad[0]!r} is not a camera name (letters, digits, '_' and '-'): LeRobot looks each "
            "up as observation.images.<name>"
        )
    return keys


def _state_dim(given: int) -> int | None:
    if type(given) is not int or given < 0:
        raise errors.ConfigError(f"lerobot_state_dim={given!r} must be a positive integer, or 0 for the stats' length")
    return given or None


_DEFAULT_ACTION_HORIZON = 50  # openpi's Pi0Config.action_horizon.


def _action_horizon(given: int | None, train: openpi_config.TrainSpec | None) -> int:
    if given is not None:
        if type(given) is not int or given < 1:
            raise errors.ConfigError(f"action_horizon={given} must be a positive integer")
        return given
    return (train and train.action_horizon) or _DEFAULT_ACTION_HORIZON


_PATH_FIELDS = ("input", "output", "reference", "report", *EXPORT_FIELDS.values())


def _exports(config: ml_collections.ConfigDict) -> dict[str, str]:
    """The exports asked for (kind -> dir), checked against what they can be written from."""
    exports = {kind: config[field] for kind, field in EXPORT_FIELDS.items() if config[field]}
    if not exports:
        if config.export_check:
            raise errors.ConfigError("export_check=True checks an export: pass --config.pytorch_output=DIR too")
        return exports
    if config.export_dtype not in EXPORT_DTYPES:
        raise errors.ConfigError(f"export_dtype={config.export_dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    names = " and ".join(EXPORT_FIELDS[kind] for kind in exports)
    if config.model == "pi0_fast":
        raise errors.ConfigError(
            f"{names}: openpi has no PyTorch pi0-FAST model to export to: merge pi0-FAST to the Orbax output only"
        )
    for kind, path in exports.items():
        if storage.is_remote(path):
            raise errors.ConfigError(
                f"{EXPORT_FIELDS[kind]}={path!r}: exports are written to a local dir; write there, then upload it"
            )
    if storage.is_remote(config.output):
        raise errors.ConfigError(
            f"{names} with output={config.output!r}: exports are written from a local merge; pass a local output "
            "(or none) and upload it afterwards"
        )
    if config.distributed.enabled:
        raise errors.ConfigError(f"{names}: exports are written by a single-process merge; drop distributed.enabled")
    if config.export_check and "lerobot" in exports:
        raise errors.ConfigError(
            "export_check=True checks the PyTorch export only (LeRobot has no check in this build): leave it off with "
            "lerobot_output, or check pytorch_output in a run of its own"
        )
    if config.export_check:  # Before the merge's minutes, not after them.
        missing = [m for m in ("torch", "openpi") if importlib.util.find_spec(m) is None]
        if missing:
            raise errors.ConfigError(
                f"export_check=True loads the export with openpi's PyTorch model, but {' and '.join(missing)} "
                "cannot be imported here: run in openpi's environment (with its PyTorch set-up) or leave it off"
            )
    return exports


def _refuse_undecodable(field: str, value: str) -> None:
    """A path given in bytes that are not UTF-8 (Python keeps them as surrogates) cannot reach TensorStore, which
    takes UTF-8 strings, nor be printed in a summary: refused here in one line, the bytes shown escaped."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise errors.ConfigError(
            f"{field}={value!a} is not valid UTF-8: rename the path (TensorStore, which Orbax writes with, "
            "takes UTF-8 names only)"
        ) from None


def _memory_budget(value: Any) -> int | None:
    """``memory_budget_gb`` in bytes: None for ``auto``, 0 for ``none`` (or 0)."""
    text = str(value).strip().lower()
    if text == "auto":
        return None
    if text == "none":
        return 0
    try:
        gb = float(text)
    except ValueError:
        gb = math.nan
    # 0 and anything that rounds to less than a byte would read as "no limit" (0 bytes): refused, not reinterpreted.
    if not (0 < gb < math.inf and round(gb * 1e9) >= 1):
        raise errors.ConfigError(
            f"memory_budget_gb={value} must be auto, none, or a positive finite number of GB, at least 1e-9 (e.g. 2)"
        )
    return round(gb * 1e9)


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
