"""openpi's checkpoint layout, as far as the merger depends on it: one place for every fact about openpi's tree.

Read off openpi's source (models/gemma.py, gemma_fast.py, lora.py, pi0.py, pi0_config.py, pi0_fast.py,
training/checkpoints.py). Every other module imports these facts from here; none keeps a copy.

- Model families and their Gemma experts: ``MODELS``, ``MODEL_EXPERTS`` (the LoRA variants openpi's LoRA training
  configs use), ``EXPERT_SUFFIXES`` (the action expert's modules end in ``_1``).
- The params checkpoint: a single top-level key ``params`` (``PARAMS_KEY``); an ``nnx.State`` save ends every path in
  ``value`` (``VALUE_SUFFIX``).
- Which leaves are LoRA factors (``is_lora_leaf``) and which kernels carry them (``MODULE_KINDS``, the module table).
- openpi's stock Gemma variants and their ``LoRAConfig``s for "attn" and "ffn" (``STOCK_VARIANTS``).
- Training's directory layout ``<checkpoint_base_dir>/<config name>/<exp_name>/<step>`` (``train_config_from_path``).
- What tells the model families apart in a tree (``detect_model``).
- The camera slots pi0 and pi0.5 take, in the order the model sees them (``IMAGE_KEYS``, ``models/model.py``).
"""

import dataclasses
import pathlib
from collections.abc import Iterable

from openpi_merge import lora

MODELS = ("pi0", "pi05", "pi0_fast")
# The LoRA variants of each family's experts in openpi's LoRA fine-tune configs (e.g. pi0_libero_low_mem_finetune).
MODEL_EXPERTS: dict[str, dict[str, str]] = {
    "pi0": {"paligemma": "gemma_2b_lora", "action_expert": "gemma_300m_lora"},
    "pi05": {"paligemma": "gemma_2b_lora", "action_expert": "gemma_300m_lora"},
    "pi0_fast": {"paligemma": "gemma_2b_lora"},
}
# pi0's and pi0.5's image slots (openpi's model.IMAGE_KEYS): base camera, left wrist, right wrist. A slot an
# observation lacks is fed as a masked image, so the model always sees all three.
IMAGE_KEYS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
# openpi names the action expert's modules with this suffix (q_einsum_1, mlp_1, ...); PaliGemma's have none.
EXPERT_SUFFIXES = {"paligemma": "", "action_expert": "_1"}
# The shipped config of each family (openpi_merge/configs/<name>.py).
MODEL_CONFIGS = {"pi0": "pi0_lora", "pi05": "pi05_lora", "pi0_fast": "pi0_fast_lora"}
MODEL_TITLES = {"pi0": "pi0", "pi05": "pi0.5", "pi0_fast": "pi0-FAST"}

PARAMS_KEY = "params"
# A step dir as serving reads it: <step>/params (PARAMS_KEY) and <step>/assets/<asset_id>/norm_stats.json.
ASSETS_DIR = "assets"
NORM_STATS_FILE = "norm_stats.json"  # assets/<asset_id>/norm_stats.json: what openpi's server normalises with.
# What openpi-merge adds to a step dir it writes (openpi reads only params/ and assets/, so it ignores them): the
# provenance and the integrity manifest. A dir holding either is one of ours.
PROVENANCE_FILE = "openpi_merge.json"
MANIFEST_FILE = "openpi_merge_manifest.json"
# nnx.State saves every parameter as {"value": array}; openpi's restore_params strips it only when every path has it.
VALUE_SUFFIX = "value"

Path = tuple[str, ...]


def is_lora_leaf(path: Path) -> bool:
    """Whether a leaf is a LoRA factor: openpi names them ``lora_a``/``lora_b`` or ``<kernel>_lora_a``/``_lora_b``."""
    name = path[-1]
    return name in ("lora_a", "lora_b") or name.endswith(("_lora_a", "_lora_b"))


# The kernels openpi gives LoRA, with their forward equations (gemma.py and gemma_fast.py use the same ones, under the
# same paths below PaliGemma/llm/layers). FeedForward's gating kernel (2, D, F) is used as two plain dots x @ W[i]: the
# equation writes that as one einsum over the leading 2.
MODULE_KINDS: tuple[lora.ModuleKind, ...] = (
    lora.einsum_kind("q_einsum", "BTD,NDH->BTNH"),
    lora.einsum_kind("kv_einsum", "BSD,2KDH->2BSKH"),
    lora.einsum_kind("qkv_einsum", "BSD,3KDH->3BSKH"),
    lora.einsum_kind("attn_vec_einsum", "BTNH,NHD->BTD"),
    lora.feedforward_kind("gating_einsum", "BTD,2DF->2BTF"),
    lora.feedforward_kind("linear", "BTF,FD->BTD"),
)


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """One of openpi's ``LoRAConfig``s (models/lora.py): what training used; none of it is stored in a checkpoint."""

    rank: int
    alpha: float
    rslora: bool = False
    axes: tuple[int, int] = (-2, -1)


@dataclasses.dataclass(frozen=True)
class Variant:
    """A Gemma variant of openpi: its ``lora_configs`` for the attention ("attn") and MLP ("ffn") modules."""

    name: str
    attn: LoRASpec | None = None
    ffn: LoRASpec | None = None

    @property
    def has_lora(self) -> bool:
        return self.attn is not None or self.ffn is not None

    def lora(self, config: str) -> LoRASpec | None:
        """The LoRA config openpi applies to a module kind's ``lora_config`` name ("attn" or "ffn")."""
        return {"attn": self.attn, "ffn": self.ffn}[config]


def _stock(name: str, rank: int) -> Variant:
    return Variant(name, LoRASpec(rank, float(rank)), LoRASpec(rank, float(rank)))


# openpi's gemma.get_config / gemma_fast.get_config as released: used when openpi is not importable.
STOCK_VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (Variant("gemma_2b"), Variant("gemma_300m"), _stock("gemma_2b_lora", 16), _stock("gemma_300m_lora", 32))
}


def train_config_from_path(step_dir: pathlib.Path) -> str | None:
    """The config name in openpi training's ``<checkpoint_base_dir>/<config name>/<exp_name>/<step>``, if it fits."""
    parts = step_dir.parts
    if len(parts) < 4 or not step_dir.name.isdigit():
        return None
    return parts[-3]


def detect_model(paths: Iterable[Path]) -> str | None:
    """The model family a parameter tree belongs to, from its modules; None when it is no openpi tree.

    Two experts (modules suffixed ``_1`` in the language model) make pi0 or pi0.5; pi0.5's action expert has adaptive
    RMSNorm, plain ``Dense_0`` leaves under ``pre_attention_norm_1``/``pre_ffw_norm_1``/``final_norm_1``. A single
    expert with no action projections is gemma_fast's tree: pi0-FAST.
    """
    llm_modules, top = set(), set()
    for path in paths:
        top.add(path[0])
        if path[:2] == ("PaliGemma", "llm"):
            llm_modules.update(path[2:-1])
    if "PaliGemma" not in top:
        return None
    if any(module.endswith("_1") for module in llm_modules):
        return "pi05" if "Dense_0" in llm_modules else "pi0"
    return "pi0_fast" if "action_in_proj" not in top else None
