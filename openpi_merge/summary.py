"""Human-readable output: the summary that ends a merge, the plan that inspect prints, and the phase stopwatch."""

import collections
import contextlib
import pathlib
import time
from collections.abc import Iterator, Sequence

from openpi_merge import fuse, plan, progress, provenance


class Stopwatch:
    """Wall seconds per named phase, in the order the phases began.

    A phase entered inside another pauses it, so every second counts once (a streamed save restores and fuses inside).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._running: list[str] = []
        self._since = time.perf_counter()
        self.ticker: progress.PhaseTicker | None = None  # Shows running phases; None: quiet.

    def _charge(self) -> None:
        now = time.perf_counter()
        if self._running:
            self.seconds[self._running[-1]] += now - self._since
        self._since = now

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._charge()
        self.seconds.setdefault(name, 0.0)
        self._running.append(name)
        ticker = self.ticker
        if ticker is not None:
            ticker.push(name)
        try:
            yield
        finally:
            self._charge()
            self._running.pop()
            if ticker is not None:
                ticker.pop(name)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def _bytes(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3f} GB" if nbytes >= 1e7 else f"{nbytes / 1e3:.1f} kB"


def _table(rows: Sequence[Sequence[object]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _totals(merge_plan: plan.Plan) -> list[str]:
    leaves_in, leaves_out = merge_plan.leaves_in, merge_plan.leaves_out
    return [
        f"  leaves: {len(leaves_in)} in, {len(leaves_out)} out ({2 * len(merge_plan.pairs)} LoRA leaves dropped)",
        f"  bytes:  {_bytes(sum(x.nbytes for x in leaves_in))} in, {_bytes(sum(x.nbytes for x in leaves_out))} out",
    ]


def _alpha(pair: plan.Pair) -> str:
    return "-" if pair.alpha is None else f"{pair.alpha:g}"


# A note is due when rounding to the output dtype erased more than this share of an update (relative to its size).
ROUNDING_NOTE_THRESHOLD = 0.25


def _rounding_notes(checks: list[fuse.Check]) -> list[str]:
    worst: dict[tuple[str, str], fuse.Check] = {}
    for check in checks:
        key = (check.pair.expert, check.pair.kind.name)
        if key not in worst or check.rounding_loss > worst[key].rounding_loss:
            worst[key] = check
    return [
        f"{check.pair.out_dtype.name} rounding erased {min(check.rounding_loss, 1):.0%} of {expert}'s {kind} LoRA "
        f"update (rounding error against the update's size; {check.changed_fraction:.1%} of kernel elements changed): "
        "--config.dtype=float32 keeps it in the Orbax output, though openpi's JAX server restores every parameter as "
        "bfloat16 and rounds it away again at load; where it is served in float32 (a float32 PyTorch export, "
        "--config.export_dtype=float32 with --config.dtype=float32) it survives"
        for (expert, kind), check in worst.items()
        if check.rounding_loss > ROUNDING_NOTE_THRESHOLD
    ]


def _pi05_path_note(merge_plan: plan.Plan, output: pathlib.Path | None) -> list[str]:
    if merge_plan.model != "pi05" or output is None or "pi05" in str(output):
        return []
    return [
        "openpi's PyTorch converter (examples/convert_jax_model_to_pytorch.py) picks the pi0.5 layout only when "
        f"'pi05' is in the checkpoint path, and {output} has none: --config.pytorch_output=DIR writes the PyTorch "
        "layout directly (or rename the dir before converting)"
    ]


def _assets_line(asset_ids: list[str] | None) -> list[str]:
    if asset_ids is None:  # Not this process's to copy (several processes: process 0 copies).
        return []
    if not asset_ids:
        return [
            "assets: none carried (the input has no assets/ dir, e.g. a bare params dir): openpi's server needs "
            "assets/<asset_id>/norm_stats.json in the step dir; copy them from the training step dir"
        ]
    return [f"assets: {', '.join(asset_ids)} (assets/<asset_id>/, carried byte for byte)"]


def render(
    merge_plan: plan.Plan,
    checks: list[fuse.Check],
    output: pathlib.Path | None,
    stopwatch: Stopwatch,
    asset_ids: list[str] | None,
    exports: Sequence[str] = (),
) -> str:
    """Pairs per expert and module kind with ranks, scales, verification and rounding; where each setting came from;
    the asset ids carried; the exports (``exports``: their lines); leaves and bytes in and out, time per phase.
    ``output`` None: no Orbax output was asked for."""
    worst = fuse.worst_by_kind(checks)
    rounding: dict[tuple[str, str], tuple[float, float]] = {}
    for check in checks:
        key = (check.pair.expert, check.pair.kind.name)
        changed, loss = rounding.get(key, (1.0, 0.0))
        rounding[key] = (min(changed, check.changed_fraction), max(loss, check.rounding_loss))
    groups = collections.Counter(
        (p.expert, p.kind.name, p.rank, _alpha(p), f"{p.scale:g}", f"{p.kernel.dtype.name}->{p.out_dtype.name}")
        for p in merge_plan.pairs
    )
    header = ("expert", "module", "rank", "alpha", "scale", "dtype", "pairs", "worst rel. error", "changed", "rounding")
    rows = []
    for key, count in groups.items():
        verified = worst.get(key[0], {}).get(key[1])
        changed, loss = rounding.get(key[:2], (None, None))
        rows.append(
            (
                *key,
                count,
                f"{verified['relative_error']:.2e}" if verified else "not verified",
                "-" if changed is None else f"{changed:.1%}",
                "-" if loss is None else f"{loss:.1e}",
            )
        )
    phases = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in stopwatch.seconds.items())
    return "\n".join(
        [
            f"openpi-merge: folded {len(merge_plan.pairs)} LoRA pairs into "
            + (str(output) if output else "the exports below (no Orbax output asked for)"),
            *_table([header, *rows]),
            "  changed: least share of a kernel's elements the merge changed; rounding: worst rounding error of the "
            "stored kernel against the LoRA update's size (0: kept exactly, 1: erased)",
            *(f"  {line}" for line in provenance.settings_lines(merge_plan)),
            *(f"  {line}" for line in _assets_line(asset_ids)),
            *(f"  export: {line}" if not line.startswith(" ") else f"  {line}" for line in exports),
            *_totals(merge_plan),
            f"  time:   {stopwatch.total:.2f} s ({phases})",
            *(
                f"  note: {note}"
                for note in [*merge_plan.notes, *_rounding_notes(checks), *_pi05_path_note(merge_plan, output)]
            ),
        ]
    )


def render_plan(merge_plan: plan.Plan, params_dir: pathlib.Path) -> str:
    """Every pair with its shapes, rank, scale and dtypes; the untouched leaves; and every problem found."""
    pairs = [
        (p.kernel.name, p.kind.name, p.kernel.shape, p.lora_a.shape, p.lora_b.shape, p.rank, _alpha(p),
         f"{p.scale:g}", f"{p.kernel.dtype.name}->{p.out_dtype.name}")
        for p in merge_plan.pairs
    ]  # fmt: skip
    header = ("kernel", "module", "kernel shape", "A shape", "B shape", "rank", "alpha", "scale", "dtype")
    kept = [(leaf.name, leaf.shape, leaf.dtype.name) for leaf in merge_plan.kept]
    return "\n".join(
        [
            f"openpi-merge: plan for {params_dir} (metadata only, nothing written)",
            f"  {len(pairs)} LoRA pairs to fold:",
            *(_table([header, *pairs]) if pairs else []),
            *(f"  {line}" for line in provenance.settings_lines(merge_plan)),
            f"  {len(kept)} leaves kept as they are:",
            *(_table([("leaf", "shape", "dtype"), *kept]) if kept else []),
            *_totals(merge_plan),
            *(f"  note: {note}" for note in merge_plan.notes),
            *(f"  problem: {problem}" for problem in merge_plan.problems),
            f"  {len(merge_plan.problems)} problems" if merge_plan.problems else "  no problems: ready to merge",
        ]
    )
