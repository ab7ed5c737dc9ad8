"""The PyTorch export judged by openpi's own code (``export_check``): loaded strictly by openpi's ``load_pytorch``, and
its actions compared with openpi's JAX LoRA model on the unmerged input.

Neither torch nor openpi is a dependency: this module imports them only when asked to run, from the user's
environment (openpi's own, where ``scripts/serve_policy.py`` runs). Contract of ``pytorch``, in order:

1. Imports torch, safetensors' torch API and openpi's model code; ConfigError (exit 2) naming what is missing.
2. The model config: the TrainConfig's ``model`` when ``train_config`` is set, else openpi's ``Pi0Config`` from the
   settings (both experts' variants, pi0.5 or not, ``action_horizon``) and the tree (``action_dim``); its ``dtype`` is
   the export's, as the server runs it.
3. openpi's ``load_pytorch`` (``safetensors.torch.load_model(PI0Pytorch(config), path)``, strict) loads the export;
   NumericsError (exit 5) naming the missing, unexpected or misshapen keys otherwise.
4. openpi's ``restore_params`` reads the unmerged input and its JAX model with the LoRA config samples actions from
   the same random observation and noise as ``PI0Pytorch.sample_actions`` does on the export; NumericsError when they
   differ by more than ``TOLERANCE`` of the largest action. Skipped, and said so in the returned line, where openpi's
   JAX LoRA model is no reference: an expert whose alpha or rslora (given on the command line) its variant lacks.

Returns the one line the summary and the report carry. The whole tree is held twice (the JAX model and the PyTorch
one) while it runs: the user's choice, off by default.
"""

import dataclasses
import importlib
import pathlib
import types
from typing import Any

import numpy as np

from openpi_merge import config, errors

# Of the largest |action| of openpi's JAX LoRA model. bfloat16: both models compute in bfloat16 and round
# differently on the way (measured on 2-layer models: under 0.7 ulp of 2**-8, 2.4e-3); 8 ulps leave room for the
# depth of a full-size model. float32: the merged kernel's own rounding to its stored dtype dominates (measured:
# under 5e-6 at 2 layers).
TOLERANCE = {"bfloat16": 2.0**-5, "float32": 2.0**-14}
_VOCABULARY = 257_152  # PaliGemma's, fixed in openpi's models.
_SEED = 0


