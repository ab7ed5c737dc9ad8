"""openpi's LoRA modules and the maths that folds an adapter into its kernel.

The table of LoRA-carrying kernels is ``openpi_layout.MODULE_KINDS``. openpi applies LoRA in two module types
(openpi/models/lora.py):

- ``Einsum``: ``y = einsum(eqn, x, W) + s * einsum(eqn_b, einsum(eqn_a, x, A), B)`` with ``s = alpha / rank`` (or
  ``alpha / sqrt(rank)`` with rslora); eqn_a / eqn_b are eqn with the rank label put in place of one kernel axis each.
- ``FeedForward``: ``x @ W + (x @ A) @ B`` per plain dot, with no scaling at all.

Both are written here as an einsum equation, so one derivation serves every module: the merged kernel is the
``W + s * dW`` with ``einsum(eqn, x, W + s * dW) == y`` for every x, and dW is itself an einsum of A and B.
"""

import dataclasses
import math
import re
import string

RANK_LABEL = "L"


@dataclasses.dataclass(frozen=True)
class ModuleKind:
    """One kind of LoRA-carrying kernel in openpi's language model.

    Attributes:
      name: name used in reports, e.g. ``attn_vec_einsum`` or ``mlp/linear``.
      module: module name in the tree, without the action expert's ``_1`` suffix.
      kernel: leaf name of the kernel inside the module.
      lora_a, lora_b: leaf names of the adapter factors inside the module.
      equation: the forward-pass einsum ``x, W -> y`` for one layer (no depth axis).
      scaled: whether the LoRA path is multiplied by ``alpha / rank`` (Einsum) or not (FeedForward).
    """

    name: str
    module: str
    kernel: str
    lora_a: str
    lora_b: str
    equation: str
    scaled: bool

    @property
    def lora_config(self) -> str:
        """The key of openpi's ``lora_configs`` this kernel's LoRA follows: "attn" (Einsum) or "ffn" (FeedForward)."""
        return "attn" if self.scaled else "ffn"


def einsum_kind(module: str, equation: str) -> ModuleKind:
    return ModuleKind(module, module, "w", "lora_a", "lora_b", equation, scaled=True)


def feedforward_kind(kernel: str, equation: str) -> ModuleKind:
    return ModuleKind(f"mlp/{kernel}", "mlp", kernel, f"{kernel}_lora_a", f"{kernel}_lora_b", equation, scaled=False)


# FeedForward builds its factor shapes by hand, which amounts to these axes whatever LoRAConfig.axes says.
FEEDFORWARD_AXES = (-2, -1)


def split_equation(equation: str) -> tuple[str, str, str]:
    """Splits ``'x,w->y'`` into its three label strings."""
    match = re.fullmatch(r"(\w+),(\w+)->(\w+)", equation)
    if not match:
        raise ValueError(f"unsupported einsum equation {equation!r}: expected 'x,w->y'")
    lhs, rhs, out = match.groups()
    return lhs, rhs, out


def lora_equations(equation: str, axes: tuple[int, int]) -> tuple[str, str]:
    """Returns (eqn_a, eqn_b) of the LoRA path, built the way openpi's ``lora.Einsum`` builds them."""
    lhs, rhs, out = split_equation(equation)
    if RANK_LABEL in equation:
        raise ValueError(f"rank label {RANK_LABEL!r} already used in {equation!r}")
    a_label, b_label = rhs[axes[0]], rhs[axes[1]]
    a_out = out.replace(b_label, RANK_LABEL)
    eqn_a = f"{lhs},{rhs.replace(b_label, RANK_LABEL)}->{a_out}"
    eqn_b = f"{a_out},{rhs.replace(a_label, RANK_LABEL)}->{out}"
    return eqn_a, eqn_b


def factor_shapes(kernel_shape: tuple[int, ...], axes: tuple[int, int], rank: int) -> tuple[tuple[int, ...], ...]:
    """Shapes openpi gives A and B for a kernel: the kernel's shape with axes[1] (A) or axes[0] (B) set to rank."""
    shape_a, shape_b = list(kernel_shape), list(kernel_shape)
    shape_a[axes[1]] = rank
    shape_b[axes[0]] = rank
    return tuple(shape_a), tuple(shape_b)


def update_equation(equation: str, axes: tuple[int, int]) -> str:
    """Returns the einsum ``A, B -> dW`` with ``einsum(eqn, x, dW) == einsum(eqn_b, einsum(eqn_a, x, A), B)``.

    Composing the two LoRA einsums ties an index of B to one of A only through the LoRA intermediate (eqn_a's output)
    or the final output. An axis of B that is in neither is summed within eqn_b alone, independently of the same-named
    axis of A: for ``attn_vec_einsum`` (``BTNH,NHD->BTD``) the intermediate has no head axis N, so dW sums B over its
    heads instead of pairing head n of A with head n of B. Such axes get labels of their own here. The equation is for
    one layer; the scanned depth axis is a batch axis of the merge.
    """
    eqn_a, eqn_b = lora_equations(equation, axes)
    lhs, rhs, out = split_equation(equation)
    _, a_rhs, a_out = split_equation(eqn_a)
    _, b_rhs, _ = split_equation(eqn_b)

    # Every label becomes a lowercase letter: openpi's equations use digits, which not every einsum parser accepts.
    letters = iter(string.ascii_lowercase)
    names: dict[str, str] = {}

    def name(label: str) -> str:
        if label not in names:
            names[label] = next(letters)
        return names[label]

    a_labels = "".join(name(c) for c in a_rhs)
    b_labels = "".join(name(c) if c in a_out or c in out else next(letters) for c in b_rhs)
    w_labels = "".join(name(c) for c in rhs)

    summed = set(a_labels + b_labels) - set(w_labels)
    if not set(w_labels) <= set(a_labels + b_labels) or summed & {name(c) for c in lhs + out}:
        raise ValueError(f"LoRA axes {axes} on {equation!r} do not give a kernel update of the kernel's shape")
    return f"{a_labels},{b_labels}->{w_labels}"


def scale(alpha: float, rank: int, *, rslora: bool) -> float:
    """openpi's ``LoRAConfig.scaling_value``."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank
