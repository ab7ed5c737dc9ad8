"""The merged policy as a LeRobot (0.6.x) pretrained policy directory: ``PI0Policy`` / ``PI05Policy`` and processors.

Contract (numpy, safetensors and json only: neither torch nor lerobot is imported here):

- ``write(directory, tensors, *, model, norm_stats, action_dim, action_horizon, state_dim, image_keys,
  paligemma_variant, action_expert_variant, dtype)`` writes into ``directory`` (which must exist and be empty) the
  files ``PI0Policy.from_pretrained(directory)`` (``model="pi0"``) or ``PI05Policy.from_pretrained(directory)``
  (``"pi05"``) and ``PolicyProcessorPipeline.from_pretrained(directory, config_filename=...)`` load, and returns their
  names: ``config.json``, ``model.safetensors``, ``policy_preprocessor.json``, ``policy_postprocessor.json`` and the
  two normaliser state files those name.
- ``tensors`` is openpi's PyTorch layout, exactly ``torch_export.state_dict(params, model, ...)`` (pass ``"float32"``
  there: LeRobot keeps all of SigLIP float32, openpi's bfloat16 layout rounds it). ``policy_state_dict`` maps it to
  the keys of LeRobot's ``PI0Policy(config).state_dict()``, written as they are loaded, so that nothing goes through
  LeRobot's key fix-up (``_fix_pytorch_state_dict_keys``) or its ``model.`` re-prefixing: every key gets the
  ``model.`` prefix, and PaliGemma's ``lm_head.weight``, which transformers 5 does not tie to ``embed_tokens`` in
  LeRobot's model (so its strict load wants both), is written as a copy of ``embed_tokens``. Dtypes are those of
  LeRobot's model built with ``dtype``: ``"bfloat16"`` is bfloat16 except what
  ``PaliGemmaWithExpertModel.to_bfloat16_for_selected_params`` keeps float32 (the whole vision tower and projector,
  every Gemma norm including pi0.5's adaRMS ``dense``) and the projections (``action_in_proj`` ...), never cast;
  ``"float32"`` is float32 everywhere. Shapes are checked against LeRobot's hard-coded Gemma variants
  (``GEMMA_VARIANTS``, names without openpi's ``_lora``) and SigLIP (``SIGLIP``), because a mismatch makes
  ``from_pretrained`` print a warning and return a randomly initialised policy.
- ``config.json`` is LeRobot 0.6.1's saved ``PI0Config`` / ``PI05Config`` with LeRobot's defaults except:
  ``chunk_size = n_action_steps = action_horizon``, ``max_action_dim = max_state_dim = action_dim`` (openpi pads both
  state and actions to the model's action dim), ``dtype``, the variants, ``device: null`` (LeRobot picks one at load)
  and ``push_to_hub: false``; input features ``observation.images.<key>`` (VISUAL, 3x224x224) for each image key
  (openpi's ``base_0_rgb``, ``left_wrist_0_rgb``, ``right_wrist_0_rgb`` by default, in that order: the order the
  model sees them; one to three keys, and the slots fewer keys leave are ``empty_cameras``, whose
  ``observation.images.empty_camera_<i>`` features are listed as LeRobot's own save lists them) and
  ``observation.state`` (STATE, ``state_dim``, default the length of the state stats); output feature ``action``
  (ACTION, the length of the action stats, at most ``action_dim``).
- Normalisation follows LeRobot's configs: pi0 normalises state and actions by MEAN_STD, pi0.5 by QUANTILES
  (q01/q99), images IDENTITY. ``norm_stats`` is the parsed ``assets/<asset_id>/norm_stats.json`` of openpi
  (``{"norm_stats": {"state": {"mean", "std", "q01", "q99"}, "actions": {...}}}``; ``read_norm_stats`` reads one). Its
  ``state`` becomes ``observation.state`` (cut to ``state_dim`` when longer: openpi may store stats of the padded
  state), ``actions`` becomes ``action``; each stat present is stored as float32 ``<feature>.<stat>`` in both
  processors' state files, as LeRobot's ``NormalizerProcessorStep`` saves them. LeRobot's epsilon differs from
  openpi's (MEAN_STD divides by ``std + 1e-8``, openpi by ``std + 1e-6``; QUANTILES divides by ``q99 - q01``, openpi
  by ``q99 - q01 + 1e-6``): the stats are the same, the normalised values differ by about that much.
- The processor JSONs are LeRobot 0.6.1's ``make_pi0_pre_post_processors`` / ``make_pi05_pre_post_processors``
  pipelines as ``save_pretrained`` writes them. The preprocessor's tokenizer step names
  ``google/paligemma-3b-pt-224``, which LeRobot loads from the Hub when it builds the pipeline (an offline load passes
  ``overrides={"tokenizer_processor": {"tokenizer": ...}}``); its device steps say ``cpu`` (LeRobot's factory
  overrides ``device_processor``).
- Errors, one line each: no norm stats (``None``, no ``state`` or ``actions``, or not the stats the model's mode needs)
  raise ``PlanError``; a malformed ``norm_stats.json`` or stats (not JSON, not a mapping, a stat that is not a 1-D list
  of finite numbers, stats of unequal lengths, shorter than the features) ``InputError``; tensors that are not
  openpi's PyTorch layout of this model, or that do not fit the config, ``PlanError``; an unknown model, dtype or
  variant ``ConfigError``; a directory that is missing or not empty ``OutputError``.
"""

