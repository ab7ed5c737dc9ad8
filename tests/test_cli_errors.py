"""Every expected mistake ends in one clear line on stderr, a documented exit code, no traceback and no output."""

import json
import shutil

import numpy as np
import pytest
from flax import traverse_util
from helpers import STEP_DIR_NAMES, file_hashes, merge, run_cli, write_params

from openpi_merge import errors
from openpi_merge.testing import synthetic

LLM = ("PaliGemma", "llm", "layers")


def _assert_fails(result, error: type[errors.MergeError], message: str):
    assert result.returncode == error.exit_code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("openpi-merge: error:")]
    assert len(lines) == 1, result.stderr
    assert message in lines[0], lines[0]


def _edited_checkpoint(tmp_path, edit, model="pi0"):
    """A pi0 params checkpoint written by Orbax after ``edit`` changed its flat param dict."""
    flat = traverse_util.flatten_dict(synthetic.make_params(model, "tiny"))
    edit(flat)
    write_params(tmp_path / "edited" / "params", flat)
    return tmp_path / "edited"


def test_missing_input(tmp_path):
    _assert_fails(merge(tmp_path / "nope", tmp_path / "out"), errors.InputError, "does not exist")


def test_not_an_orbax_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    _assert_fails(merge(tmp_path / "empty", tmp_path / "out"), errors.InputError, "is not an Orbax checkpoint")


def test_checkpoint_dir_instead_of_a_step_dir(tiny_checkpoint, tmp_path):
    step = tiny_checkpoint("pi0")
    _assert_fails(merge(step.parent, tmp_path / "out"), errors.InputError, f"pass one, e.g. {step}")


@pytest.mark.parametrize(
    "name", ["1000.orbax-checkpoint-tmp-7", "1000.orbax-checkpoint-tmp"], ids=["orbax-0.11", "orbax-0.12"]
)
def test_unfinished_orbax_save(tiny_checkpoint, tmp_path, name):
    unfinished = tmp_path / name
    shutil.copytree(tiny_checkpoint("pi0"), unfinished)
    _assert_fails(merge(unfinished, tmp_path / "out"), errors.InputError, "unfinished Orbax save")
    assert not (tmp_path / "out").exists()


def test_step_dir_whose_params_save_did_not_finish(tiny_checkpoint, tmp_path):
    step = tmp_path / "1000"
    shutil.copytree(tiny_checkpoint("pi0"), step)
    (step / "params").rename(step / "params.orbax-checkpoint-tmp-1712")
    result = merge(step, tmp_path / "out")
    _assert_fails(result, errors.InputError, "params.orbax-checkpoint-tmp-1712 is an unfinished")


def test_missing_reference_is_called_the_reference(tiny_checkpoint, tmp_path):
    result = merge(tiny_checkpoint("pi0"), tmp_path / "out", f"--config.reference={tmp_path / 'base'}")
    _assert_fails(result, errors.InputError, f"reference {tmp_path / 'base'} does not exist")


@pytest.mark.parametrize("damage", ["truncated-data", "garbled-metadata"])
def test_damaged_checkpoint(tiny_checkpoint, tmp_path, damage):
    step = tmp_path / "step"
    shutil.copytree(tiny_checkpoint("pi0"), step)
    if damage == "truncated-data":
        for data in (step / "params").glob("**/d/*"):
            data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    else:
        (step / "params" / "_METADATA").write_text('{"tree_metadata": {')
    result = merge(step, tmp_path / "out")
    _assert_fails(result, errors.InputError, "cannot read checkpoint")
    assert not (tmp_path / "out").exists()


def test_no_lora_leaves(tiny_checkpoint, tmp_path):
    assert merge(tiny_checkpoint("pi0"), tmp_path / "merged").returncode == 0
    _assert_fails(merge(tmp_path / "merged", tmp_path / "again"), errors.PlanError, "no LoRA leaves")


def test_lora_factor_without_its_partner(tmp_path):
    step = _edited_checkpoint(tmp_path, lambda flat: flat.pop((*LLM, "attn", "q_einsum", "lora_b")))
    _assert_fails(merge(step, tmp_path / "out"), errors.PlanError, "q_einsum/lora_a has no partner")


def test_lora_leaves_on_a_module_openpi_has_no_lora_for(tmp_path):
    def add_stray(flat):
        flat[("action_in_proj", "lora_a")] = np.ones((8, 2), np.float32)
        flat[("action_in_proj", "lora_b")] = np.ones((2, 32), np.float32)

    step = _edited_checkpoint(tmp_path, add_stray)
    _assert_fails(
        merge(step, tmp_path / "out"), errors.PlanError, "action_in_proj/lora_a is a LoRA leaf with no kernel"
    )


