"""Settings from openpi itself (a stub openpi on PYTHONPATH), the command line's help, names and errors, rounding and
progress reporting."""

import dataclasses
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import time

import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from helpers import REPO, error_line, restore_flat, run_cli, write_params
from test_merge_end_to_end import _check_merged

from openpi_merge import config, errors, fuse, plan, progress, sharding, summary
from openpi_merge.testing import synthetic

CUSTOM = {"": 8.0, "_1": 64.0}  # Non-stock alphas at the stock ranks: the silent-alpha trap of issue 12.


def _write_stub_openpi(
    root: pathlib.Path, *, stock_alpha: float = 16.0, replace: dict[str, str] | None = None
) -> pathlib.Path:
    """A tiny fake openpi: the attributes openpi-merge reads, as openpi names them (training/config.py, models/);
    ``replace``: files to write instead (a broken openpi)."""
    files = {
        "openpi/__init__.py": "",
        "openpi/models/__init__.py": "",
        "openpi/models/lora.py": """
            import dataclasses

            @dataclasses.dataclass(frozen=True)
            class LoRAConfig:
                rank: int
                alpha: float = 1.0
                rslora: bool = False
                axes: tuple = (-2, -1)
                label: str = "L"
            """,
        "openpi/models/model.py": """
            import enum

            class ModelType(enum.Enum):
                PI0 = "pi0"
                PI0_FAST = "pi0_fast"
                PI05 = "pi05"
            """,
        "openpi/models/gemma.py": f"""
            import dataclasses
            from openpi.models import lora

            @dataclasses.dataclass
            class Config:
                width: int
                lora_configs: dict = dataclasses.field(default_factory=dict)

            def _lora(rank, alpha):
                config = lora.LoRAConfig(rank=rank, alpha=alpha)
                return {{"attn": config, "ffn": config}}

            def get_config(variant):
                if variant in ("gemma_2b", "gemma_300m"):
                    return Config(width=8)
                if variant == "gemma_2b_lora":
                    return Config(width=8, lora_configs=_lora(16, {stock_alpha}))
                if variant == "gemma_300m_lora":
                    return Config(width=8, lora_configs=_lora(32, 32.0))
                if variant == "gemma_2b_lora_a8":
                    return Config(width=8, lora_configs=_lora(16, 8.0))
                if variant == "gemma_300m_lora_a64":
                    return Config(width=8, lora_configs=_lora(32, 64.0))
                raise ValueError(f"Unknown variant: {{variant}}")
            """,
        "openpi/models/gemma_fast.py": """
            import types
            from openpi.models import lora

            def get_config(variant):
                if variant == "gemma_2b":
                    return types.SimpleNamespace(width=8)
                if variant == "gemma_2b_lora":
                    config = lora.LoRAConfig(rank=16, alpha=16.0)
                    return types.SimpleNamespace(width=8, lora_configs={"attn": config, "ffn": config})
                raise ValueError(f"Unknown variant: {variant}")
            """,
        "openpi/training/__init__.py": "",
        "openpi/training/config.py": """
            import dataclasses
            from openpi.models.model import ModelType

            @dataclasses.dataclass(frozen=True)
            class Pi0Config:
                paligemma_variant: str = "gemma_2b"
                action_expert_variant: str = "gemma_300m"
                pi05: bool = False

                @property
                def model_type(self):
                    return ModelType.PI05 if self.pi05 else ModelType.PI0

            @dataclasses.dataclass(frozen=True)
            class TrainConfig:
                name: str
                model: Pi0Config
                exp_name: str = "exp"
                checkpoint_base_dir: str = "./checkpoints"

            _CONFIGS = {
                c.name: c
                for c in (
                    TrainConfig("pi0_custom_lora", Pi0Config("gemma_2b_lora_a8", "gemma_300m_lora_a64")),
                    TrainConfig("pi05_custom_lora", Pi0Config("gemma_2b_lora_a8", "gemma_300m_lora_a64", pi05=True)),
                )
            }

            def get_config(config_name):
                if config_name not in _CONFIGS:
                    raise ValueError(f"Config '{config_name}' not found.")
                return _CONFIGS[config_name]
            """,
    }
    for name, text in (files | (replace or {})).items():
        path = root / "stub" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "stub"


