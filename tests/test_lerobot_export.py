"""The LeRobot export (openpi_merge.lerobot_export).

Two tiers. The numpy tier runs in the normal suite: files written, ``config.json``'s fields, the key set derived from
torch_export's, the norm stats converted for both modes, the refusals. The framework tier needs LeRobot 0.6.1 and
torch (scripts/lerobot_tier.sh builds the venv) and skips with the reason where they are absent: LeRobot's own
``PI0Policy`` / ``PI05Policy.from_pretrained`` load every key of the export of a small merged tree (and the loaded
weights equal the file's: its load prints a warning and returns a random policy on any failure), its processors load
from the directory and equal what LeRobot itself saves, and its actions equal openpi's ``PI0Pytorch``'s on the same
weights, inputs and noise. openpi's model runs in the torch tier's Python (``$OPENPI_MERGE_TORCH_PYTHON``), as its
transformers cannot share a venv with LeRobot's; without it that comparison skips with the reason.
"""

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import pathlib
import subprocess
import sys

import helpers
import ml_dtypes
import numpy as np
import openpi_torch
import pytest
from flax import traverse_util

from openpi_merge import errors, openpi_layout
from openpi_merge import lerobot_export as le
from openpi_merge import torch_export as te
from openpi_merge.openpi_layout import is_lora_leaf
from openpi_merge.testing import synthetic

BF16, F32 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)
REPO = pathlib.Path(__file__).resolve().parents[1]
LM_HEAD = "model.paligemma_with_expert.paligemma.lm_head.weight"
EMBED = "model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
FILES = {
    "pi0": [
        "model.safetensors",
        "config.json",
        "policy_preprocessor.json",
        "policy_postprocessor.json",
        "policy_preprocessor_step_6_normalizer_processor.safetensors",
        "policy_postprocessor_step_0_unnormalizer_processor.safetensors",
    ],
    "pi05": [
        "model.safetensors",
        "config.json",
        "policy_preprocessor.json",
        "policy_postprocessor.json",
        "policy_preprocessor_step_3_normalizer_processor.safetensors",
        "policy_postprocessor_step_0_unnormalizer_processor.safetensors",
    ],
}


def _norm_stats(step_dir: pathlib.Path) -> dict:
    (path,) = (step_dir / "assets").glob("*/norm_stats.json")
    return le.read_norm_stats(path)


@pytest.fixture(scope="module")
def export(tiny_checkpoint):
    """Per (model, dtype): the tiny merged-shaped tree (LoRA leaves dropped), its torch_export tensors, the norm
    stats, and a function writing the LeRobot export of them into a fresh dir with given overrides."""

    def get(model: str, tmp_path: pathlib.Path, **kwargs) -> dict:
        step = tiny_checkpoint(model)
        tree = {p: a for p, a in helpers.restore_flat(step / "params").items() if not is_lora_leaf(p)}
        tensors = te.state_dict(tree, model, "float32")
        args = {
            "model": model,
            "norm_stats": _norm_stats(step),
            "action_dim": 8,
            "action_horizon": 5,
            "state_dim": None,
            "image_keys": None,
            "paligemma_variant": "gemma_2b_lora",
            "action_expert_variant": "gemma_300m_lora",
            "dtype": "bfloat16",
        } | kwargs
        out = tmp_path / "lerobot"
        out.mkdir()
        with helpers.lerobot_sized_like(synthetic.model_dims(model, "tiny")):
            written = le.write(out, tensors, **args)
        return {"tree": tree, "tensors": tensors, "args": args, "dir": out, "written": written}

    return get