def test_misshapen_lora_factor(tmp_path):
    def misshape(flat):
        path = (*LLM, "mlp_1", "linear_lora_b")
        flat[path] = flat[path][..., :-1]

    step = _edited_checkpoint(tmp_path, misshape)
    _assert_fails(merge(step, tmp_path / "out"), errors.PlanError, "mlp_1/linear_lora_b has shape")


def test_rank_differs_from_the_named_variant(tiny_checkpoint, tmp_path):
    step = tiny_checkpoint("pi0")
    # The action expert was trained with rank 32; gemma_2b_lora's stock rank is 16.
    result = merge(step, tmp_path / "out", "--config.action_expert.variant=gemma_2b_lora")
    _assert_fails(result, errors.PlanError, "has LoRA rank 32 but action_expert.variant=gemma_2b_lora has attn rank 16")
    assert "--config.action_expert.alpha=ALPHA" in result.stderr
    assert "alpha=32" not in result.stderr  # No guessed alpha: alpha = rank would be 2x off for a changed rank alone.
    explicit = merge(
        step, tmp_path / "out", "--config.action_expert.variant=gemma_2b_lora", "--config.action_expert.alpha=32"
    )
    assert explicit.returncode == 0, explicit.stderr


def test_non_finite_values(tmp_path):
    def poison(flat):
        flat[(*LLM, "attn", "attn_vec_einsum", "lora_a")][0, 0, 0, 0] = np.nan

    step = _edited_checkpoint(tmp_path, poison)
    result = merge(step, tmp_path / "out")
    _assert_fails(result, errors.NumericsError, "attn_vec_einsum/w produced NaN or Inf")
    assert not (tmp_path / "out").exists()


def test_output_exists_unless_overwrite(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    (out / "params").mkdir(parents=True)  # An older checkpoint there.
    (out / "keep.txt").write_text("mine")
    _assert_fails(merge(tiny_checkpoint("pi0"), out), errors.OutputError, "already exists")
    assert (out / "keep.txt").read_text() == "mine"
    assert merge(tiny_checkpoint("pi0"), out, "--config.overwrite=True").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == STEP_DIR_NAMES


def test_output_inside_input(tiny_checkpoint, tmp_path):
    step = tmp_path / "step"
    shutil.copytree(tiny_checkpoint("pi0"), step)
    before = file_hashes(step)
    _assert_fails(merge(step, step / "merged"), errors.OutputError, "lies inside the input")
    _assert_fails(merge(step, tmp_path, "--config.overwrite=True"), errors.OutputError, "contains the input")
    assert file_hashes(step) == before


def test_action_expert_lora_with_a_single_expert_config(tiny_checkpoint, tmp_path):
    result = merge(tiny_checkpoint("pi0"), tmp_path / "out", model="pi0_fast")
    _assert_fails(result, errors.PlanError, "the checkpoint is a pi0 model")
    assert "use --config=pi0_lora" in result.stderr


def test_variant_without_lora_for_an_expert_that_has_it(tiny_checkpoint, tmp_path):
    result = merge(tiny_checkpoint("pi0"), tmp_path / "out", "--config.paligemma.variant=gemma_2b")
    _assert_fails(result, errors.PlanError, "use --config.paligemma.variant=gemma_2b_lora")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--config.paligemma.variant=gemma_7b_lora", "is not an openpi Gemma variant"),
        ("--config.dtype=float16", "dtype='float16' is not one of"),
        ("--config.paligemma.alpha=inf", "paligemma.alpha=inf must be a positive finite number"),
        ("--config.memory_budget_gb=inf", "memory_budget_gb=inf must be auto, none, or a positive finite number"),
        ("--config.no_such_field=1", "--config.no_such_field is not a config field"),
        (
            "--config.paligemma.alhpa=8",
            "--config.paligemma.alhpa is not a config field: did you mean --config.paligemma.alpha?",
        ),
        ("--config.overwrite=yes", "--config.overwrite=yes: a boolean takes True or False"),
        ("--config.paligemma.alpha=abc", "--config.paligemma.alpha=abc: could not convert string to float"),
    ],
)
def test_bad_config(tiny_checkpoint, tmp_path, override, message):
    _assert_fails(merge(tiny_checkpoint("pi0"), tmp_path / "out", override), errors.ConfigError, message)


def test_missing_config_fields_and_files(tmp_path):
    _assert_fails(run_cli("--config=configs/pi0_lora.py"), errors.ConfigError, "no input given")
    _assert_fails(run_cli("--config=configs/nope.py"), errors.ConfigError, "no such file")
    _assert_fails(run_cli("--config=nope"), errors.ConfigError, "no shipped config 'nope'; shipped: example, pi05_lora")
    _assert_fails(run_cli(), errors.ConfigError, "no config given")


