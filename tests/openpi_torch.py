"""openpi's own models (JAX ``Pi0`` and ``PI0Pytorch``), shrunk in-process, as the judges of the PyTorch export.

openpi's code comes from ``$OPENPI_SRC`` (default ``<repo>/../shared/openpi/src``); ``available()`` says why not when it
cannot be used. ``small_variants()`` registers small Gemma and SigLIP variants for the duration of a ``with``: openpi's
``gemma.get_config`` learns two LoRA variants (8 heads, as ``PaliGemmaWithExpertModel`` hard-codes ``8 * head_dim``
in its attention, and heads x head_dim unequal to either width), the JAX ``Pi0``'s ``So400m/14`` SigLIP and
``PI0Pytorch``'s hard-coded full-size SigLIP both become a 2-layer one. The vocabulary stays openpi's (both models fix
it at 257152).
"""

import contextlib
import importlib.util
import os
import pathlib
import sys
import types
import zlib

import ml_dtypes
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
OPENPI_SRC = pathlib.Path(os.environ.get("OPENPI_SRC", REPO.parent / "shared" / "openpi" / "src"))

PALIGEMMA = "small_paligemma_lora"
EXPERT = "small_expert_lora"
# The CLI (a subprocess without these variants) merges with openpi's stock LoRA variants: same ranks, and the alphas
# given on its command line.
PALIGEMMA_LORA = {"rank": 16, "alpha": 16.0}
EXPERT_LORA = {"rank": 32, "alpha": 64.0}  # Not the stock 32: scale 2.
GEMMA = {
    PALIGEMMA: {"width": 64, "depth": 2, "mlp_dim": 128, "num_heads": 8, "num_kv_heads": 1, "head_dim": 16},
    EXPERT: {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 8, "num_kv_heads": 1, "head_dim": 16},
}
SIGLIP = {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 2, "patch_size": 14}
ACTION_DIM, ACTION_HORIZON, MAX_TOKEN_LEN = 8, 4, 16


