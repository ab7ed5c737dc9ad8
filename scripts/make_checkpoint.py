"""Writes a synthetic openpi LoRA fine-tune checkpoint, laid out as openpi training writes it.

    python scripts/make_checkpoint.py --model=pi0 --scale=full --out=/tmp/ckpt [--no_value_suffix] [--seed=0]

Prints the step dir it wrote and its size on disk.
"""

import argparse
import pathlib
import sys
import time

# Runs from a checkout without installing: the repo root goes on the path before the package is imported.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from openpi_merge.testing import synthetic


def _size(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=synthetic.MODELS, default="pi0")
    parser.add_argument("--scale", choices=synthetic.SCALES, default="tiny")
    parser.add_argument("--out", required=True, help="checkpoint dir; the step dir <out>/<step> is written in it")
    parser.add_argument("--step", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--asset_id", default="example_robot")
    parser.add_argument("--fused_qkv", action="store_true", help="num_kv_heads == num_heads: one qkv_einsum")
    parser.add_argument(
        "--jax_arrays", action="store_true", help="save jax.Array values as openpi does (more memory than numpy)"
    )
    parser.add_argument(
        "--no_value_suffix", dest="value_suffix", action="store_false", help="plain dicts, as released checkpoints"
    )
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    if (out / str(args.step)).exists():
        parser.error(f"{out / str(args.step)} already exists")
    start = time.monotonic()
    step_dir = synthetic.write_checkpoint(
        out,
        args.model,
        args.scale,
        step=args.step,
        value_suffix=args.value_suffix,
        seed=args.seed,
        fused_qkv=args.fused_qkv,
        asset_id=args.asset_id,
        jax_arrays=args.jax_arrays,
    )
    print(step_dir)
    print(f"{_size(step_dir) / 2**30:.2f} GiB on disk, written in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
