"""openpi's Gemma variants, as far as the merge needs them: whether they carry LoRA, and its rank and alpha."""

import dataclasses

from openpi_merge import errors


@dataclasses.dataclass(frozen=True)
class Variant:
    """A Gemma variant of openpi (models/gemma.py, gemma_fast.py); ``rank`` is None when it has no LoRA."""

    name: str
    rank: int | None = None
    alpha: float | None = None

    @property
    def has_lora(self) -> bool:
        return self.rank is not None


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("gemma_2b"),
        Variant("gemma_300m"),
        Variant("gemma_2b_lora", rank=16, alpha=16.0),
        Variant("gemma_300m_lora", rank=32, alpha=32.0),
    )
}


def get(name: str, *, field: str) -> Variant:
    """Looks a variant up by name; ``field`` names the config field for the error message."""
    if name not in VARIANTS:
        raise errors.ConfigError(f"{field}={name!r} is not an openpi Gemma variant; known: {', '.join(VARIANTS)}")
    return VARIANTS[name]