def _run_with_openpi(stub: pathlib.Path, *args: str, cwd: pathlib.Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{stub}{os.pathsep}{REPO}"}
    return subprocess.run(
        [sys.executable, "-m", "openpi_merge", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _merge_args(step, out, *overrides, config_name="pi0_lora"):
    return (f"--config={config_name}", f"--config.input={step}", f"--config.output={out}", *overrides)


def test_train_config_by_name_gives_openpis_alpha(tiny_checkpoint, tmp_path):
    stub, step = _write_stub_openpi(tmp_path), tiny_checkpoint("pi0")
    result = _run_with_openpi(stub, *_merge_args(step, tmp_path / "out", "--config.train_config=pi0_custom_lora"))
    assert result.returncode == 0, result.stderr
    assert "alpha 8 (openpi: gemma.get_config('gemma_2b_lora_a8'))" in result.stdout
    assert "alpha 64 (openpi: gemma.get_config('gemma_300m_lora_a64'))" in result.stdout
    _check_merged(restore_flat(step / "params"), restore_flat(tmp_path / "out" / "params"), alpha=CUSTOM)
    written = json.loads((tmp_path / "out" / "openpi_merge.json").read_text())
    assert written["train_config"] == {"name": "pi0_custom_lora", "source": "command line"}
    assert written["experts"]["action_expert"]["attn"]["scale"] == 2.0


def test_train_config_from_the_input_path(tiny_checkpoint, tmp_path):
    stub = _write_stub_openpi(tmp_path)
    step = tmp_path / "checkpoints" / "pi0_custom_lora" / "my_run" / "1000"
    shutil.copytree(tiny_checkpoint("pi0"), step)
    result = _run_with_openpi(stub, *_merge_args(step, tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "settings from openpi train_config pi0_custom_lora (found in the input path)" in result.stdout
    _check_merged(restore_flat(step / "params"), restore_flat(tmp_path / "out" / "params"), alpha=CUSTOM)


def test_command_line_alpha_overrides_openpis(tiny_checkpoint, tmp_path):
    stub, step = _write_stub_openpi(tmp_path), tiny_checkpoint("pi0")
    overrides = ("--config.train_config=pi0_custom_lora", "--config.paligemma.alpha=4")
    result = _run_with_openpi(stub, *_merge_args(step, tmp_path / "out", *overrides))
    assert result.returncode == 0, result.stderr
    assert "alpha 4 (command line)" in result.stdout
    alpha = {"": 4.0, "_1": 64.0}
    _check_merged(restore_flat(step / "params"), restore_flat(tmp_path / "out" / "params"), alpha=alpha)


def test_an_edited_openpi_variant_counts_without_train_config(tiny_checkpoint, tmp_path):
    stub, step = _write_stub_openpi(tmp_path, stock_alpha=8.0), tiny_checkpoint("pi0")
    result = _run_with_openpi(stub, *_merge_args(step, tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "alpha 8 (openpi: gemma.get_config('gemma_2b_lora'))" in result.stdout
    alpha = {"": 8.0, "_1": 32.0}
    _check_merged(restore_flat(step / "params"), restore_flat(tmp_path / "out" / "params"), alpha=alpha)


def test_train_config_of_another_model_names_the_config_to_use(tiny_checkpoint, tmp_path):
    stub = _write_stub_openpi(tmp_path)
    overrides = ("--config.train_config=pi05_custom_lora",)
    result = _run_with_openpi(stub, *_merge_args(tiny_checkpoint("pi0"), tmp_path / "out", *overrides))
    assert result.returncode == errors.ConfigError.exit_code
    assert "is a pi0.5 model but the config is for pi0: use --config=pi05_lora" in result.stderr


def test_without_openpi_the_stock_alpha_is_named_as_such(tiny_checkpoint, tmp_path):
    result = run_cli(*_merge_args(tiny_checkpoint("pi0"), tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "alpha 16 (stock default of gemma_2b_lora: pass --config.paligemma.alpha if you changed it)" in result.stdout
    train = run_cli(*_merge_args(tiny_checkpoint("pi0"), tmp_path / "x", "--config.train_config=pi0_custom_lora"))
    assert train.returncode == errors.ConfigError.exit_code
    assert "needs openpi importable here" in train.stderr


def test_ffn_rank_that_is_not_the_variants_needs_no_alpha(tmp_path):
    flat = traverse_util.flatten_dict(synthetic.make_params("pi0", "tiny"))
    mlp = ("PaliGemma", "llm", "layers", "mlp")
    for name in ("gating_einsum", "linear"):  # Rank 8 instead of gemma_2b_lora's 16.
        flat[(*mlp, f"{name}_lora_a")] = flat[(*mlp, f"{name}_lora_a")][..., :8].copy()
        flat[(*mlp, f"{name}_lora_b")] = flat[(*mlp, f"{name}_lora_b")][..., :8, :].copy()
    write_params(tmp_path / "in" / "params", flat)
    result = run_cli(*_merge_args(tmp_path / "in", tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "paligemma's MLP LoRA has rank 8, not gemma_2b_lora's ffn rank 16" in result.stdout
    _check_merged(restore_flat(tmp_path / "in" / "params"), restore_flat(tmp_path / "out" / "params"))


@pytest.mark.parametrize(("checkpoint_model", "wanted"), [("pi0_fast", "pi0_fast_lora"), ("pi05", "pi05_lora")])
def test_a_checkpoint_of_another_model_names_its_config(tiny_checkpoint, tmp_path, checkpoint_model, wanted):
    result = run_cli(*_merge_args(tiny_checkpoint(checkpoint_model), tmp_path / "out"))
    assert result.returncode == errors.PlanError.exit_code
    assert f"but model=pi0 (pi0): use --config={wanted}" in result.stderr


def test_console_script_help_lists_every_field_and_exits_0():
    result = subprocess.run(
        [str(pathlib.Path(sys.executable).parent / "openpi-merge"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for field in config.FIELDS:
        assert f"  {config.field_name(field.name)}  (default: " in result.stdout
    assert "--config.mode=inspect" in result.stdout
    assert "pi0_lora" in result.stdout


def test_readme_fields_table_is_the_configs():
    assert config.markdown_table() in (REPO / "README.md").read_text()


def test_config_by_name_and_by_repo_path_from_another_directory(tiny_checkpoint, tmp_path):
    step = tiny_checkpoint("pi0")
    by_name = run_cli("--config=pi0_lora", f"--config.input={step}", "--config.output=a", cwd=tmp_path)
    assert by_name.returncode == 0, by_name.stderr
    by_path = run_cli("--config=configs/pi0_lora.py", f"--config.input={step}", "--config.output=b", cwd=tmp_path)
    assert by_path.returncode == 0, by_path.stderr
    assert restore_flat(tmp_path / "a" / "params").keys() == restore_flat(tmp_path / "b" / "params").keys()


def test_example_keeps_its_input_next_to_the_output(tmp_path):
    result = run_cli("--config=example:pi0_fast", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "merged_example_pi0_fast.input" / "1000" / "params").is_dir()
    assert (tmp_path / "merged_example_pi0_fast" / "params").is_dir()
    assert "kept there to compare with the output" in result.stdout


def _pair_for(kernel: np.ndarray, rank: int, dtype) -> tuple[plan.Pair, dict]:
    cfg = config.make_config("pi0_fast")
    cfg.input, cfg.output, cfg.paligemma.alpha = "in", "out", float(rank)
    root = ("PaliGemma", "llm", "layers", "mlp")
    rng = np.random.default_rng(7)
    arrays = {
        "linear": kernel,
        "linear_lora_a": (1e-2 * rng.standard_normal((*kernel.shape[:-1], rank))).astype(np.float32),
        "linear_lora_b": (1e-2 * rng.standard_normal((kernel.shape[0], rank, kernel.shape[-1]))).astype(np.float32),
    }
    leaves = {(*root, n): plan.Leaf((*root, n), a.shape, np.dtype(a.dtype)) for n, a in arrays.items()}
    cfg.dtype = dtype
    (pair,) = plan.make_plan(leaves, config.read_settings(cfg, openpi=None)).pairs
    return pair, arrays


def test_an_update_far_below_a_bfloat16_ulp_is_reported_as_lost():
    # Kernel values of 1: half a bfloat16 ulp there is 2^-8 (3.9e-3); the update, about 2e-4 per element, is far below
    # it (and far above float32's ulp, 1.2e-7).
    kernel = np.ones((2, 16, 8), ml_dtypes.bfloat16)
    pair, arrays = _pair_for(kernel, 4, "keep")
    merged, check = fuse.fuse_pair(pair, *arrays.values(), sharding.single_device())
    assert np.array_equal(np.asarray(merged), kernel)
    assert check.changed_fraction == 0.0
    assert check.rounding_loss == pytest.approx(1.0, rel=1e-6)
    notes = summary._rounding_notes([check])
    assert len(notes) == 1
    assert "bfloat16 rounding erased 100%" in notes[0]
    assert "--config.dtype=float32" in notes[0]
    # Stored in float32 the same update survives: every element changes and the rounding error is tiny against it.
    pair32, arrays32 = _pair_for(kernel, 4, "float32")
    _, kept = fuse.fuse_pair(pair32, *arrays32.values(), sharding.single_device())
    assert kept.changed_fraction > 0.99
    assert kept.rounding_loss < 0.01
    assert summary._rounding_notes([kept]) == []


def test_progress_shows_elapsed_and_eta_in_plain_lines():
    stream = io.StringIO()
    bar = progress.Progress("fuse", 4.0, stream=stream, interval=0.0)
    bar.advance("a", 1.0)
    bar.advance("b", 3.0)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("fuse: 25% after 0 s, ETA ")
    assert lines[1].startswith("fuse: 100% after 0 s (last: b)")


def test_phase_ticker_reports_a_long_phase_and_its_end():
    stream = io.StringIO()
    ticker = progress.PhaseTicker(stream=stream, interval=0.05)
    ticker.push("restore")
    time.sleep(0.3)
    ticker.pop("restore")
    lines = stream.getvalue().splitlines()
    assert any(line.startswith("restore: running for ") for line in lines), lines
    assert lines[-1].startswith("restore: done in ")


def test_settings_record_where_each_came_from():
    cfg = config.make_config("pi0")
    cfg.input, cfg.output, cfg.action_expert.rslora = "in", "out", True
    settings = config.read_settings(cfg, openpi=None)
    expert = settings.experts["_1"]
    assert dataclasses.asdict(expert)["sources"]["rslora"] == "command line"
    assert settings.experts[""].sources["alpha"].startswith("stock default of gemma_2b_lora")


_BROKEN_OPENPI = {
    "import raises": {"openpi/training/config.py": "raise RuntimeError('half-installed openpi')\n"},
    "get_config raises": {"openpi/models/gemma.py": "def get_config(variant):\n    raise TypeError('edited badly')\n"},
    "get_config returns None": {"openpi/models/gemma.py": "def get_config(variant):\n    return None\n"},
    "rank is no number": {
        "openpi/models/gemma.py": """
            import types

            def get_config(variant):
                config = types.SimpleNamespace(rank="sixteen", alpha=16.0)
                return types.SimpleNamespace(lora_configs={"attn": config, "ffn": config})
            """
    },
}


@pytest.mark.parametrize("broken", list(_BROKEN_OPENPI))
def test_a_broken_openpi_is_one_line_naming_its_error(tiny_checkpoint, tmp_path, broken):
    stub = _write_stub_openpi(tmp_path, replace=_BROKEN_OPENPI[broken])
    result = _run_with_openpi(stub, *_merge_args(tiny_checkpoint("pi0"), tmp_path / "out"))
    line = error_line(result.returncode, result.stderr, 2, "openpi is importable here but")
    assert "fix openpi" in line
    assert not (tmp_path / "out").exists()


def test_check_works_without_a_config_and_without_importing_a_broken_openpi(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert run_cli(*_merge_args(tiny_checkpoint("pi0"), out)).returncode == 0
    stub = _write_stub_openpi(tmp_path, replace=_BROKEN_OPENPI["import raises"])
    result = _run_with_openpi(stub, "--config.mode=check", f"--config.input={out}")
    assert result.returncode == 0, result.stderr
    assert "matches its manifest" in result.stdout


def test_an_override_without_a_config_says_to_name_one():
    result = run_cli("--config.input=x")
    error_line(result.returncode, result.stderr, 2, "no config given: pass --config=NAME")


def test_version_prints_the_package_version():
    from openpi_merge import __version__

    result = run_cli("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"openpi-merge {__version__}")


def test_a_path_that_is_not_utf8_is_refused_in_one_line(tiny_checkpoint, tmp_path):
    out = os.fsdecode(bytes(tmp_path) + b"/out\xff")
    result = run_cli(*_merge_args(tiny_checkpoint("pi0"), out))
    error_line(result.returncode, result.stderr, 2, "is not valid UTF-8")
    assert os.listdir(tmp_path) == []


def test_a_merge_with_stderr_closed_still_merges(tiny_checkpoint, tmp_path):
    command = [sys.executable, "-m", "openpi_merge", *_merge_args(tiny_checkpoint("pi0"), tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    closed = ["bash", "-c", 'exec "$@" 2>&-', "bash", *command]  # As a shell user would: 2>&-.
    result = subprocess.run(closed, cwd=REPO, env=env, stdout=subprocess.PIPE, timeout=600, check=False)
    assert result.returncode == 0
    assert (tmp_path / "out" / "params").is_dir()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mesh", "fsdp", "is not NAME=SIZE"),
        ("mesh", "fsdp=0", "is not NAME=SIZE"),
        ("mesh", "fsdp=-1,tp=-1", "only one axis may be -1"),
        ("mesh", "fsdp=2,fsdp=2", "names an axis twice"),
        ("distributed.enabled", True, "needs a mesh"),
        ("memory_budget_gb", "-1", "must be auto, none, or a positive finite number"),
    ],
)
def test_bad_scale_config(field, value, message):
    cfg = config.make_config("pi0")
    cfg.input, cfg.output = "in", "out"
    node, _, leaf = field.rpartition(".")
    (cfg[node] if node else cfg)[leaf] = value
    with pytest.raises(errors.ConfigError, match=message):
        config.read_settings(cfg)


def test_nested_phases_count_each_second_once(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 6.0, 10.0])  # save runs 1..10; restore runs 3..6 inside it.
    monkeypatch.setattr(summary.time, "perf_counter", lambda: next(clock))
    stopwatch = summary.Stopwatch()
    with stopwatch.phase("save"), stopwatch.phase("restore"):
        pass
    assert stopwatch.seconds == {"save": 6.0, "restore": 3.0}
    assert stopwatch.total == 9.0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lerobot_image_keys", "top,wrist,left,right", "must be 1 to 3 distinct"),
        ("lerobot_image_keys", "top,top", "must be 1 to 3 distinct"),
        ("lerobot_image_keys", "top,", "must be 1 to 3 distinct"),
        ("lerobot_image_keys", "top,wrist cam", "'wrist cam' is not a camera name"),
        ("lerobot_state_dim", -1, "must be a positive integer, or 0"),
    ],
)
def test_bad_lerobot_export_field_is_a_config_error(field, value, message):
    cfg = config.make_config("pi0")
    cfg.input, cfg.output = "in", "out"
    cfg[field] = value
    with pytest.raises(errors.ConfigError, match=message):
        config.read_settings(cfg)


def test_lerobot_image_keys_take_names_or_feature_keys():
    cfg = config.make_config("pi0")
    cfg.input, cfg.output = "in", "out"
    assert config.read_settings(cfg).lerobot_image_keys == ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
    cfg.lerobot_image_keys, cfg.lerobot_state_dim = "observation.images.top, wrist", 7
    settings = config.read_settings(cfg)
    assert (settings.lerobot_image_keys, settings.lerobot_state_dim) == (("top", "wrist"), 7)