import copy
import json
import math
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

from openpi_merge import errors, openpi_layout, torch_export

MODELS = ("pi0", "pi05")
DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
LEROBOT_VERSION = "0.6.1"  # The version whose formats this module writes (and its tests load).

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
PREPROCESSOR_FILE = "policy_preprocessor.json"
POSTPROCESSOR_FILE = "policy_postprocessor.json"

PREFIX = "model."
EMBED_TOKENS = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
PALIGEMMA_LM_HEAD = "paligemma_with_expert.paligemma.lm_head.weight"
EMPTY_CAMERA = "empty_camera_{}"  # LeRobot's name for a camera slot no feature fills (PI0Config.validate_features).
IMAGE_SHAPE = (3, 224, 224)
STATE_FEATURE = "observation.state"
ACTION_FEATURE = "action"
IMAGE_PREFIX = "observation.images."
TOKENIZER = "google/paligemma-3b-pt-224"

# LeRobot's get_gemma_config (modeling_pi0.py / modeling_pi05.py): the only Gemma variants its policies build.
GEMMA_VARIANTS = {
    "gemma_300m": {"width": 1024, "depth": 18, "mlp_dim": 4096, "num_heads": 8, "num_kv_heads": 1, "head_dim": 256},
    "gemma_2b": {"width": 2048, "depth": 18, "mlp_dim": 16_384, "num_heads": 8, "num_kv_heads": 1, "head_dim": 256},
}
# The SigLIP LeRobot's PaliGemmaWithExpertModel builds (transformers' PaliGemma default So400m/14, intermediate 4304).
SIGLIP = {"width": 1152, "depth": 27, "mlp_dim": 4304}

# PaliGemmaWithExpertModel.to_bfloat16_for_selected_params (LeRobot): parameters whose name holds one of these stay
# float32 in a bfloat16 model.
_KEEP_FLOAT32 = ("vision_tower", "multi_modal_projector", "input_layernorm", "post_attention_layernorm", "model.norm")
_MODES = {"pi0": "MEAN_STD", "pi05": "QUANTILES"}
_NEEDED = {"MEAN_STD": ("mean", "std"), "QUANTILES": ("q01", "q99")}
_STATS = ("mean", "std", "q01", "q99")
_OPENPI_KEYS = {"state": STATE_FEATURE, "actions": ACTION_FEATURE}
_EPS = 1e-8  # NormalizerProcessorStep's default.
_TOKENIZER_MAX_LENGTH = {"pi0": 48, "pi05": 200}

