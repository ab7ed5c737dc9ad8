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
    action_horizon: int | None = None  # The model config's, when it is an int.


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
        """openpi's TrainConfig ``name`` as a TrainSpec; None when openpi has no config of that name.

        Raises ConfigError, naming openpi's error, when openpi's code fails or answers something that is no
        TrainConfig.
        """
        call = f"openpi.training.config.get_config({name!r})"
        try:
            train = self.training_config.get_config(name)
        except (ValueError, KeyError):  # openpi raises ValueError("Config '...' not found").
            return None
        except Exception as e:  # openpi is user-editable code: any failure of it is one line, not a traceback.
            raise broken(call, e) from e
        try:
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
        except AttributeError as e:
            raise broken(call, e, "did not return a TrainConfig with a model") from e
        horizon = getattr(train.model, "action_horizon", None)
        horizon = horizon if type(horizon) is int and horizon > 0 else None
        return TrainSpec(name=name, model=model, variants=variants, action_horizon=horizon)

    def variant(self, model: str, name: str) -> openpi_layout.Variant | None:
        """The variant as openpi's own ``get_config`` builds it; None when openpi does not know the name.

        Raises ConfigError, naming openpi's error, when openpi's code fails or its LoRA configs are not numbers.
        """
        call = f"{self.gemma[model].__name__}.get_config({name!r})"
        try:
            gemma_config = self.gemma[model].get_config(name)
        except (ValueError, KeyError):  # openpi raises ValueError(f"Unknown variant: {variant}").
            return None
        except Exception as e:  # As in train_config.
            raise broken(call, e) from e
        if gemma_config is None:
            raise broken(call, None, "returned None")
        try:
            lora_configs = getattr(gemma_config, "lora_configs", None) or {}
            attn, ffn = lora_configs.get("attn"), lora_configs.get("ffn")
            return openpi_layout.Variant(
                name,
                attn=None if attn is None else _lora_spec(attn),
                ffn=None if ffn is None else _lora_spec(ffn),
            )
        except (AttributeError, TypeError, ValueError, IndexError) as e:
            raise broken(call, e, "returned LoRA configs whose rank, alpha or axes are not numbers") from e

    def describe_variant(self, model: str, name: str) -> str:
        return f"openpi: {self.gemma[model].__name__.rsplit('.', 1)[-1]}.get_config({name!r})"


def broken(call: str, error: BaseException | None, what: str = "failed") -> errors.ConfigError:
    """openpi's own code failing, as one line naming its error and the ways out."""
    reason = "" if error is None else f": {type(error).__name__}: {str(error).strip()[:200]}"
    return errors.ConfigError(
        f"openpi is importable here but {call} {what}{reason}; fix openpi, or pass the variants and alpha as "
        "--config.<expert>.* fields in an environment without openpi"
    )


def load() -> OpenPI | None:
    """openpi's config modules, or None when openpi is not importable here.

    Raises ConfigError naming openpi's error when importing it raises anything but ImportError (a broken openpi).
    """
    try:
        training_config = importlib.import_module(_TRAINING_CONFIG)
        gemma = {model: importlib.import_module(module) for model, module in _GEMMA.items()}
    except ImportError:
        return None
    except Exception as e:  # openpi's import runs its code: any failure of it is one line, not a traceback.
        raise broken(f"import {_TRAINING_CONFIG}", e) from e
    location = str(getattr(importlib.import_module("openpi"), "__file__", None) or "openpi")
    return OpenPI(training_config=training_config, gemma=gemma, location=location)
