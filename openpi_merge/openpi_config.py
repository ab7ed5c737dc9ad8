"""openpi's own settings, read from openpi itself when it is importable (the merger is meant to live in openpi's env).

openpi is never a dependency: ``load()`` imports it optionally and returns None without it. With it, a TrainConfig
name (``openpi.training.config.get_config(name)``) gives the model family and both experts' Gemma variants, and a
variant name (``openpi.models.gemma.get_config`` for pi0 and pi0.5, ``openpi.models.gemma_fast.get_config`` for
pi0-FAST) gives that variant's ``lora_configs``: so a user who edited openpi's tables is honoured with no flag.
"""

import dataclasses
import importlib
from types import ModuleType
from typing import Any

from openpi_merge import errors, openpi_layout

_TRAINING_CONFIG = "openpi.training.config"
_GEMMA = {"pi0": "openpi.models.gemma", "pi05": "openpi.models.gemma", "pi0_fast": "openpi.models.gemma_fast"}
# The TrainConfig.model fields naming each expert's variant (models/pi0_config.py, pi0_fast.py).
_VARIANT_FIELDS = {"paligemma": "paligemma_variant", "action_expert": "action_expert_variant"}


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """What an openpi TrainConfig says about the merge: its model family and each expert's Gemma variant name."""

    name: str
    model: str
    variants: dict[str, str]  # Keyed by expert field: "paligemma", "action_expert".


def _lora_spec(lora_config: Any) -> openpi_layout.LoRASpec:
    axes = tuple(int(a) for a in getattr(lora_config, "axes", (-2, -1)))
    return openpi_layout.LoRASpec(
        rank=int(lora_config.rank),
        alpha=float(lora_config.alpha),
        rslora=bool(getattr(lora_config, "rslora", False)),
        axes=(axes[0], axes[1]),
    )


@dataclasses.dataclass(frozen=True)
class OpenPI:
    """The imported openpi modules the merge reads; ``version`` names where they came from, for reports."""

    training_config: ModuleType
    gemma: dict[str, ModuleType]  # Keyed by model family.
    location: str

    def train_config(self, name: str) -> TrainSpec | None:
        """openpi's TrainConfig ``name`` as a TrainSpec; None when openpi has no config of that name."""
        try:
            train = self.training_config.get_config(name)
        except (ValueError, KeyError):  # openpi raises ValueError("Config '...' not found").
            return None
        model_type = getattr(train.model, "model_type", None)
        model = str(getattr(model_type, "value", model_type)).lower()
        if model not in openpi_layout.MODEL_EXPERTS:
            raise errors.ConfigError(
                f"train_config={name!r} is a {model} model; openpi-merge folds LoRA of "
                f"{', '.join(openpi_layout.MODELS)}"
            )
        variants = {
            field: str(getattr(train.model, _VARIANT_FIELDS[field])) for field in openpi_layout.MODEL_EXPERTS[model]
        }
        return TrainSpec(name=name, model=model, variants=variants)

    def variant(self, model: str, name: str) -> openpi_layout.Variant | None:
        """The variant as openpi's own ``get_config`` builds it; None when openpi does not know the name."""
        try:
            gemma_config = self.gemma[model].get_config(name)
        except (ValueError, KeyError):  # openpi raises ValueError(f"Unknown variant: {variant}").
            return None
        lora_configs = getattr(gemma_config, "lora_configs", None) or {}
        attn, ffn = lora_configs.get("attn"), lora_configs.get("ffn")
        return openpi_layout.Variant(
            name,
            attn=None if attn is None else _lora_spec(attn),
            ffn=None if ffn is None else _lora_spec(ffn),
        )

    def describe_variant(self, model: str, name: str) -> str:
        return f"openpi: {self.gemma[model].__name__.rsplit('.', 1)[-1]}.get_config({name!r})"


def load() -> OpenPI | None:
    """openpi's config modules, or None when openpi is not importable here."""
    try:
        training_config = importlib.import_module(_TRAINING_CONFIG)
        gemma = {model: importlib.import_module(module) for model, module in _GEMMA.items()}
    except ImportError:
        return None
    location = str(getattr(importlib.import_module("openpi"), "__file__", None) or "openpi")
    return OpenPI(training_config=training_config, gemma=gemma, location=location)