# --- numpy tier -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["pi0", "pi05"])
def test_files_and_config(export, model, tmp_path):
    run = export(model, tmp_path)
    assert run["written"] == FILES[model]
    assert sorted(p.name for p in run["dir"].iterdir()) == sorted(FILES[model])
    config = json.loads((run["dir"] / "config.json").read_text())
    images = {f"observation.images.{k}": {"type": "VISUAL", "shape": [3, 224, 224]} for k in openpi_layout.IMAGE_KEYS}
    assert list(config["input_features"]) == [*images, "observation.state"]  # The order the model sees them.
    assert config["input_features"] == images | {"observation.state": {"type": "STATE", "shape": [8]}}
    assert config["output_features"] == {"action": {"type": "ACTION", "shape": [7]}}  # The action stats' length.
    mode = {"pi0": "MEAN_STD", "pi05": "QUANTILES"}[model]
    assert config["normalization_mapping"] == {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode}
    want = {
        "type": model,
        "chunk_size": 5,
        "n_action_steps": 5,
        "max_state_dim": 8,
        "max_action_dim": 8,
        "dtype": "bfloat16",
        "paligemma_variant": "gemma_2b",
        "action_expert_variant": "gemma_300m",
        "device": None,
        "push_to_hub": False,
        "tokenizer_max_length": {"pi0": 48, "pi05": 200}[model],
        "image_resolution": [224, 224],
    }
    assert {k: config[k] for k in want} == want
    pre = json.loads((run["dir"] / "policy_preprocessor.json").read_text())
    post = json.loads((run["dir"] / "policy_postprocessor.json").read_text())
    assert pre["name"] == "policy_preprocessor"
    assert post["name"] == "policy_postprocessor"
    (normalizer,) = [s for s in pre["steps"] if s["registry_name"] == "normalizer_processor"]
    assert normalizer["config"]["features"] == config["input_features"] | config["output_features"]
    assert normalizer["config"]["norm_map"] == config["normalization_mapping"]
    assert post["steps"][0]["registry_name"] == "unnormalizer_processor"
    assert post["steps"][0]["config"]["features"] == config["output_features"]
    assert {s["state_file"] for s in (*pre["steps"], *post["steps"]) if "state_file" in s} == set(FILES[model][4:])


def test_fewer_cameras_leave_lerobots_empty_camera_slots(export, tmp_path):
    run = export("pi0", tmp_path, image_keys=["top", "wrist"], state_dim=6)
    config = json.loads((run["dir"] / "config.json").read_text())
    image = {"type": "VISUAL", "shape": [3, 224, 224]}
    assert config["empty_cameras"] == 1
    assert config["input_features"] == {
        "observation.images.top": image,
        "observation.images.wrist": image,
        "observation.images.empty_camera_0": image,  # As LeRobot's validate_features adds it, after the given ones.
        "observation.state": {"type": "STATE", "shape": [6]},
    }
    pre = json.loads((run["dir"] / "policy_preprocessor.json").read_text())
    (normalizer,) = [s for s in pre["steps"] if s["registry_name"] == "normalizer_processor"]
    assert normalizer["config"]["features"] == config["input_features"] | config["output_features"]


