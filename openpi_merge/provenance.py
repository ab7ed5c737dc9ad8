"""Provenance of a merged checkpoint: what made it, from what, with which LoRA settings and where each came from.

Written as ``openpi_merge.json`` into the output step dir (openpi reads only ``params/`` and ``assets/``, so it ignores
the file), and the same object goes into the JSON report. Alpha and rslora are not stored in a LoRA checkpoint: this
file is the record of what the merge assumed, and on whose word (checkpoint shape, openpi's config, command line, or
openpi's stock default).
"""

import datetime
import json
import pathlib
from typing import Any

from openpi_merge import __version__, lora, openpi_layout, plan, storage

FILENAME = openpi_layout.PROVENANCE_FILE
_FOUND = {"command line": "named on the command line", "input path": "found in the input path"}


def _one(values: set) -> Any:
    """The single value of a set, or the sorted list when pairs disagree (e.g. a rank that differs by module)."""
    return next(iter(values)) if len(values) == 1 else sorted(values)


def experts(merge_plan: plan.Plan) -> dict[str, dict]:
    """Per expert: the variant and, per openpi LoRA config ("attn", "ffn"), rank, alpha, rslora, scale, sources."""
    settings = merge_plan.settings
    if settings is None:
        return {}
    described = {}
    for expert in settings.experts.values():
        pairs = [p for p in merge_plan.pairs if p.expert == expert.field]
        entry: dict[str, Any] = {"variant": expert.variant.name, "variant_source": expert.sources["variant"]}
        for config_name in ("attn", "ffn"):
            own = [p for p in pairs if p.kind.lora_config == config_name]
            spec = expert.variant.lora(config_name)
            if not own:
                continue
            part: dict[str, Any] = {
                "rank": _one({p.rank for p in own}),
                "rank_source": "checkpoint shape",
                "variant_rank": None if spec is None else spec.rank,
            }
            if config_name == "attn":
                part |= {
                    "alpha": expert.alpha,
                    "alpha_source": expert.sources["alpha"],
                    "rslora": expert.rslora,
                    "rslora_source": expert.sources["rslora"],
                    "lora_axes": list(expert.lora_axes),
                    "lora_axes_source": expert.sources["lora_axes"],
                    "scale": _one({p.scale for p in own}),
                }
            else:
                part |= {
                    "scale": 1.0,
                    "scale_source": "openpi's FeedForward adds its LoRA unscaled",
                    "axes": list(lora.FEEDFORWARD_AXES),
                }
            entry[config_name] = part
        described[expert.field] = entry
    return described


def settings_lines(merge_plan: plan.Plan) -> list[str]:
    """One line per expert saying where each LoRA setting came from, for the summary and the inspect plan."""
    settings = merge_plan.settings
    if settings is None:
        return []
    lines = []
    if settings.train_config:
        lines.append(
            f"settings from openpi train_config {settings.train_config} ({_FOUND[settings.train_config_source]})"
        )
    elif settings.openpi is None:
        lines.append("openpi is not importable here: LoRA settings from the built-in table of openpi's stock variants")
    for field, entry in experts(merge_plan).items():
        parts = [f"{field}: {entry['variant']} ({entry['variant_source']})"]
        if attn := entry.get("attn"):
            parts.append(
                f"attn rank {attn['rank']} (checkpoint), alpha {attn['alpha']:g} ({attn['alpha_source']}), "
                f"rslora {attn['rslora']} ({attn['rslora_source']}), scale {attn['scale']}"
            )
        if ffn := entry.get("ffn"):
            parts.append(f"ffn rank {ffn['rank']} (checkpoint), unscaled")
        lines.append("; ".join(parts))
    return lines


def make(merge_plan: plan.Plan, *, input_path: pathlib.Path, output: pathlib.Path, asset_ids: list[str]) -> dict:
    """The provenance document of a merge; ``asset_ids``: the ``assets/<asset_id>/`` dirs carried to the output."""
    settings = merge_plan.settings
    return {
        "tool": "openpi-merge",
        "version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "input": str(input_path),
        "output": str(output),
        "model": merge_plan.model,
        "train_config": None
        if settings is None or not settings.train_config
        else {"name": settings.train_config, "source": settings.train_config_source},
        "openpi": None if settings is None else settings.openpi,
        "experts": experts(merge_plan),
        "dtypes": sorted({f"{p.kernel.dtype.name}->{p.out_dtype.name}" for p in merge_plan.pairs}),
        "pairs": len(merge_plan.pairs),
        "assets": asset_ids,
    }


def write(step_dir: storage.AnyPath, document: dict) -> dict:
    """Writes the document into the step dir being staged (which is committed whole, or not at all); returns it."""
    (step_dir / FILENAME).write_text(json.dumps(document, indent=2) + "\n")
    return document