_VLM = "paligemma_with_expert.paligemma.model."
_LM = _VLM + "language_model."
_VISION = _VLM + "vision_tower.vision_model."
_EXPERT = "paligemma_with_expert.gemma_expert.model."


# --- Norm stats -----------------------------------------------------------------------------------------------------


def read_norm_stats(path: str | os.PathLike) -> dict:
    """The parsed ``norm_stats.json`` at ``path``; ``PlanError`` if it is missing, ``InputError`` if not JSON."""
    path = pathlib.Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise errors.PlanError(
            f"LeRobot export: no norm stats at {path}: the export needs openpi's norm_stats.json"
        ) from None
    except OSError as e:
        raise errors.os_fault(e, path, "reading norm stats") from e
    try:
        return json.loads(raw.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise errors.InputError(f"LeRobot export: malformed norm stats {path}: not JSON ({e})") from e


def _stat(values: object, where: str) -> np.ndarray:
    if not isinstance(values, list) or not values:
        raise errors.InputError(f"LeRobot export: malformed norm stats: {where} is not a non-empty list of numbers")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise errors.InputError(
            f"LeRobot export: malformed norm stats: {where} holds a value that is not a finite number"
        )
    with np.errstate(over="ignore"):
        array = np.asarray(values, np.float64).astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise errors.InputError(f"LeRobot export: malformed norm stats: {where} holds a value beyond float32's range")
    return array


def convert_norm_stats(norm_stats: object, model: str) -> dict[str, dict[str, np.ndarray]]:
    """openpi's norm stats as LeRobot's ``{feature: {stat: float32 array}}`` (each stat openpi has that is not null).

    Raises ``PlanError`` when there are no stats for state or actions, or not those the model's mode needs, and
    ``InputError`` when they are malformed.
    """
    _check_model(model)
    if norm_stats is None:
        raise errors.PlanError("LeRobot export: no norm stats: the export needs openpi's norm_stats.json")
    if not isinstance(norm_stats, Mapping) or not isinstance(norm_stats.get("norm_stats"), Mapping):
        raise errors.InputError('LeRobot export: malformed norm stats: expected {"norm_stats": {"state": ..., ...}}')
    inner = norm_stats["norm_stats"]
    mode = _MODES[model]
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, feature in _OPENPI_KEYS.items():
        if name not in inner:
            raise errors.PlanError(f"LeRobot export: the norm stats have no {name!r}: {model} normalises it by {mode}")
        stats = inner[name]
        if not isinstance(stats, Mapping):
            raise errors.InputError(f"LeRobot export: malformed norm stats: {name} is not a mapping of stats")
        converted = {s: _stat(stats[s], f"{name}.{s}") for s in _STATS if stats.get(s) is not None}
        missing = [s for s in _NEEDED[mode] if s not in converted]
        if missing:
            raise errors.PlanError(
                f"LeRobot export: the norm stats of {name} have no {'/'.join(missing)}: {model} normalises by {mode}"
            )
        if len({a.shape for a in converted.values()}) > 1:
            shapes = ", ".join(f"{s} {len(a)}" for s, a in converted.items())
            raise errors.InputError(f"LeRobot export: malformed norm stats: {name}'s stats differ in length ({shapes})")
        out[feature] = converted
    return out


# --- Tensors ----------------------------------------------------------------------------------------------------------


def _check_model(model: str) -> None:
    if model not in MODELS:
        raise errors.ConfigError(f"LeRobot export: model {model!r} has no LeRobot policy here (pi0, pi05)")


def _check_dtype(dtype: str) -> np.dtype:
    if dtype not in DTYPES:
        raise errors.ConfigError(f"LeRobot export: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def lerobot_variant(variant: str) -> str:
    """LeRobot's name for an openpi Gemma variant (the base of ``*_lora``); ``ConfigError`` if LeRobot lacks it."""
    name = variant.removesuffix("_lora")
    if name not in GEMMA_VARIANTS:
        raise errors.ConfigError(
            f"LeRobot export: variant {variant!r}: LeRobot's pi0/pi0.5 build only {', '.join(GEMMA_VARIANTS)}"
        )
    return name


def stored_dtype(key: str, want: np.dtype) -> np.dtype:
    """The dtype LeRobot's model built with ``want`` (bfloat16 or float32) holds openpi's PyTorch key in."""
    if want == DTYPES["float32"] or not key.startswith("paligemma_with_expert."):
        return DTYPES["float32"]
    return DTYPES["float32"] if any(s in key for s in _KEEP_FLOAT32) else want


class PolicyStateDict(Mapping):
    """LeRobot's ``PI0Policy``/``PI05Policy`` state dict over openpi's PyTorch layout (see the module doc), each tensor
    read from ``tensors`` when asked for (a lazy ``torch_export.StateDict`` stays lazy) and cast to LeRobot's dtype."""

    def __init__(self, tensors: Mapping[str, np.ndarray], dtype: str = "float32") -> None:
        self._want = _check_dtype(dtype)
        if EMBED_TOKENS not in tensors:
            raise errors.PlanError(f"LeRobot export: the tensors are not openpi's PyTorch layout: no {EMBED_TOKENS}")
        if PALIGEMMA_LM_HEAD in tensors:
            raise errors.PlanError(
                f"LeRobot export: the tensors hold {PALIGEMMA_LM_HEAD}: openpi's layout leaves it out"
            )
        self._tensors = tensors
        # PaliGemma's lm_head last: LeRobot's model does not tie it to embed_tokens, so it is written as a copy.
        self._sources = {PREFIX + key: key for key in tensors} | {PREFIX + PALIGEMMA_LM_HEAD: EMBED_TOKENS}

    def spec(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        source = self._sources[key]
        spec = getattr(self._tensors, "spec", None)
        shape = spec(source)[0] if spec else tuple(self._tensors[source].shape)
        return tuple(shape), stored_dtype(source, self._want)

    def __getitem__(self, key: str) -> np.ndarray:
        source = self._sources[key]
        array = np.asarray(self._tensors[source])
        return np.ascontiguousarray(array.astype(stored_dtype(source, self._want), copy=False))

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def policy_state_dict(tensors: Mapping[str, np.ndarray], dtype: str = "float32") -> dict[str, np.ndarray]:
    """``PolicyStateDict``, made whole."""
    return dict(PolicyStateDict(tensors, dtype).items())


def _shape(tensors: Mapping[str, np.ndarray], key: str) -> tuple[int, ...]:
    if key not in tensors:
        raise errors.PlanError(f"LeRobot export: the tensors are not openpi's PyTorch layout: no {key}")
    return tuple(tensors[key].shape)


def _check_gemma(tensors: Mapping[str, np.ndarray], prefix: str, variant: str, what: str) -> None:
    g = GEMMA_VARIANTS[variant]
    depth = sum(1 for k in tensors if k.startswith(f"{prefix}layers.") and k.endswith(".self_attn.q_proj.weight"))
    got = {
        "depth": depth,
        "q_proj": _shape(tensors, f"{prefix}layers.0.self_attn.q_proj.weight"),
        "k_proj": _shape(tensors, f"{prefix}layers.0.self_attn.k_proj.weight"),
        "gate_proj": _shape(tensors, f"{prefix}layers.0.mlp.gate_proj.weight"),
    }
    want = {
        "depth": g["depth"],
        "q_proj": (g["num_heads"] * g["head_dim"], g["width"]),
        "k_proj": (g["num_kv_heads"] * g["head_dim"], g["width"]),
        "gate_proj": (g["mlp_dim"], g["width"]),
    }
    for name, shape in want.items():
        if got[name] != shape:
            raise errors.PlanError(
                f"LeRobot export: the {what} is not LeRobot's {variant}: {name} {got[name]}, {variant} has {shape}"
            )


def _check_tensors(tensors: Mapping[str, np.ndarray], model: str, paligemma: str, expert: str, action_dim: int) -> None:
    pi05 = f"{_EXPERT}norm.dense.weight" in tensors
    if pi05 != (model == "pi05"):
        raise errors.PlanError(
            f"LeRobot export: model={model} but the tensors are {'pi0.5' if pi05 else 'pi0'}'s (adaRMS "
            f"{'present' if pi05 else 'absent'})"
        )
    _check_gemma(tensors, _LM, paligemma, "PaliGemma language model")
    _check_gemma(tensors, _EXPERT, expert, "action expert")
    vision_depth = sum(1 for k in tensors if k.startswith(f"{_VISION}encoder.layers.") and k.endswith("fc1.weight"))
    fc1 = _shape(tensors, f"{_VISION}encoder.layers.0.mlp.fc1.weight")
    if (vision_depth, fc1) != (SIGLIP["depth"], (SIGLIP["mlp_dim"], SIGLIP["width"])):
        raise errors.PlanError(
            f"LeRobot export: SigLIP has {vision_depth} layers of fc1 {fc1}, LeRobot builds {SIGLIP['depth']} of "
            f"{(SIGLIP['mlp_dim'], SIGLIP['width'])}"
        )
    action_in = _shape(tensors, "action_in_proj.weight")
    if action_in[1] != action_dim:
        raise errors.PlanError(f"LeRobot export: action_dim={action_dim} but action_in_proj takes {action_in[1]}")


def check_shapes(
    shapes: Mapping[str, Sequence[int]], *, model: str, paligemma_variant: str, action_expert_variant: str
) -> None:
    """``write``'s refusals of a layout LeRobot cannot build, from openpi's PyTorch key -> shape alone (before any
    array is read): PlanError for a model, Gemma variant or SigLIP that is not LeRobot's, ConfigError for a variant
    LeRobot lacks."""
    _check_model(model)
    holders = {key: _Shape(tuple(shape)) for key, shape in shapes.items()}  # Only ``.shape`` is read.
    action_dim = int(holders["action_in_proj.weight"].shape[1]) if "action_in_proj.weight" in holders else 0
    _check_tensors(
        holders, model, lerobot_variant(paligemma_variant), lerobot_variant(action_expert_variant), action_dim
    )


class _Shape:
    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


# --- Config and processors ------------------------------------------------------------------------------------------


def _feature(kind: str, shape: Sequence[int]) -> dict:
    return {"type": kind, "shape": list(shape)}


def _norm_map(model: str) -> dict[str, str]:
    return {"VISUAL": "IDENTITY", "STATE": _MODES[model], "ACTION": _MODES[model]}


def config_json(
    *,
    model: str,
    input_features: dict,
    empty_cameras: int = 0,
    output_features: dict,
    action_dim: int,
    action_horizon: int,
    paligemma_variant: str,
    action_expert_variant: str,
    dtype: str,
) -> dict:
    """LeRobot 0.6.1's saved ``PI0Config``/``PI05Config``: every field, LeRobot's defaults but those the doc names."""
    return {
        "type": model,
        "n_obs_steps": 1,
        "input_features": copy.deepcopy(input_features),
        "output_features": copy.deepcopy(output_features),
        "device": None,
        "use_amp": False,
        "use_peft": False,
        "push_to_hub": False,
        "repo_id": None,
        "private": None,
        "tags": None,
        "license": None,
        "pretrained_path": None,
        "pretrained_revision": None,
        "paligemma_variant": paligemma_variant,
        "action_expert_variant": action_expert_variant,
        "dtype": dtype,
        "chunk_size": action_horizon,
        "n_action_steps": action_horizon,
        "max_state_dim": action_dim,
        "max_action_dim": action_dim,
        "num_inference_steps": 10,
        "time_sampling_beta_alpha": 1.5,
        "time_sampling_beta_beta": 1.0,
        "time_sampling_scale": 0.999,
        "time_sampling_offset": 0.001,
        "min_period": 0.004,
        "max_period": 4.0,
        "use_relative_actions": False,
        "relative_exclude_joints": ["gripper"],
        "action_feature_names": None,
        "rtc_config": None,
        "image_resolution": list(IMAGE_SHAPE[1:]),
        "empty_cameras": empty_cameras,
        "tokenizer_max_length": _TOKENIZER_MAX_LENGTH[model],
        "normalization_mapping": _norm_map(model),
        "gradient_checkpointing": False,
        "compile_model": False,
        "compile_mode": "max-autotune",
        "freeze_vision_encoder": False,
        "train_expert_only": False,
        "optimizer_lr": 2.5e-05,
        "optimizer_betas": [0.9, 0.95],
        "optimizer_eps": 1e-08,
        "optimizer_weight_decay": 0.01,
        "optimizer_grad_clip_norm": 1.0,
        "scheduler_warmup_steps": 1000,
        "scheduler_decay_steps": 30000,
        "scheduler_decay_lr": 2.5e-06,
    }


def _step(name: str, config: dict | None = None, state_file: str | None = None) -> dict:
    step = {"registry_name": name, "config": config or {}}
    if state_file:
        step["state_file"] = state_file
    return step


def _state_file(pipeline: str, index: int, name: str) -> str:
    return f"{pipeline}_step_{index}_{name}.safetensors"


def processors_json(model: str, input_features: dict, output_features: dict) -> tuple[dict, dict]:
    """The preprocessor and postprocessor JSONs of ``make_pi0(5)_pre_post_processors`` as ``save_pretrained`` writes."""
    norm = _norm_map(model)
    normalizer = {"eps": _EPS, "features": {**input_features, **output_features}, "norm_map": norm}
    tokenizer = {
        "max_length": _TOKENIZER_MAX_LENGTH[model],
        "task_key": "task",
        "padding_side": "right",
        "padding": "max_length",
        "truncation": True,
        "tokenizer_name": TOKENIZER,
    }
    device = {"device": "cpu", "float_dtype": None}
    relative = {"enabled": False, "exclude_joints": ["gripper"], "action_names": None}
    head = [_step("rename_observations_processor", {"rename_map": {}}), _step("to_batch_processor")]
    if model == "pi0":  # ... relative -> normalize, the normaliser last (step 6).
        names = ["pi0_new_line_processor", "tokenizer_processor", "device_processor", "relative_actions_processor"]
        configs = [{}, tokenizer, device, relative]
        steps = head + [_step(n, c) for n, c in zip(names, configs, strict=True)]
        steps.append(
            _step("normalizer_processor", normalizer, _state_file("policy_preprocessor", 6, "normalizer_processor"))
        )
    else:  # relative -> normalize (step 3) -> state into the prompt -> tokenizer -> device.
        steps = [*head, _step("relative_actions_processor", relative)]
        steps.append(
            _step("normalizer_processor", normalizer, _state_file("policy_preprocessor", 3, "normalizer_processor"))
        )
        steps += [
            _step("pi05_prepare_state_tokenizer_processor_step"),
            _step("tokenizer_processor", tokenizer),
            _step("device_processor", device),
        ]
    unnormalizer = {"eps": _EPS, "features": copy.deepcopy(output_features), "norm_map": dict(norm)}
    post = [
        _step("unnormalizer_processor", unnormalizer, _state_file("policy_postprocessor", 0, "unnormalizer_processor")),
        _step("absolute_actions_processor", {"enabled": False}),
        _step("device_processor", dict(device)),
    ]
    return {"name": "policy_preprocessor", "steps": steps}, {"name": "policy_postprocessor", "steps": post}


# --- Writing ----------------------------------------------------------------------------------------------------------


def write(
    directory: pathlib.Path,
    tensors: Mapping[str, np.ndarray],
    *,
    model: str,
    norm_stats: dict,
    action_dim: int,
    action_horizon: int,
    state_dim: int | None,
    image_keys: list[str] | None,
    paligemma_variant: str,
    action_expert_variant: str,
    dtype: str,
) -> list[str]:
    """Writes the LeRobot policy directory (see the module doc) into the empty ``directory``; returns the file names."""
    _check_model(model)
    _check_dtype(dtype)
    paligemma, expert = lerobot_variant(paligemma_variant), lerobot_variant(action_expert_variant)
    stats = convert_norm_stats(norm_stats, model)
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise errors.OutputError(f"LeRobot export: {directory} is not an existing directory")
    if any(directory.iterdir()):
        raise errors.OutputError(f"LeRobot export: {directory} is not empty")
    if action_dim <= 0 or action_horizon <= 0:
        raise errors.ConfigError(
            f"LeRobot export: action_dim {action_dim} and action_horizon {action_horizon} must be > 0"
        )
    _check_tensors(tensors, model, paligemma, expert, action_dim)

    action_len = len(next(iter(stats[ACTION_FEATURE].values())))
    state_len = len(next(iter(stats[STATE_FEATURE].values())))
    state_dim = state_len if state_dim is None else state_dim
    if not 0 < state_dim <= min(state_len, action_dim):
        raise errors.InputError(
            f"LeRobot export: state_dim {state_dim} does not fit: the state stats have {state_len} values, the model "
            f"takes at most {action_dim}"
        )
    if action_len > action_dim:
        raise errors.InputError(
            f"LeRobot export: malformed norm stats: {action_len} action values, the model has action_dim {action_dim}"
        )
    stats[STATE_FEATURE] = {s: a[:state_dim] for s, a in stats[STATE_FEATURE].items()}
    keys = list(openpi_layout.IMAGE_KEYS if image_keys is None else image_keys)
    slots = len(openpi_layout.IMAGE_KEYS)
    if not 0 < len(keys) <= slots or len(set(keys)) != len(keys):
        raise errors.ConfigError(
            f"LeRobot export: image keys {keys} must be 1 to {slots} distinct names (the model's camera slots)"
        )
    # The slots no key fills are LeRobot's empty cameras: features it adds itself (validate_features) and feeds as
    # masked -1 images after the given ones, as openpi feeds a camera an observation lacks.
    empty = [EMPTY_CAMERA.format(i) for i in range(slots - len(keys))]
    inputs = {IMAGE_PREFIX + k: _feature("VISUAL", IMAGE_SHAPE) for k in [*keys, *empty]}
    inputs[STATE_FEATURE] = _feature("STATE", (state_dim,))
    outputs = {ACTION_FEATURE: _feature("ACTION", (action_len,))}
    config = config_json(
        model=model,
        input_features=inputs,
        empty_cameras=len(empty),
        output_features=outputs,
        action_dim=action_dim,
        action_horizon=action_horizon,
        paligemma_variant=paligemma,
        action_expert_variant=expert,
        dtype=dtype,
    )
    pre, post = processors_json(model, inputs, outputs)
    flat_stats = {f"{feature}.{s}": a for feature, by_stat in stats.items() for s, a in by_stat.items()}

    files = {MODEL_FILE: PolicyStateDict(tensors, dtype)}
    files |= {CONFIG_FILE: config, PREPROCESSOR_FILE: pre, POSTPROCESSOR_FILE: post}
    files |= {step["state_file"]: flat_stats for p in (pre, post) for step in p["steps"] if "state_file" in step}
    written = []
    for name, content in files.items():
        path = directory / name
        try:
            if name.endswith(".json"):
                path.write_text(json.dumps(content, indent=4 if name == CONFIG_FILE else 2) + "\n")
            else:
                torch_export.save_safetensors(content, path, metadata={"format": "pt"} if name == MODEL_FILE else None)
        except OSError as e:
            raise errors.os_fault(e, path, "LeRobot export: writing") from e
        written.append(name)
    return written
