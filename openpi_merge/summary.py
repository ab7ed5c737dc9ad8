"""The short human summary that ends a merge, and the stopwatch that times its phases."""

import collections
import contextlib
import pathlib
import time
from collections.abc import Iterator

from openpi_merge import plan


class Stopwatch:
    """Wall seconds per named phase, in the order the phases ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3f} GB" if nbytes >= 1e7 else f"{nbytes / 1e3:.1f} kB"


def render(merge_plan: plan.Plan, output: pathlib.Path, stopwatch: Stopwatch) -> str:
    """Pairs per module kind with their ranks and scales, leaves and bytes in and out, and the time taken."""
    rows = collections.Counter(
        (p.expert, p.kind.name, p.rank, "-" if p.alpha is None else f"{p.alpha:g}", f"{p.scale:g}",
         f"{p.kernel.dtype.name}->{p.out_dtype.name}")
        for p in merge_plan.pairs
    )  # fmt: skip
    header = ("expert", "module", "rank", "alpha", "scale", "dtype", "pairs")
    table = [header] + [(*key, str(count)) for key, count in rows.items()]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    lines = ["  " + "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)) for row in table]

    leaves_in, leaves_out = merge_plan.leaves_in, merge_plan.leaves_out
    bytes_in, bytes_out = sum(leaf.nbytes for leaf in leaves_in), sum(leaf.nbytes for leaf in leaves_out)
    phases = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in stopwatch.seconds.items())
    return "\n".join(
        [
            f"openpi-merge: folded {len(merge_plan.pairs)} LoRA pairs into {output}",
            *lines,
            f"  leaves: {len(leaves_in)} in, {len(leaves_out)} out ({2 * len(merge_plan.pairs)} LoRA leaves dropped)",
            f"  bytes:  {_gb(bytes_in)} in, {_gb(bytes_out)} out",
            f"  time:   {stopwatch.total:.2f} s ({phases})",
            *(f"  note: {note}" for note in merge_plan.notes),
        ]
    )