def test_a_config_error_still_writes_the_report(tiny_checkpoint, tmp_path):
    report = tmp_path / "report.json"
    result = merge(tiny_checkpoint("pi0"), tmp_path / "out", "--config.dtype=float16", f"--config.report={report}")
    _assert_fails(result, errors.ConfigError, "dtype='float16' is not one of")
    document = json.loads(report.read_text())
    assert document["exit_code"] == errors.ConfigError.exit_code
    assert "dtype='float16'" in document["error"]
    assert not (tmp_path / "out").exists()


def _int8_kernel(flat):
    path = (*LLM, "mlp", "linear")
    flat[path] = np.clip(np.asarray(flat[path], np.float32) * 100, -127, 127).astype(np.int8)


@pytest.mark.parametrize(
    ("edit", "overrides", "message"),
    [
        (_int8_kernel, (), "mlp/linear is int8: openpi's LoRA kernels and factors are floating point"),
    ],
    ids=["int8-kernel"],
)
def test_inspect_and_the_merge_refuse_the_same_unmergeable_pair(tmp_path, edit, overrides, message):
    step = _edited_checkpoint(tmp_path, edit)
    inspected = run_cli("--config=configs/pi0_lora.py", f"--config.input={step}", "--config.mode=inspect", *overrides)
    assert inspected.returncode == errors.PlanError.exit_code, inspected.stdout
    assert message in inspected.stdout
    _assert_fails(merge(step, tmp_path / "out", *overrides), errors.PlanError, message)
    assert not (tmp_path / "out").exists()


def test_huge_finite_factors_are_called_an_overflow_not_non_finite_input(tmp_path):
    def inflate(flat):
        for name in ("lora_a", "lora_b"):
            path = (*LLM, "attn", "attn_vec_einsum", name)
            flat[path] = np.full_like(flat[path], 1e30)

    step = _edited_checkpoint(tmp_path, inflate)
    result = merge(step, tmp_path / "out")
    _assert_fails(result, errors.NumericsError, "attn_vec_einsum/w")
    assert "from finite LoRA factors" in result.stderr
    assert "the update overflows float32 or bfloat16" in result.stderr


def _rewrite_key(params_dir, suffix: str, edit) -> str:
    """Rewrites the value of the one key of the checkpoint's OCDBT database ending in ``suffix`` (TensorStore's kvstore,
    the layer Orbax writes through); the tree metadata stays intact. Returns the key."""
    import tensorstore as ts

    store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{params_dir}"}).result()
    (key,) = [k for k in store.list().result() if k.endswith(suffix.encode())]
    store.write(key, edit(store.read(key).result().value)).result()
    return key.decode()


@pytest.mark.parametrize("damage", ["truncated-chunk", "zarray-claims-more"])
def test_a_corrupt_chunk_of_a_lora_factor_is_exit_3_naming_it(tiny_checkpoint, tmp_path, damage):
    step = tmp_path / "step"
    shutil.copytree(tiny_checkpoint("pi0"), step)
    factor = "q_einsum.lora_a.value"
    if damage == "truncated-chunk":
        _rewrite_key(step / "params", f"{factor}/0.0.0.0", lambda data: data[: len(data) // 2])
    else:

        def claim_more(data: bytes) -> bytes:
            zarray = json.loads(data)
            zarray["chunks"] = [2 * c for c in zarray["chunks"]]
            return json.dumps(zarray).encode()

        _rewrite_key(step / "params", f"{factor}/.zarray", claim_more)
    result = merge(step, tmp_path / "out")
    _assert_fails(result, errors.InputError, "at parameter PaliGemma/llm/layers/attn/q_einsum/lora_a")
    assert not (tmp_path / "out").exists()


def test_an_input_whose_params_files_are_links_merges_like_a_copy(tiny_checkpoint, tmp_path):
    """Links inside the input's params/ are followed (a hub cache links every file into a blob store); only assets/,
    which is copied into the output, must hold regular files."""
    step, blobs = tmp_path / "snapshot", tmp_path / "blobs"
    shutil.copytree(tiny_checkpoint("pi0"), step)
    blobs.mkdir()
    for index, data in enumerate(sorted(p for p in (step / "params").rglob("*") if p.is_file())):
        shutil.move(data, blobs / str(index))
        data.symlink_to(blobs / str(index))
    linked, plain = merge(step, tmp_path / "linked"), merge(tiny_checkpoint("pi0"), tmp_path / "plain")
    assert linked.returncode == plain.returncode == 0, linked.stderr
    manifests = [json.loads((tmp_path / out / "openpi_merge_manifest.json").read_text()) for out in ("linked", "plain")]
    assert manifests[0]["params"] == manifests[1]["params"]