@pytest.mark.parametrize("model", ["pi0", "pi05"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_keys_values_and_dtypes(export, model, dtype, tmp_path):
    import safetensors.numpy

    run = export(model, tmp_path, dtype=dtype)
    back = safetensors.numpy.load_file(run["dir"] / "model.safetensors")
    # Every key of openpi's PyTorch layout with LeRobot's "model." prefix, and PaliGemma's lm_head (untied in LeRobot).
    assert set(back) == {f"model.{k}" for k in te.expected(run["tree"], model)} | {LM_HEAD}
    for key, tensor in run["tensors"].items():  # The values, rounded to the stored dtype.
        stored = back[f"model.{key}"]
        assert np.array_equal(stored, tensor.astype(stored.dtype)), key
    assert np.array_equal(back[LM_HEAD], back[EMBED])
    for key, tensor in back.items():
        keep = any(s in key for s in ("vision_tower", "multi_modal_projector", "layernorm", "model.norm"))
        keep |= not key.startswith("model.paligemma_with_expert.")
        assert tensor.dtype == (F32 if dtype == "float32" or keep else BF16), key
    assert {k: v.dtype for k, v in le.policy_state_dict(run["tensors"], dtype).items()} == {
        k: v.dtype for k, v in back.items()
    }


@pytest.mark.parametrize("model", ["pi0", "pi05"])
def test_norm_stats_converted_in_the_models_mode(export, model, tmp_path):
    import safetensors.numpy

    run = export(model, tmp_path, state_dim=6)
    stats = run["args"]["norm_stats"]["norm_stats"]
    config = json.loads((run["dir"] / "config.json").read_text())
    assert config["input_features"]["observation.state"]["shape"] == [6]
    for name in FILES[model][4:]:
        flat = safetensors.numpy.load_file(run["dir"] / name)
        want = {f"observation.state.{s}": np.float32(stats["state"][s])[:6] for s in ("mean", "std", "q01", "q99")}
        want |= {f"action.{s}": np.float32(stats["actions"][s]) for s in ("mean", "std", "q01", "q99")}
        assert set(flat) == set(want), name
        for key, value in want.items():
            assert flat[key].dtype == F32
            assert np.array_equal(flat[key], value), (name, key)
    # The stats the mode needs are the ones that must be there: pi0 reads mean/std, pi0.5 q01/q99.
    for stat in ("mean", "std", "q01", "q99"):
        changed = json.loads(json.dumps(run["args"]["norm_stats"]))
        changed["norm_stats"]["actions"][stat] = None
        needed = stat in {"pi0": ("mean", "std"), "pi05": ("q01", "q99")}[model]
        if needed:
            with pytest.raises(errors.PlanError, match=f"actions have no {stat}"):
                le.convert_norm_stats(changed, model)
        else:
            assert stat not in le.convert_norm_stats(changed, model)["action"]


MALFORMED = {
    "not a mapping": ([1, 2], 'expected {"norm_stats"'),
    "no norm_stats key": ({"state": {}}, 'expected {"norm_stats"'),
    "stats not a mapping": ({"norm_stats": {"state": [1.0], "actions": {}}}, "state is not a mapping"),
    "a string": ({"norm_stats": {"state": {"mean": "0", "std": [1.0]}}}, r"state\.mean is not a non-empty list"),
    "empty": ({"norm_stats": {"state": {"mean": [], "std": []}}}, r"state\.mean is not a non-empty list"),
    "nested": ({"norm_stats": {"state": {"mean": [[1.0]], "std": [1.0]}}}, "not a finite number"),
    "nan": ({"norm_stats": {"state": {"mean": [float("nan")], "std": [1.0]}}}, "not a finite number"),
    "overflow": ({"norm_stats": {"state": {"mean": [1e39], "std": [1.0]}}}, "beyond float32's range"),
    "lengths": ({"norm_stats": {"state": {"mean": [0.0, 1.0], "std": [1.0]}}}, "differ in length"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_norm_stats_are_input_errors(case):
    stats, message = MALFORMED[case]
    with pytest.raises(errors.InputError, match=message) as info:
        le.convert_norm_stats(stats, "pi0")
    assert "\n" not in str(info.value)


def test_missing_norm_stats_are_plan_errors(tmp_path):
    for stats, message in (
        (None, "no norm stats: the export needs openpi's norm_stats.json"),
        ({"norm_stats": {}}, "no 'state': pi0 normalises it by MEAN_STD"),
        ({"norm_stats": {"state": {"mean": [0.0], "std": [1.0]}}}, "no 'actions'"),
    ):
        with pytest.raises(errors.PlanError, match=message) as info:
            le.convert_norm_stats(stats, "pi0")
        assert "\n" not in str(info.value)
    with pytest.raises(errors.PlanError, match=r"no norm stats at .*missing\.json"):
        le.read_norm_stats(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"norm_stats": ')
    with pytest.raises(errors.InputError, match=r"malformed norm stats .*bad\.json: not JSON") as info:
        le.read_norm_stats(tmp_path / "bad.json")
    assert "\n" not in str(info.value)
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe")
    with pytest.raises(errors.InputError, match="not JSON"):
        le.read_norm_stats(tmp_path / "binary.json")


def test_write_refusals(export, tiny_checkpoint, tmp_path):
    run = export("pi05", tmp_path)
    tensors, args = run["tensors"], run["args"]
    dims = synthetic.model_dims("pi05", "tiny")

    def refused(error, message, *, directory=None, tensors=tensors, variants=dims, **changes):
        out = directory
        if out is None:
            out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
            out.mkdir()
        with helpers.lerobot_sized_like(variants), pytest.raises(error, match=message) as info:
            le.write(out, tensors, **(args | changes))
        assert "\n" not in str(info.value)
        assert directory is not None or not any(out.iterdir())  # Nothing written.

    refused(errors.OutputError, "is not empty", directory=run["dir"])
    refused(errors.OutputError, "not an existing directory", directory=tmp_path / "absent")
    refused(errors.PlanError, "model=pi0 but the tensors are pi0.5's", model="pi0")
    refused(errors.ConfigError, "model 'pi0_fast'", model="pi0_fast")
    refused(errors.ConfigError, "dtype 'float16'", dtype="float16")
    refused(errors.ConfigError, "variant 'gemma_2b_fast'", paligemma_variant="gemma_2b_fast")
    refused(errors.PlanError, r"action_dim=16 but action_in_proj takes 8", action_dim=16)
    refused(errors.InputError, "state_dim 9 does not fit", state_dim=9)
    refused(
        errors.InputError,
        "7 action values, the model has action_dim 6",
        action_dim=6,
        state_dim=6,
        tensors={
            **tensors,
            "action_in_proj.weight": tensors["action_in_proj.weight"][:, :6],
        },
    )
    refused(errors.PlanError, "no norm stats", norm_stats=None)
    refused(errors.ConfigError, "must be 1 to 3 distinct names", image_keys=["base_0_rgb", "base_0_rgb"])
    refused(errors.ConfigError, "must be 1 to 3 distinct names", image_keys=[])
    refused(errors.ConfigError, "must be 1 to 3 distinct names", image_keys=["a", "b", "c", "d"])
    # LeRobot's real variants: the tiny tree is not gemma_2b (its load would silently keep random weights).
    full = synthetic.model_dims("pi05", "full")
    refused(
        errors.PlanError, "PaliGemma language model is not LeRobot's gemma_2b: depth 2, gemma_2b has 18", variants=full
    )
    refused(errors.PlanError, "SigLIP has 2 layers", variants=dataclasses.replace(dims, siglip=full.siglip))
    with pytest.raises(errors.PlanError, match="not openpi's PyTorch layout: no"):
        le.policy_state_dict({k: v for k, v in tensors.items() if "embed_tokens" not in k})
    with pytest.raises(errors.PlanError, match="openpi's layout leaves it out"):
        le.policy_state_dict({**tensors, LM_HEAD.removeprefix("model."): tensors[EMBED.removeprefix("model.")]})


# --- framework tier: LeRobot's own policies and processors ----------------------------------------------------------


def _unavailable() -> str | None:
    for module in ("torch", "lerobot", "transformers"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (scripts/lerobot_tier.sh builds the venv this tier needs)"
    import lerobot

    if not lerobot.__version__.startswith("0.6."):
        return f"the export writes LeRobot 0.6.x's format, this is lerobot {lerobot.__version__}"
    return None


_UNAVAILABLE = _unavailable()
framework = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"framework tier: {_UNAVAILABLE}")

# openpi_torch's small variants (8 heads, as LeRobot and openpi hard-code 8 * head_dim), at the vocabulary and image
# size both models fix, so that openpi's PI0Pytorch with tests/openpi_torch.py's variants is the reference.
_SMALL = {
    "paligemma": synthetic.GemmaDims(**openpi_torch.GEMMA[openpi_torch.PALIGEMMA], rank=16),
    "action_expert": synthetic.GemmaDims(**openpi_torch.GEMMA[openpi_torch.EXPERT], rank=32),
    "siglip": synthetic.SiglipDims(**openpi_torch.SIGLIP, num_patches=(224 // openpi_torch.SIGLIP["patch_size"]) ** 2),
}
ACTION_DIM, HORIZON, TOKENS = openpi_torch.ACTION_DIM, openpi_torch.ACTION_HORIZON, openpi_torch.MAX_TOKEN_LEN
# Tolerances on the actions relative to the largest |action| of openpi's model (same weights, inputs, noise), over 2
# layers of 2 experts and SigLIP, per number of Euler steps. float32: 2 steps (dt = -1/2, exact) 4 float32 ulps
# (measured: 0, bit for bit); LeRobot's default 10 steps 1024 ulps (measured: under 200; openpi accumulates
# ``time += dt`` in float32, LeRobot's euler_integrate computes ``1 + step * dt``, so the time embeddings differ by
# float32 rounding). bfloat16: 2 bfloat16 ulps (LeRobot keeps SigLIP float32, openpi casts it to bfloat16; measured:
# under 1.2, the inputs being fixed). The control must miss by more than 10 times the 10-step tolerance.
STEPS = (2, 10)
TOLERANCE = {"float32": {2: 4 * 2.0**-24, 10: 1024 * 2.0**-24}, "bfloat16": {2: 2 * 2.0**-8, 10: 2 * 2.0**-8}}


class _Tokenizer:
    """Stands for the PaliGemma tokenizer that LeRobot's tokenizer step loads from the Hub (none here)."""

    name_or_path = "google/paligemma-3b-pt-224"


@pytest.fixture(scope="module")
def lerobot_small():
    """LeRobot's pi0/pi05 with the small Gemma variants (under LeRobot's names) and SigLIP, inside the ``with``; the
    tokenizer step's Hub load replaced; lerobot_export's tables and synthetic's tiny dims set to the same."""
    from lerobot.policies.pi0 import modeling_pi0
    from lerobot.policies.pi05 import modeling_pi05
    from lerobot.processor import tokenizer_processor

    small = {"gemma_2b": _SMALL["paligemma"], "gemma_300m": _SMALL["action_expert"]}
    dims = {
        model: dataclasses.replace(
            synthetic.model_dims(model, "tiny"), vocab_size=257_152, action_dim=ACTION_DIM, **_SMALL
        )
        for model in ("pi0", "pi05")
    }
    with pytest.MonkeyPatch.context() as patch:
        for module in (modeling_pi0, modeling_pi05):

            def gemma_config(variant, module=module):
                return module.GemmaConfig(**helpers.gemma_fields(small[variant]))

            def paligemma(config, cls=module.PaliGemmaForConditionalGenerationWithPiGemma):
                vision, s = config.vision_config, openpi_torch.SIGLIP
                vision.hidden_size, vision.intermediate_size = s["width"], s["mlp_dim"]
                vision.num_hidden_layers, vision.num_attention_heads = s["depth"], s["num_heads"]
                vision.patch_size, vision.projection_dim = s["patch_size"], config.text_config.hidden_size
                return cls(config=config)

            patch.setattr(module, "get_gemma_config", gemma_config)
            patch.setattr(module, "PaliGemmaForConditionalGenerationWithPiGemma", paligemma)
        patch.setattr(tokenizer_processor.AutoTokenizer, "from_pretrained", staticmethod(lambda *a, **k: _Tokenizer()))
        patch.setattr(synthetic, "model_dims", lambda model, scale, **kw: dims[model])
        with helpers.lerobot_sized_like(dims["pi0"]):
            yield dims


def _observation(batch: int) -> tuple[dict, np.ndarray]:
    """openpi's observation (tests/openpi_torch.py's) with images that are exact both as LeRobot's [0, 1] ones and,
    times 2 minus 1, as openpi's [-1, 1] ones; and the noise."""
    rng = np.random.default_rng(11)
    keys = openpi_layout.IMAGE_KEYS
    obs = {
        "image": {k: (rng.integers(0, 257, (batch, 224, 224, 3)) / 128 - 1).astype(np.float32) for k in keys},
        "image_mask": {k: np.ones(batch, bool) for k in keys},
        "state": rng.standard_normal((batch, ACTION_DIM)).astype(np.float32),
        "tokenized_prompt": rng.integers(0, 257_152, (batch, TOKENS)).astype(np.int32),
        "tokenized_prompt_mask": np.arange(TOKENS)[None].repeat(batch, 0) < TOKENS - 3,
    }
    noise = rng.standard_normal((batch, HORIZON, ACTION_DIM)).astype(np.float32)
    return obs, noise


def _stats(state_dim: int, action_dim: int) -> dict:
    """openpi's norm_stats.json content with distinct values."""
    rng = np.random.default_rng(5)
    stats = {}
    for key, dim in (("state", state_dim), ("actions", action_dim)):
        mean, std = rng.standard_normal(dim), rng.uniform(0.1, 1.0, dim)
        stats[key] = {"mean": mean, "std": std, "q01": mean - 2.3 * std, "q99": mean + 2.2 * std}
        stats[key] = {s: v.tolist() for s, v in stats[key].items()}
    return {"norm_stats": stats}


def _lerobot_batch(obs: dict) -> dict:
    import torch

    batch = {
        f"observation.images.{k}": torch.from_numpy((v + 1) / 2).permute(0, 3, 1, 2) for k, v in obs["image"].items()
    }
    batch["observation.state"] = torch.from_numpy(obs["state"])
    batch["observation.language.tokens"] = torch.from_numpy(obs["tokenized_prompt"].astype(np.int64))
    batch["observation.language.attention_mask"] = torch.from_numpy(obs["tokenized_prompt_mask"])
    return batch


def _openpi_actions(weights: dict[str, pathlib.Path], obs: dict, noise: np.ndarray, tmp: pathlib.Path) -> dict:
    """openpi's PI0Pytorch's actions per model and dtype, run by the torch tier's Python (one process for all);
    skips where there is none."""
    python = os.environ.get("OPENPI_MERGE_TORCH_PYTHON", str(REPO / ".venvs" / "torch" / "bin" / "python"))
    if not pathlib.Path(python).is_file():
        pytest.skip(f"openpi's PyTorch model: no {python} (scripts/torch_tier.sh builds it; OPENPI_MERGE_TORCH_PYTHON)")
    flat = {"noise": noise, **{k: v for k, v in obs.items() if not isinstance(v, dict)}}
    flat |= {f"{group}/{k}": v for group in ("image", "image_mask") for k, v in obs[group].items()}
    np.savez(tmp / "inputs.npz", **flat)
    jobs = [f"{model}:{path}:{tmp / f'actions-{model}.npz'}" for model, path in weights.items()]
    script, steps = str(REPO / "tests" / "openpi_torch_reference.py"), ",".join(map(str, STEPS))
    args = [python, script, ",".join(TOLERANCE), steps, str(tmp / "inputs.npz")]
    result = subprocess.run([*args, *jobs], capture_output=True, text=True, check=False)
    if result.returncode == 3:
        pytest.skip(f"openpi's PyTorch model: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr[-3000:]
    return {model: dict(np.load(tmp / f"actions-{model}.npz")) for model in weights}


def _load(cls, directory: pathlib.Path):
    """``cls.from_pretrained(directory)`` and what it printed (it reports a failed load only there)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        policy = cls.from_pretrained(directory)
    return policy, out.getvalue()


@pytest.fixture(scope="module")
def merged_small(lerobot_small, tmp_path_factory):
    """Per model: a merged tree at lerobot_small's dims (synthetic's LoRA tree without its LoRA leaves), its
    torch_export tensors (float32), the inputs and noise, and openpi's PI0Pytorch's actions on them per dtype (None
    and the reason where openpi's model cannot run). Made for both models at once: one openpi process."""
    tmp = tmp_path_factory.mktemp("openpi")
    obs, noise = _observation(2)
    runs, weights = {}, {}
    for model in ("pi0", "pi05"):
        flat = traverse_util.flatten_dict(synthetic.make_params(model, "tiny", seed=3))
        tensors = te.state_dict({p: a for p, a in flat.items() if not is_lora_leaf(p)}, model, "float32")
        weights[model] = te.write(tmp / model, tensors, config_json={}) / te.SAFETENSORS_FILE
        runs[model] = {"tensors": tensors, "obs": obs, "noise": noise, "openpi": None, "why": None}
    try:
        for model, actions in _openpi_actions(weights, obs, noise, tmp).items():
            runs[model]["openpi"] = actions
    except pytest.skip.Exception as e:
        for run in runs.values():
            run["why"] = str(e)
    return runs


@framework
@pytest.mark.parametrize("model", ["pi0", "pi05"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lerobot_loads_the_export_and_its_actions_are_openpis(merged_small, model, dtype, tmp_path):
    import safetensors.numpy
    import torch
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.pi0.modeling_pi0 import PI0Policy
    from lerobot.policies.pi0.processor_pi0 import make_pi0_pre_post_processors
    from lerobot.policies.pi05.modeling_pi05 import PI05Policy
    from lerobot.policies.pi05.processor_pi05 import make_pi05_pre_post_processors
    from lerobot.processor import PolicyProcessorPipeline
    from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action

    policy_class = {"pi0": PI0Policy, "pi05": PI05Policy}[model]
    make_processors = {"pi0": make_pi0_pre_post_processors, "pi05": make_pi05_pre_post_processors}[model]
    run = merged_small[model]
    tensors = run["tensors"]
    norm_stats = _stats(ACTION_DIM, ACTION_DIM)
    out = tmp_path / "lerobot"
    out.mkdir()
    args = dict(
        model=model,
        norm_stats=norm_stats,
        action_dim=ACTION_DIM,
        action_horizon=HORIZON,
        state_dim=None,
        image_keys=None,
        paligemma_variant="gemma_2b_lora",
        action_expert_variant="gemma_300m_lora",
        dtype=dtype,
    )
    le.write(out, tensors, **args)

    # Every key loaded, nothing missing or unexpected, and the weights are the file's (not a random init).
    policy, printed = _load(policy_class, out)
    assert "All keys loaded successfully!" in printed, printed
    for failure in ("Warning", "Returning model without", "Remapped", "Missing keys", "Unexpected keys"):
        assert failure not in printed, printed
    written = safetensors.numpy.load_file(out / "model.safetensors")
    own = policy.state_dict()
    assert set(own) == set(written)
    for key, array in written.items():
        got = own[key]
        assert got.dtype == {BF16: torch.bfloat16, F32: torch.float32}[array.dtype], key
        assert torch.equal(got.float(), torch.from_numpy(array.astype(F32))), key
    assert policy.config.chunk_size == HORIZON
    assert policy.config.max_action_dim == ACTION_DIM
    assert tuple(policy.config.image_resolution) == (224, 224)

    # The processors load from the directory (the tokenizer through LeRobot's overrides hook), and are what LeRobot's
    # own factory saves for this config and these stats.
    tokenizer = {"tokenizer_processor": {"tokenizer": _Tokenizer()}}
    pre = PolicyProcessorPipeline.from_pretrained(out, "policy_preprocessor.json", overrides=tokenizer)
    post = PolicyProcessorPipeline.from_pretrained(
        out,
        "policy_postprocessor.json",
        to_transition=policy_action_to_transition,
        to_output=transition_to_policy_action,
    )
    # And as LeRobot's own scripts load a policy's processors (lerobot-eval, lerobot-record: --policy.path=DIR).
    factory_pre, factory_post = make_pre_post_processors(
        policy.config, pretrained_path=str(out), preprocessor_overrides=tokenizer
    )
    stats = le.convert_norm_stats(norm_stats, model)
    own_pre, own_post = make_processors(
        policy.config, {f: {s: torch.from_numpy(a) for s, a in v.items()} for f, v in stats.items()}
    )
    theirs = tmp_path / "theirs"
    for pipeline in (own_pre, own_post):
        pipeline.save_pretrained(theirs)
    (theirs / "policy").mkdir()
    policy.config._save_pretrained(theirs / "policy")  # What PI0Policy.save_pretrained writes as config.json.
    for name in ("policy_preprocessor.json", "policy_postprocessor.json"):
        assert json.loads((out / name).read_text()) == json.loads((theirs / name).read_text()), name
    for name in FILES[model][4:]:
        mine, lerobots = safetensors.numpy.load_file(out / name), safetensors.numpy.load_file(theirs / name)
        assert mine.keys() == lerobots.keys(), name
        assert all(np.array_equal(mine[k], lerobots[k]) for k in mine), name
    config, lerobots = (json.loads(p.read_text()) for p in (out / "config.json", theirs / "policy" / "config.json"))
    assert config.pop("device") is None
    assert lerobots.pop("device") == "cpu"
    assert config == lerobots
    mode = {"pi0": "MEAN_STD", "pi05": "QUANTILES"}[model]
    a = stats["action"]
    normalised = torch.linspace(-1, 1, ACTION_DIM)[None, None].repeat(1, HORIZON, 1)
    want = (
        normalised.numpy() * a["std"] + a["mean"]
        if mode == "MEAN_STD"
        else (normalised.numpy() + 1) / 2 * (a["q99"] - a["q01"]) + a["q01"]
    )
    np.testing.assert_allclose(post(normalised).numpy(), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(factory_post(normalised).numpy(), want, rtol=1e-6, atol=1e-6)
    flat_stats = {f"{f}.{s}": a for f, v in stats.items() for s, a in v.items()}
    for pipeline in (pre, factory_pre):  # The normaliser holds our stats, for state and actions.
        (normalizer,) = [s for s in pipeline.steps if type(s).__name__ == "NormalizerProcessorStep"]
        state = {k: v.numpy() for k, v in normalizer.state_dict().items()}
        assert state.keys() == flat_stats.keys()
        assert all(np.array_equal(state[k], flat_stats[k]) for k in state)

    # LeRobot's actions on the model's inputs equal openpi's PI0Pytorch's on the same weights, inputs and noise.
    if run["openpi"] is None:
        pytest.skip(run["why"])
    obs, noise = run["obs"], torch.from_numpy(run["noise"])
    error_by_steps = {}
    for steps in STEPS:
        want = run["openpi"][f"{dtype}-{steps}"]
        got = policy.predict_action_chunk(_lerobot_batch(obs), noise=noise, num_steps=steps).float().numpy()
        assert got.shape == want.shape
        scale = float(np.max(np.abs(want)))
        error_by_steps[steps] = float(np.max(np.abs(got - want))) / scale
    # The control: the same policy with one mapping fault (PaliGemma's layer-1 k and v projections swapped, as a
    # wrong slice of kv_einsum would) must miss openpi's actions by far more than the tolerance.
    attn = policy.model.paligemma_with_expert.paligemma.model.language_model.layers[1].self_attn
    with torch.no_grad():
        k = attn.k_proj.weight.clone()
        attn.k_proj.weight.copy_(attn.v_proj.weight)
        attn.v_proj.weight.copy_(k)
    control = policy.predict_action_chunk(_lerobot_batch(obs), noise=noise, num_steps=10).float().numpy()
    want = run["openpi"][f"{dtype}-10"]
    control_error = float(np.max(np.abs(control - want))) / float(np.max(np.abs(want)))
    line = (
        f"lerobot export {model} {dtype}: max|action| {scale:.3f}, LeRobot vs openpi PI0Pytorch (relative) "
        + ", ".join(f"{n} steps {e:.2e} (tolerance {TOLERANCE[dtype][n]:.2e})" for n, e in error_by_steps.items())
        + f", control {control_error:.2e}"
    )
    if os.environ.get("OPENPI_MERGE_LEROBOT_MEASUREMENTS"):  # scripts/lerobot_tier.sh prints these lines.
        with open(os.environ["OPENPI_MERGE_LEROBOT_MEASUREMENTS"], "a") as f:
            f.write(line + "\n")
    print(line, file=sys.stderr)
    for steps, error in error_by_steps.items():
        assert error <= TOLERANCE[dtype][steps], steps
    assert control_error > 10 * TOLERANCE[dtype][10]


@framework
@pytest.mark.parametrize("model", ["pi0", "pi05"])
def test_a_merge_with_two_cameras_loads_in_lerobot_and_acts_as_openpi_without_the_third(lerobot_small, model, tmp_path):
    """The whole run: a LoRA checkpoint (at lerobot_small's sizes) merged in this process into both exports, float32,
    with two of openpi's three camera slots named. LeRobot loads every key, lists the third slot as an empty camera,
    and its actions on a batch of the two cameras equal openpi's PI0Pytorch's on the PyTorch export with the third
    camera masked (how openpi feeds a camera an observation lacks)."""
    from lerobot.policies.pi0.modeling_pi0 import PI0Policy
    from lerobot.policies.pi05.modeling_pi05 import PI05Policy

    from openpi_merge import config, pipeline, report

    step = synthetic.write_checkpoint(tmp_path / "in", model, "tiny", seed=4)
    cfg = config.make_config(model)
    cfg.input, cfg.progress, cfg.export_dtype = str(step), False, "float32"
    cfg.pytorch_output, cfg.lerobot_output = str(tmp_path / "pytorch"), str(tmp_path / "lerobot")
    cfg.lerobot_image_keys, cfg.action_horizon = "top,wrist", HORIZON
    pipeline.merge(config.read_settings(cfg, openpi=None), report.Outcome(config={}), lambda: None)

    policy, printed = _load({"pi0": PI0Policy, "pi05": PI05Policy}[model], tmp_path / "lerobot")
    assert "All keys loaded successfully!" in printed, printed
    assert list(policy.config.image_features) == [f"observation.images.{k}" for k in ("top", "wrist", "empty_camera_0")]

    obs, noise = _observation(2)
    base, left, right = openpi_layout.IMAGE_KEYS
    obs["image"][right] = np.full_like(obs["image"][right], -1.0)
    obs["image_mask"][right] = np.zeros(2, bool)
    weights = {model: tmp_path / "pytorch" / te.SAFETENSORS_FILE}
    want = _openpi_actions(weights, obs, noise, tmp_path)[model]["float32-10"]
    batch = _lerobot_batch(obs)
    batch = {k: v for k, v in batch.items() if not k.startswith("observation.images.")} | {
        "observation.images.top": batch[f"observation.images.{base}"],
        "observation.images.wrist": batch[f"observation.images.{left}"],
    }
    import torch

    got = policy.predict_action_chunk(batch, noise=torch.from_numpy(noise), num_steps=10).float().numpy()
    # LeRobot cuts the model's padded actions to the action feature's length (the action stats': 7 of 8).
    want = want[..., : got.shape[-1]]
    error = float(np.max(np.abs(got - want))) / float(np.max(np.abs(want)))
    line = f"lerobot export {model} float32, merged with 2 cameras: LeRobot vs openpi PI0Pytorch (relative) {error:.2e}"
    if os.environ.get("OPENPI_MERGE_LEROBOT_MEASUREMENTS"):
        with open(os.environ["OPENPI_MERGE_LEROBOT_MEASUREMENTS"], "a") as f:
            f.write(line + "\n")
    assert error <= TOLERANCE["float32"][10], line
    # And a third camera matters: openpi with it unmasked acts differently (so the masked slot was what it saw).
    obs["image_mask"][right] = np.ones(2, bool)
    obs["image"][right] = obs["image"][base]
    unmasked = _openpi_actions(weights, obs, noise, tmp_path)[model]["float32-10"][..., : got.shape[-1]]
    assert float(np.max(np.abs(got - unmasked))) / float(np.max(np.abs(want))) > 10 * TOLERANCE["float32"][10]