def available() -> str | None:
    """None when openpi's PyTorch model can run here, else why not."""
    if not (OPENPI_SRC / "openpi" / "models_pytorch" / "pi0_pytorch.py").is_file():
        return f"openpi's source is not at {OPENPI_SRC} (set OPENPI_SRC)"
    for module in ("torch", "transformers", "safetensors", "einops", "jaxtyping", "beartype", "augmax"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (scripts/torch_tier.sh builds the venv this tier needs)"
    import transformers

    if transformers.__version__ != "4.53.2":
        return f"openpi's PyTorch model needs transformers 4.53.2, not {transformers.__version__}"
    site = pathlib.Path(transformers.__file__).parent
    if not (site / "models" / "siglip" / "check.py").is_file():
        return "openpi's transformers_replace files are not installed over transformers (scripts/torch_tier.sh)"
    return None


def import_openpi() -> None:
    for path in (OPENPI_SRC, OPENPI_SRC.parent / "packages" / "openpi-client" / "src"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


@contextlib.contextmanager
def small_variants():
    """openpi with the small variants above registered (and nothing else changed) inside the ``with``."""
    import_openpi()
    import openpi.models.gemma as gemma
    import openpi.models.lora as lora
    import openpi.models.siglip as siglip
    import openpi.models_pytorch.gemma_pytorch as gemma_pytorch
    import pytest

    get_config, decode_variant = gemma.get_config, siglip.decode_variant
    paligemma_class = gemma_pytorch.PaliGemmaForConditionalGeneration
    loras = {PALIGEMMA: PALIGEMMA_LORA, EXPERT: EXPERT_LORA}

    def small_get_config(variant):
        if variant in GEMMA:
            lora_config = lora.LoRAConfig(**loras[variant])
            return gemma.Config(**GEMMA[variant], lora_configs={"attn": lora_config, "ffn": lora_config})
        return get_config(variant)

    def small_decode_variant(variant):
        if variant == "So400m/14":
            s = SIGLIP
            return {k: s[k] for k in ("width", "depth", "mlp_dim", "num_heads")} | {"patch_size": (14, 14)}
        return decode_variant(variant)

    def small_paligemma(config):
        vision = config.vision_config
        vision.hidden_size, vision.intermediate_size = SIGLIP["width"], SIGLIP["mlp_dim"]
        vision.num_hidden_layers, vision.num_attention_heads = SIGLIP["depth"], SIGLIP["num_heads"]
        vision.patch_size, vision.image_size = SIGLIP["patch_size"], 224
        vision.projection_dim = config.text_config.hidden_size
        return paligemma_class(config=config)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gemma, "get_config", small_get_config)
        patch.setattr(siglip, "decode_variant", small_decode_variant)
        patch.setattr(gemma_pytorch, "PaliGemmaForConditionalGeneration", small_paligemma)
        yield


def pi0_config(model: str, dtype: str):
    """openpi's ``Pi0Config`` for ``model`` with the small LoRA variants (no torch.compile: a test runs it once)."""
    from openpi.models import pi0_config

    return pi0_config.Pi0Config(
        dtype=dtype,
        paligemma_variant=PALIGEMMA,
        action_expert_variant=EXPERT,
        action_dim=ACTION_DIM,
        action_horizon=ACTION_HORIZON,
        max_token_len=MAX_TOKEN_LEN,
        pi05=model == "pi05",
        pytorch_compile_mode=None,
    )


def _std(path: tuple[str, ...], array: np.ndarray) -> float | None:
    if path[-1] in ("lora_a", "lora_b") or path[-1].endswith(("_lora_a", "_lora_b")):
        return 0.05  # openpi starts them at normal(0.01): too small a product to tell a merge from none.
    if np.any(array) and np.std(array) >= 1e-3:
        return None  # openpi's own init.
    if path[-1] == "kernel":
        # pi0.5's adaRMS Dense_0 kernels start at zero, and so its gates: every layer of the action expert would be
        # silent. LeCun-like, so that the gates let the layers (and their LoRA) through.
        return array.shape[-2] ** -0.5
    return 0.02  # Zero-initialised biases and norm scales.


def lora_checkpoint(model: str, step_dir: pathlib.Path, *, seed: int = 0) -> dict[tuple[str, ...], np.ndarray]:
    """Writes ``step_dir`` as openpi's LoRA training would (params with the ``value`` suffix, assets) from openpi's
    own LoRA model's tree: every leaf non-zero, frozen ``PaliGemma/llm`` leaves bfloat16. Returns the flat tree."""
    import flax.nnx as nnx
    import helpers
    import jax
    from flax import traverse_util

    config = pi0_config(model, "float32")
    params = nnx.state(config.create(jax.random.key(seed))).to_pure_dict()
    flat = {}
    for path, value in traverse_util.flatten_dict(params).items():
        array = np.asarray(value, np.float32)
        rng = np.random.default_rng([seed, zlib.crc32("/".join(path).encode())])
        std = _std(path, array)
        if std is not None:
            array = rng.standard_normal(array.shape, dtype=np.float32) * np.float32(std)
        lora = path[-1] in ("lora_a", "lora_b") or path[-1].endswith(("_lora_a", "_lora_b"))
        frozen = path[:2] == ("PaliGemma", "llm") and not lora
        flat[path] = array.astype(ml_dtypes.bfloat16) if frozen else array
    helpers.write_params(step_dir / "params", flat)
    assets = step_dir / "assets" / "small_robot"
    assets.mkdir(parents=True)
    (assets / "norm_stats.json").write_text('{"norm_stats": {}}')
    return flat


def observation(batch: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of openpi's ``Observation.from_dict``: three cameras, state, a prompt (padded), as numpy."""
    from openpi.models import model as _model

    rng = np.random.default_rng([seed, 1])
    images = {k: rng.uniform(-1, 1, (batch, 224, 224, 3)).astype(np.float32) for k in _model.IMAGE_KEYS}
    mask = np.ones((batch, MAX_TOKEN_LEN), bool)
    mask[:, MAX_TOKEN_LEN - 3 :] = False
    return {
        "image": images,
        "image_mask": {k: np.ones(batch, bool) for k in _model.IMAGE_KEYS},
        "state": rng.standard_normal((batch, ACTION_DIM)).astype(np.float32),
        "tokenized_prompt": rng.integers(0, 257_152, (batch, MAX_TOKEN_LEN)).astype(np.int32),
        "tokenized_prompt_mask": mask,
    }


def jax_actions(config, flat: dict, obs: dict, noise: np.ndarray) -> np.ndarray:
    """openpi's JAX ``Pi0`` (``config``) with ``flat`` as its params: ``sample_actions`` on ``obs`` from ``noise``."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util
    from openpi.models import model as _model

    model = config.load(traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}))
    observation = _model.Observation.from_dict(jax.tree.map(jnp.asarray, obs))
    return np.asarray(model.sample_actions(jax.random.key(0), observation, noise=jnp.asarray(noise)), np.float32)


def torch_model(config, weights: pathlib.Path):
    """openpi's ``load_pytorch``: ``PI0Pytorch(config)`` loaded strictly by ``safetensors.torch.load_model``."""
    return config.load_pytorch(types.SimpleNamespace(model=config), str(weights))


def torch_actions(model, obs: dict, noise: np.ndarray, num_steps: int = 10) -> np.ndarray:
    import torch
    from openpi.models import model as _model

    def tensor(x):
        return torch.from_numpy(np.ascontiguousarray(x))

    data = {k: {n: tensor(a) for n, a in v.items()} if isinstance(v, dict) else tensor(v) for k, v in obs.items()}
    # openpi's PyTorch policy hands the model channels-first images (Observation.from_dict permutes uint8 ones).
    data["image"] = {n: tensor(a.transpose(0, 3, 1, 2)) for n, a in obs["image"].items()}
    observation = _model.Observation.from_dict(data)
    model.eval()
    with torch.no_grad():
        actions = model.sample_actions("cpu", observation, noise=tensor(noise), num_steps=num_steps)
    return actions.to(torch.float32).numpy()
