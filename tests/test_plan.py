"""The plan (openpi_merge/plan.py), from metadata alone: what it refuses, so that inspect and the merge agree."""

import dataclasses

import numpy as np

from openpi_merge import config, plan
from openpi_merge.testing import synthetic

LLM = ("PaliGemma", "llm", "layers")


def _planned(model: str, edit) -> plan.Plan:
    """The plan of a tiny checkpoint's leaves after ``edit`` (shapes only: Orbax cannot even write such a tree)."""
    specs = synthetic.param_specs(model, "tiny", lora=True)
    leaves = {
        tuple(name.split("/")): plan.Leaf(tuple(name.split("/")), spec.shape, np.dtype(spec.dtype))
        for name, spec in specs.items()
    }
    edit(leaves)
    cfg = config.make_config(model)
    cfg.input, cfg.output, cfg.paligemma.alpha = "in", "out", 16.0
    return plan.make_plan(leaves, config.read_settings(cfg, openpi=None))


def _resized(leaves, path, axis: int, size: int) -> None:
    shape = list(leaves[path].shape)
    shape[axis] = size
    leaves[path] = dataclasses.replace(leaves[path], shape=tuple(shape))


def test_an_attention_lora_of_rank_0_with_an_explicit_alpha_is_a_plan_problem():
    def rank_0(leaves):
        _resized(leaves, (*LLM, "attn", "q_einsum", "lora_a"), -1, 0)
        _resized(leaves, (*LLM, "attn", "q_einsum", "lora_b"), -3, 0)

    problems = _planned("pi0", rank_0).problems
    assert any("LoRA rank 0 is no adapter" in p for p in problems), problems


def test_a_zero_size_kept_leaf_is_a_plan_problem():
    def empty(leaves):
        path = ("action_in_proj", "kernel")
        leaves[path] = dataclasses.replace(leaves[path], shape=(0, leaves[path].shape[1]))

    problems = _planned("pi0", empty).problems
    assert any("action_in_proj/kernel has shape (0," in p and "no elements" in p for p in problems), problems