def _import(name: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise errors.ConfigError(
            f"export_check=True needs torch and openpi importable (openpi's environment, with its PyTorch set-up from "
            f"its README), but {name} is not: {e}; install them or leave export_check off"
        ) from e
    except Exception as e:  # Importing openpi runs its code: a failure of it is one line.
        raise errors.ConfigError(f"export_check=True: importing {name} failed: {type(e).__name__}: {e}") from e


def _model_config(settings: config.Settings, action_dim: int) -> Any:
    """openpi's model config of the fine-tune (its LoRA variants), in the export's dtype."""
    if settings.train_config:
        training = _import("openpi.training.config")
        model = training.get_config(settings.train_config).model
    else:
        model = _import("openpi.models.pi0_config").Pi0Config(
            paligemma_variant=settings.experts[""].variant.name,
            action_expert_variant=settings.experts["_1"].variant.name,
            action_dim=action_dim,
            action_horizon=settings.action_horizon,
            pi05=settings.model == "pi05",
        )
    return dataclasses.replace(model, dtype=settings.export_dtype, pytorch_compile_mode=None)


def _reference_differs(settings: config.Settings, model_config: Any) -> str | None:
    """Why openpi's JAX LoRA model of ``model_config`` does not compute what was merged, if it does not."""
    gemma = _import("openpi.models.gemma")
    for suffix, field in (("", "paligemma_variant"), ("_1", "action_expert_variant")):
        expert = settings.experts[suffix]
        lora = gemma.get_config(getattr(model_config, field)).lora_configs.get("attn")
        if lora is None or expert.alpha is None:
            continue
        if float(lora.alpha) != expert.alpha or bool(getattr(lora, "rslora", False)) != expert.rslora:
            return (
                f"{expert.field} has alpha {expert.alpha:g}, rslora {expert.rslora} while openpi's "
                f"{getattr(model_config, field)} has {float(lora.alpha):g}, {bool(getattr(lora, 'rslora', False))}"
            )
    return None


def _observation(model_config: Any, rng: np.random.Generator) -> dict:
    """A random observation in the layout of openpi's ``Observation.from_dict`` (images in [-1, 1], HWC)."""
    observation, _ = model_config.inputs_spec(batch_size=1)
    mask = np.ones((1, model_config.max_token_len), bool)
    mask[:, model_config.max_token_len // 2 :] = False
    return {
        "image": {k: rng.uniform(-1, 1, v.shape).astype(np.float32) for k, v in observation.images.items()},
        "image_mask": {k: np.ones(v.shape, bool) for k, v in observation.image_masks.items()},
        "state": rng.standard_normal(observation.state.shape).astype(np.float32),
        "tokenized_prompt": rng.integers(0, _VOCABULARY, mask.shape).astype(np.int32),
        "tokenized_prompt_mask": mask,
    }


def _jax_actions(model_config: Any, params_dir: pathlib.Path, obs: dict, noise: np.ndarray) -> np.ndarray:
    import jax
    import jax.numpy as jnp

    _model = _import("openpi.models.model")
    dtype = np.float32 if model_config.dtype == "float32" else None  # float32: the bfloat16 leaves widened.
    params = _model.restore_params(params_dir, restore_type=np.ndarray, dtype=dtype)
    model = model_config.load(params)
    observation = _model.Observation.from_dict(jax.tree.map(jnp.asarray, obs))
    return np.asarray(model.sample_actions(jax.random.key(_SEED), observation, noise=jnp.asarray(noise)), np.float32)


def _torch_actions(policy: Any, obs: dict, noise: np.ndarray) -> np.ndarray:
    torch = _import("torch")
    _model = _import("openpi.models.model")

    def tensor(x: np.ndarray) -> Any:
        return torch.from_numpy(np.ascontiguousarray(x))

    data = {k: {n: tensor(a) for n, a in v.items()} if isinstance(v, dict) else tensor(v) for k, v in obs.items()}
    data["image"] = {n: tensor(a.transpose(0, 3, 1, 2)) for n, a in obs["image"].items()}  # As openpi's policy does.
    policy.eval()
    with torch.no_grad():
        return policy.sample_actions("cpu", _model.Observation.from_dict(data), noise=tensor(noise)).float().numpy()


def _load(model_config: Any, weights: pathlib.Path) -> Any:
    """openpi's ``load_pytorch``; NumericsError naming the keys a strict load refused."""
    _import("torch")
    safetensors_torch = _import("safetensors.torch")
    pi0_pytorch = _import("openpi.models_pytorch.pi0_pytorch")
    try:
        return model_config.load_pytorch(types.SimpleNamespace(model=model_config), str(weights))
    except RuntimeError as e:  # load_model raises RuntimeError listing missing and unexpected keys.
        missing, unexpected = safetensors_torch.load_model(
            pi0_pytorch.PI0Pytorch(config=model_config), str(weights), strict=False
        )
        missing, unexpected = sorted(missing), sorted(unexpected)
        raise errors.NumericsError(
            f"openpi's load_pytorch refused {weights.name}: {len(missing)} keys missing "
            f"({', '.join(missing[:3]) or '-'}), {len(unexpected)} unexpected ({', '.join(unexpected[:3]) or '-'}): "
            f"{str(e).splitlines()[0][:200]}"
        ) from e


def pytorch(export_dir: pathlib.Path, settings: config.Settings, params_dir: pathlib.Path, action_dim: int) -> str:
    """Loads the PyTorch export in ``export_dir`` with openpi's code and compares its actions (module docstring).

    ``params_dir``: the unmerged input's params. Raises ConfigError (torch or openpi missing or failing),
    NumericsError (a refused load, actions beyond the tolerance).
    """
    model_config = _model_config(settings, action_dim)
    policy = _load(model_config, export_dir / "model.safetensors")
    loaded = "openpi's load_pytorch loaded every key of model.safetensors strictly"
    if reason := _reference_differs(settings, model_config):
        return f"{loaded}; actions not compared: {reason}, so openpi's JAX LoRA model is no reference"
    rng = np.random.default_rng(_SEED)
    obs = _observation(model_config, rng)
    noise = rng.standard_normal((1, model_config.action_horizon, model_config.action_dim)).astype(np.float32)
    want = _jax_actions(model_config, params_dir, obs, noise)
    got = _torch_actions(policy, obs, noise)
    scale = float(np.max(np.abs(want))) or 1.0
    error = float(np.max(np.abs(got - want))) / scale if got.shape == want.shape else float("inf")
    tolerance = TOLERANCE[settings.export_dtype]
    if not error <= tolerance:
        raise errors.NumericsError(
            f"the PyTorch export's actions differ from openpi's JAX LoRA model on the input by {error:.3g} of the "
            f"largest action (tolerance {tolerance:.3g}): {export_dir} is not committed"
        )
    return (
        f"{loaded}; its actions match openpi's JAX LoRA model on the input within {error:.2g} of the largest "
        f"action (tolerance {tolerance:.2g}, {settings.export_dtype})"
    )
