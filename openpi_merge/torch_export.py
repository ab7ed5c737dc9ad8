"""The merged policy in openpi's PyTorch layout: the state dict of ``PI0Pytorch(config)``, its file, and its proof.

Contract:

- ``state_dict(params, model, dtype)`` maps a merged (LoRA-free) flat parameter tree, paths without the ``params``
  prefix or ``value`` suffix, numpy arrays (bfloat16 as ``ml_dtypes.bfloat16``) or anything with a ``shape`` that
  indexing turns into one (``export.Merged`` reads each slice from the written checkpoint; ``a[()]`` is all of it), to
  exactly the keys, shapes and dtypes of openpi's ``PI0Pytorch(config).state_dict()`` as
  ``safetensors.torch.load_model`` (openpi's ``load_pytorch``) loads it strictly: tied weights once (the PaliGemma
  ``lm_head`` shares ``embed_tokens``, so it is left out, as ``safetensors.torch.save_model`` leaves it out). Every
  shape comes from the tree's own shapes; the layout (pi0, or pi0.5 with adaRMS ``Dense_0`` leaves under the action
  expert's ``*_norm_1``) comes from the tree, and a ``model`` that disagrees with it is refused. pi0-FAST is refused:
  openpi has no PyTorch pi0-FAST.
- dtype ``"bfloat16"`` (default) gives the dtypes of ``PI0Pytorch`` built with ``dtype="bfloat16"``: bfloat16
  everywhere except what openpi keeps float32 (``PaliGemmaWithExpertModel.to_bfloat16_for_selected_params``: SigLIP's
  patch and position embeddings, every Gemma RMSNorm including pi0.5's adaRMS ``dense``) and the projections
  (``action_in_proj`` ...), which ``PI0Pytorch`` never casts. ``"float32"``: float32 everywhere, what it has with
  ``dtype="float32"``. openpi's serving casts the Gemma/SigLIP part to that same bfloat16 mix after loading, whatever
  the file holds.
- The action expert's ``lm_head.weight`` (vocab x width) is a parameter of ``PI0Pytorch`` that its forward pass never
  uses and the JAX tree has no counterpart for: it is written as zeros, so that a strict load finds every key.
- ``StateDict`` makes those tensors a module at a time as they are read, ``state_dict`` all at once.
- ``write(directory, tensors, config_json=...)`` writes ``model.safetensors`` (``save_safetensors``: a tensor at a
  time, bfloat16 as BF16, with the ``{"format": "pt"}`` metadata torch's writer adds) and ``config.json``
  (``config_json(...)`` builds the dict openpi's converter writes). No staging or commit: the caller's job.
- ``check(tensors, params, model)`` proves, with numpy only, that every exported tensor reproduces the merged arrays
  through the PyTorch module's own equation on random probes: a ``Linear`` applies ``x @ W.T + b`` to the input
  flattened as openpi's model flattens it (heads outer), against openpi's JAX einsum on the tree's kernel; the patch
  ``Conv2d`` its OIHW kernel on a CHW patch, against the HWIO kernel on the HWC patch; norms their scale (Gemma's
  ``1 + w``) and shift; embeddings their rows. Probes run in float64. Two bounds, per output element, with
  ``m = |x| @ |W|``: the export must equal the merged array rounded to the stored dtype up to ``2**-24 * m`` (float32
  rounding of the output: a transposed weight, a wrong slice or one changed element is far outside it), and the merged
  array itself up to ``(u + 2**-24) * m``, ``u`` the stored dtype's unit roundoff (``2**-8`` for bfloat16, 0 when
  nothing was rounded). It returns, per module kind, the tensor count, the worst relative error against the merged
  arrays and the worst ratio to each bound; any ratio above 1, a missing, extra or misshapen key raises
  ``NumericsError``.
"""

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Callable, Iterator, Mapping

import ml_dtypes
import numpy as np

from openpi_merge import errors
from openpi_merge.openpi_layout import is_lora_leaf

Path = tuple[str, ...]

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT32 = np.dtype(np.float32)
DTYPES = {"bfloat16": BFLOAT16, "float32": FLOAT32}
SAFETENSORS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

_PWE = "paligemma_with_expert."
_VLM = _PWE + "paligemma.model."
_VISION = _VLM + "vision_tower.vision_model."
_LANGUAGE = _VLM + "language_model."
_EXPERT = _PWE + "gemma_expert.model."
_EXPERT_HEAD = _PWE + "gemma_expert.lm_head.weight"
# PaliGemmaWithExpertModel.to_bfloat16_for_selected_params: parameters whose name holds one of these stay float32.
_KEEP_FLOAT32 = (
    "vision_tower.vision_model.embeddings.patch_embedding.weight",
    "vision_tower.vision_model.embeddings.patch_embedding.bias",
    "vision_tower.vision_model.embeddings.position_embedding.weight",
    "input_layernorm",
    "post_attention_layernorm",
    "model.norm",
)
# Unit roundoff of each storable dtype.
_UNIT_ROUNDOFF = {BFLOAT16: 2.0**-8, FLOAT32: 2.0**-24}
_F32_OUTPUT = 2.0**-24
_PROBES = 8

_LLM = ("PaliGemma", "llm")
_IMG = ("PaliGemma", "img")
_BLOCK = (*_IMG, "Transformer", "encoderblock")
_MHA = (*_BLOCK, "MultiHeadDotProductAttention_0")


def _stored_dtype(key: str, dtype: np.dtype) -> np.dtype:
    if dtype == FLOAT32:
        return FLOAT32
    if not key.startswith(_PWE):  # PI0Pytorch's own projections: never cast.
        return FLOAT32
    return FLOAT32 if any(s in key[len(_PWE) :] for s in _KEEP_FLOAT32) else BFLOAT16


# --- Modules: each knows its tensors and how to probe them -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Linear:
    """A torch ``nn.Linear`` (``prefix.weight``, ``prefix.bias``) computing openpi's ``eqn`` with a kernel slice.

    ``eqn`` is openpi's einsum for one layer with a leading batch label ``t``: the input's other labels, flattened in
    order, are the Linear's input features, the output's its output features (heads outer, as the model views them).
    """

    kind: str
    prefix: str
    kernel: Path
    index: tuple[int, ...]
    eqn: str
    bias: Path | None = None

    def _labels(self) -> tuple[str, str, str]:
        ins, out = self.eqn.split("->")
        x, k = ins.split(",")
        return x[1:], k, out[1:]

    def _matrix(self, k: np.ndarray) -> np.ndarray:
        """The kernel as torch's weight: (out features, in features)."""
        x, labels, out = self._labels()
        perm = [labels.index(c) for c in x + out]
        n_in = math.prod(k.shape[labels.index(c)] for c in x)
        return k.transpose(perm).reshape(n_in, -1).T

    def shapes(self, shapes: Mapping[Path, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        x, labels, out = self._labels()
        dims = dict(zip(labels, shapes[self.kernel][len(self.index) :], strict=True))
        n_in, n_out = math.prod(dims[c] for c in x), math.prod(dims[c] for c in out)
        return {f"{self.prefix}.weight": (n_out, n_in), **({f"{self.prefix}.bias": (n_out,)} if self.bias else {})}

    def tensors(self, params: Mapping[Path, np.ndarray]) -> dict[str, np.ndarray]:
        out = {f"{self.prefix}.weight": self._matrix(params[self.kernel][self.index])}
        if self.bias:
            out[f"{self.prefix}.bias"] = params[self.bias][self.index].reshape(-1)
        return out

    def probe(self, tensors, params, rng) -> Iterator[tuple]:
        x_labels, labels, _ = self._labels()
        k = params[self.kernel][self.index]
        dims = dict(zip(labels, k.shape, strict=True))
        x = rng.standard_normal((_PROBES, *(dims[c] for c in x_labels)))
        w = tensors[f"{self.prefix}.weight"]
        b = tensors.get(f"{self.prefix}.bias")
        got = x.reshape(_PROBES, -1) @ _f64(w).T  # torch: F.linear(x, W, b), x flattened as the model flattens it.
        if b is not None:
            got = got + _f64(b)
        for ref_dtype in (w.dtype, None):  # The merged array rounded as stored, then as merged.
            kr = _f64(k, ref_dtype)
            want = np.einsum(self.eqn, x, kr).reshape(_PROBES, -1)
            mag = np.einsum(self.eqn, np.abs(x), np.abs(kr)).reshape(_PROBES, -1)
            if self.bias:
                br = _f64(params[self.bias][self.index], None if ref_dtype is None else b.dtype).reshape(-1)
                want, mag = want + br, mag + np.abs(br)
            yield got, want, mag, *_pass(ref_dtype, w.dtype, k.dtype)


@dataclasses.dataclass(frozen=True)
class _PatchConv:
    """SigLIP's patch embedding: torch ``Conv2d`` (OIHW weight on CHW input), flax conv (HWIO kernel, HWC input)."""

    kind: str
    prefix: str
    kernel: Path
    bias: Path

    def shapes(self, shapes):
        p, q, i, o = shapes[self.kernel]
        return {f"{self.prefix}.weight": (o, i, p, q), f"{self.prefix}.bias": (o,)}

    def tensors(self, params):
        return {
            f"{self.prefix}.weight": params[self.kernel][()].transpose(3, 2, 0, 1),
            f"{self.prefix}.bias": params[self.bias][()],
        }

    def probe(self, tensors, params, rng):
        k = params[self.kernel][()]
        w, b = tensors[f"{self.prefix}.weight"], tensors[f"{self.prefix}.bias"]
        x = rng.standard_normal((_PROBES, *k.shape[:3]))  # One patch each, HWC; a stride-P valid conv sees it alone.
        got = np.einsum("tihw,oihw->to", x.transpose(0, 3, 1, 2), _f64(w)) + _f64(b)
        for ref_dtype in (w.dtype, None):
            kr, br = _f64(k, ref_dtype), _f64(params[self.bias][()], None if ref_dtype is None else b.dtype)
            want = np.einsum("thwi,hwio->to", x, kr) + br
            mag = np.einsum("thwi,hwio->to", np.abs(x), np.abs(kr)) + np.abs(br)
            yield got, want, mag, *_pass(ref_dtype, w.dtype, k.dtype)


@dataclasses.dataclass(frozen=True)
class _Norm:
    """A norm's affine part on normalised inputs: Gemma's RMSNorm ``x * (1 + w)``, SigLIP's LayerNorm ``x * w + b``."""

    kind: str
    prefix: str
    scale: Path
    index: tuple[int, ...]
    bias: Path | None = None
    one_plus: bool = False

    def shapes(self, shapes):
        (n,) = shapes[self.scale][len(self.index) :]
        return {f"{self.prefix}.weight": (n,), **({f"{self.prefix}.bias": (n,)} if self.bias else {})}

    def tensors(self, params):
        out = {f"{self.prefix}.weight": params[self.scale][self.index]}
        if self.bias:
            out[f"{self.prefix}.bias"] = params[self.bias][self.index]
        return out

    def probe(self, tensors, params, rng):
        w, b = tensors[f"{self.prefix}.weight"], tensors.get(f"{self.prefix}.bias")
        x = rng.standard_normal((_PROBES, w.shape[0]))
        got = x * (self.one_plus + _f64(w)) + (0.0 if b is None else _f64(b))
        s = params[self.scale][self.index]
        for ref_dtype in (w.dtype, None):
            sr = self.one_plus + _f64(s, ref_dtype)
            want, mag = x * sr, np.abs(x * sr)
            if self.bias:
                br = _f64(params[self.bias][self.index], None if ref_dtype is None else b.dtype)
                want, mag = want + br, mag + np.abs(br)
            yield got, want, mag, *_pass(ref_dtype, w.dtype, s.dtype)


@dataclasses.dataclass(frozen=True)
class _Embedding:
    """A torch ``nn.Embedding``: the tree's table (any leading singleton axes dropped), looked up by row."""

    kind: str
    key: str
    table: Path

    def shapes(self, shapes):
        shape = shapes[self.table]
        return {self.key: (math.prod(shape[:-1]), shape[-1])}

    def tensors(self, params):
        t = params[self.table][()]
        return {self.key: t.reshape(-1, t.shape[-1])}

    def probe(self, tensors, params, rng):
        w = tensors[self.key]
        t = params[self.table][()].reshape(-1, w.shape[-1])
        rows = rng.integers(0, t.shape[0], _PROBES)
        got = _f64(w[rows])
        for ref_dtype in (w.dtype, None):
            want = _f64(t[rows], ref_dtype)
            yield got, want, np.abs(want), *_pass(ref_dtype, w.dtype, t.dtype)


@dataclasses.dataclass(frozen=True)
class _Unused:
    """A parameter of ``PI0Pytorch`` its forward pass never reads (the expert's ``lm_head``): written as zeros."""

    kind: str
    key: str
    shape: Callable[[Mapping[Path, tuple[int, ...]]], tuple[int, ...]]

    def shapes(self, shapes):
        return {self.key: self.shape(shapes)}

    def tensors(self, params):
        return {self.key: np.zeros(self.shape({p: a.shape for p, a in params.items()}), BFLOAT16)}

    def probe(self, tensors, params, rng):
        got = _f64(tensors[self.key]).reshape(1, -1)
        yield got, np.zeros_like(got), np.zeros_like(got), 0.0, True


def _f64(a: np.ndarray, round_to: np.dtype | None = None) -> np.ndarray:
    if round_to is not None and a.dtype != round_to:
        a = a.astype(round_to)
    return np.asarray(a, np.float64)


def _pass(ref_dtype: np.dtype | None, stored: np.dtype, merged: np.dtype) -> tuple[float, bool]:
    """(unit roundoff the bound allows, whether the reference is the merged array as merged) of one probe pass."""
    return (0.0, False) if ref_dtype is not None else (_unit(stored, merged), True)


def _unit(stored: np.dtype, merged: np.dtype) -> float:
    """Unit roundoff of storing ``merged`` values as ``stored`` (0 when no rounding happens)."""
    if stored == merged or _UNIT_ROUNDOFF[np.dtype(stored)] <= _UNIT_ROUNDOFF.get(np.dtype(merged), 0.0):
        return 0.0
    return _UNIT_ROUNDOFF[np.dtype(stored)]


# --- The layout, read off the tree -------------------------------------------------------------------------------


def _require(shapes: Mapping[Path, tuple[int, ...]], path: Path, what: str) -> None:
    if path not in shapes:
        raise errors.ConfigError(f"cannot export to openpi's PyTorch layout: the tree has no {'/'.join(path)} ({what})")


def _detect(shapes: Mapping[Path, tuple[int, ...]], model: str) -> bool:
    """Whether the tree is pi0.5's (adaRMS in the action expert); refuses pi0-FAST and a model the tree contradicts."""
    if model == "pi0_fast":
        raise errors.ConfigError(
            "openpi has no PyTorch pi0-FAST (PI0Pytorch covers pi0 and pi0.5): export pi0-FAST as Orbax only"
        )
    if model not in ("pi0", "pi05"):
        raise errors.ConfigError(f"cannot export model {model!r} to openpi's PyTorch layout: expected pi0 or pi05")
    lora = sorted("/".join(p) for p in shapes if is_lora_leaf(p))
    if lora:
        raise errors.ConfigError(f"cannot export an unmerged tree: it still has LoRA leaves ({lora[0]}, ...)")
    if not any(p[:2] == _LLM and p[-2].endswith("_1") for p in shapes if len(p) > 3):
        raise errors.ConfigError(
            "cannot export to openpi's PyTorch layout: the tree has no action expert (`_1` modules); "
            "pi0-FAST has none, and openpi has no PyTorch pi0-FAST"
        )
    adarms = (*_LLM, "layers", "pre_attention_norm_1", "Dense_0", "kernel") in shapes
    pi05_proj = ("time_mlp_in", "kernel") in shapes
    if adarms != pi05_proj:
        raise errors.ConfigError(
            "the tree mixes pi0 and pi0.5: "
            + ("adaRMS Dense_0 leaves but no time_mlp_in" if adarms else "time_mlp_in but no adaRMS Dense_0 leaves")
        )
    if adarms != (model == "pi05"):
        found = "pi0.5 (adaRMS Dense_0 leaves under the action expert's norms)" if adarms else "pi0 (no adaRMS leaves)"
        raise errors.ConfigError(f"model={model} but the tree is {found}: set the model the checkpoint holds")
    return adarms


def _gemma(shapes, prefix: str, s: str, depth: int, adarms: bool) -> list:
    """One Gemma expert's modules; ``s`` is openpi's module suffix ("" or "_1")."""
    attn, mlp = (*_LLM, "layers", "attn"), (*_LLM, "layers", f"mlp{s}")
    fused = (*attn, f"qkv_einsum{s}", "w") in shapes
    mods: list = []
    for i in range(depth):
        layer = f"{prefix}layers.{i}."
        if fused:
            qkv = (*attn, f"qkv_einsum{s}", "w")
            q, k, v = (qkv, (i, 0)), (qkv, (i, 1)), (qkv, (i, 2))
        else:
            kv = (*attn, f"kv_einsum{s}", "w")
            q, k, v = ((*attn, f"q_einsum{s}", "w"), (i,)), (kv, (i, 0)), (kv, (i, 1))
        for name, (path, index) in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            mods.append(_Linear("attention", f"{layer}self_attn.{name}", path, index, "td,ndh->tnh"))
        mods.append(
            _Linear("attention", f"{layer}self_attn.o_proj", (*attn, f"attn_vec_einsum{s}", "w"), (i,), "tnh,nhd->td")
        )
        for name, j in (("gate_proj", 0), ("up_proj", 1)):  # openpi's FeedForward: gelu(x @ W[0]) * (x @ W[1]).
            mods.append(_Linear("mlp", f"{layer}mlp.{name}", (*mlp, "gating_einsum"), (i, j), "td,df->tf"))
        mods.append(_Linear("mlp", f"{layer}mlp.down_proj", (*mlp, "linear"), (i,), "tf,fd->td"))
        for torch_name, jax_name in (
            ("input_layernorm", "pre_attention_norm"),
            ("post_attention_layernorm", "pre_ffw_norm"),
        ):
            norm = (*_LLM, "layers", f"{jax_name}{s}")
            if adarms:
                mods.append(
                    _Linear(
                        "adarms",
                        f"{layer}{torch_name}.dense",
                        (*norm, "Dense_0", "kernel"),
                        (i,),
                        "tc,co->to",
                        bias=(*norm, "Dense_0", "bias"),
                    )
                )
            else:
                mods.append(_Norm("norm", f"{layer}{torch_name}", (*norm, "scale"), (i,), one_plus=True))
    final = (*_LLM, f"final_norm{s}")
    if adarms:
        mods.append(
            _Linear(
                "adarms",
                f"{prefix}norm.dense",
                (*final, "Dense_0", "kernel"),
                (),
                "tc,co->to",
                bias=(*final, "Dense_0", "bias"),
            )
        )
    else:
        mods.append(_Norm("norm", f"{prefix}norm", (*final, "scale"), (), one_plus=True))
    return mods


def _siglip(shapes) -> list:
    depth = shapes[(*_BLOCK, "LayerNorm_0", "scale")][0]
    mods: list = [
        _PatchConv(
            "patch_conv",
            f"{_VISION}embeddings.patch_embedding",
            (*_IMG, "embedding", "kernel"),
            (*_IMG, "embedding", "bias"),
        ),
        _Embedding("embedding", f"{_VISION}embeddings.position_embedding.weight", (*_IMG, "pos_embedding")),
    ]
    for i in range(depth):
        layer = f"{_VISION}encoder.layers.{i}."
        for n in (0, 1):
            ln = (*_BLOCK, f"LayerNorm_{n}")
            mods.append(_Norm("norm", f"{layer}layer_norm{n + 1}", (*ln, "scale"), (i,), bias=(*ln, "bias")))
        for torch_name, jax_name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            m = (*_MHA, jax_name)
            mods.append(
                _Linear(
                    "siglip", f"{layer}self_attn.{torch_name}", (*m, "kernel"), (i,), "tc,cnh->tnh", bias=(*m, "bias")
                )
            )
        out = (*_MHA, "out")
        mods.append(
            _Linear("siglip", f"{layer}self_attn.out_proj", (*out, "kernel"), (i,), "tnh,nhc->tc", bias=(*out, "bias"))
        )
        for n in (0, 1):
            dense = (*_BLOCK, "MlpBlock_0", f"Dense_{n}")
            mods.append(
                _Linear("siglip", f"{layer}mlp.fc{n + 1}", (*dense, "kernel"), (i,), "tc,cf->tf", bias=(*dense, "bias"))
            )
    enc = (*_IMG, "Transformer", "encoder_norm")
    mods.append(_Norm("norm", f"{_VISION}post_layernorm", (*enc, "scale"), (), bias=(*enc, "bias")))
    mods.append(
        _Linear(
            "projection",
            f"{_VLM}multi_modal_projector.linear",
            (*_IMG, "head", "kernel"),
            (),
            "tc,cw->tw",
            bias=(*_IMG, "head", "bias"),
        )
    )
    return mods


def _modules(shapes: Mapping[Path, tuple[int, ...]], model: str) -> list:
    adarms = _detect(shapes, model)
    for path, what in (
        ((*_LLM, "embedder", "input_embedding"), "the token embedding"),
        ((*_LLM, "layers", "attn", "attn_vec_einsum", "w"), "PaliGemma's attention"),
        ((*_LLM, "layers", "attn", "attn_vec_einsum_1", "w"), "the action expert's attention"),
        ((*_BLOCK, "LayerNorm_0", "scale"), "SigLIP"),
        (("action_in_proj", "kernel"), "the action projection"),
    ):
        _require(shapes, path, what)
    depth = shapes[(*_LLM, "layers", "attn", "attn_vec_einsum", "w")][0]
    embedder = (*_LLM, "embedder", "input_embedding")
    expert_width = shapes[(*_LLM, "layers", "attn", "attn_vec_einsum_1", "w")][-1]
    mods = _siglip(shapes)
    mods.append(_Embedding("embedding", f"{_LANGUAGE}embed_tokens.weight", embedder))
    mods += _gemma(shapes, _LANGUAGE, "", depth, adarms=False)
    mods += _gemma(shapes, _EXPERT, "_1", depth, adarms=adarms)
    mods.append(_Unused("unused", _EXPERT_HEAD, lambda s: (s[embedder][0], expert_width)))
    projections = ["action_in_proj", "action_out_proj"]
    projections += (
        ["time_mlp_in", "time_mlp_out"] if adarms else ["state_proj", "action_time_mlp_in", "action_time_mlp_out"]
    )
    for name in projections:
        _require(shapes, (name, "kernel"), "a projection of PI0Pytorch")
        mods.append(_Linear("projection", name, (name, "kernel"), (), "ti,io->to", bias=(name, "bias")))
    return mods


def _shapes(params: Mapping[Path, np.ndarray]) -> dict[Path, tuple[int, ...]]:
    return {tuple(p): tuple(a.shape) for p, a in params.items()}


def expected(params_or_shapes: Mapping, model: str, dtype: str = "bfloat16") -> dict[str, tuple[tuple, np.dtype]]:
    """The key set of the export, each with its shape and dtype, from the tree's shapes alone (no array data)."""
    shapes = {tuple(p): tuple(getattr(a, "shape", a)) for p, a in params_or_shapes.items()}
    _, specs = _layout(shapes, model, _dtype(dtype))
    return {key: (shape, stored) for key, (_, shape, stored) in specs.items()}


def _layout(
    shapes: Mapping[Path, tuple[int, ...]],
    model: str,
    want: np.dtype,
    dtype_of: Callable[[str], np.dtype] | None = None,
) -> tuple[list, dict[str, tuple[int, tuple[int, ...], np.dtype]]]:
    """The export's modules, and each key's module index, shape and dtype (``dtype_of``'s, else ``want``'s mix)."""
    modules = _modules(shapes, model)
    specs = {}
    for index, mod in enumerate(modules):
        for key, shape in mod.shapes(shapes).items():
            specs[key] = (index, shape, _stored_dtype(key, want) if dtype_of is None else dtype_of(key))
    return modules, specs


def _dtype(dtype) -> np.dtype:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise errors.ConfigError(f"PyTorch export dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


class StateDict(Mapping):
    """``PI0Pytorch``'s state dict (as a strict ``safetensors.torch.load_model`` wants it) from the merged tree, made
    one module (one layer's tensors) at a time as its keys are read: in the order of iteration, which is the file's,
    only the current module's tensors are held. ``spec(key)`` gives a key's shape and dtype without making it.
    ``dtype_of``: each key's dtype instead of ``dtype``'s mix (another framework's, e.g. LeRobot's: each tensor is made
    once, in the dtype it is written in)."""

    def __init__(
        self,
        params: Mapping[Path, np.ndarray],
        model: str,
        dtype: str | np.dtype = "bfloat16",
        *,
        dtype_of: Callable[[str], np.dtype] | None = None,
    ) -> None:
        self._params = {tuple(p): a for p, a in params.items()}
        self._modules, self._specs = _layout(_shapes(self._params), model, _dtype(dtype), dtype_of)
        self._current: tuple[int, dict[str, np.ndarray]] = (-1, {})

    def spec(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        _, shape, dtype = self._specs[key]
        return shape, dtype

    def __getitem__(self, key: str) -> np.ndarray:
        index = self._specs[key][0]
        if self._current[0] != index:
            made = self._modules[index].tensors(self._params)
            self._current = (index, {k: self._cast(k, t) for k, t in made.items()})
        return self._current[1][key]

    def _cast(self, key: str, tensor: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(tensor).astype(self._specs[key][2], copy=False))

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)


def state_dict(
    params: Mapping[Path, np.ndarray],
    model: str,
    dtype: str | np.dtype = "bfloat16",
    *,
    dtype_of: Callable[[str], np.dtype] | None = None,
) -> dict[str, np.ndarray]:
    """``StateDict``, made whole: every tensor in memory at once (the tests' and small trees' form)."""
    return dict(StateDict(params, model, dtype, dtype_of=dtype_of).items())


def config_json(
    *, action_dim: int, action_horizon: int, paligemma_variant: str, action_expert_variant: str, dtype: str
) -> dict:
    """The ``config.json`` openpi's converter (``examples/convert_jax_model_to_pytorch.py``) writes next to it."""
    return {
        "action_dim": action_dim,
        "action_horizon": action_horizon,
        "paligemma_variant": paligemma_variant,
        "action_expert_variant": action_expert_variant,
        "precision": _dtype(dtype).name,
    }


def write(directory: str | os.PathLike, tensors: Mapping[str, np.ndarray], *, config_json: dict) -> pathlib.Path:
    """Writes ``model.safetensors`` and ``config.json`` into ``directory`` (created if missing); returns it."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, directory / SAFETENSORS_FILE, metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config_json, indent=2) + "\n")
    return directory


# safetensors' dtype names (its format's header), for the dtypes the exports write.
_SAFETENSORS_DTYPES = {
    BFLOAT16: "BF16",
    FLOAT32: "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.float64): "F64",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
}


def save_safetensors(tensors: Mapping[str, np.ndarray], path: pathlib.Path, *, metadata: dict | None) -> None:
    """Writes ``tensors`` as a safetensors file, one tensor at a time in the mapping's order, so that a lazy mapping
    (``StateDict``) is never held whole; safetensors' own writer (``save_file``) takes every tensor at once and copies
    each to bytes first. The format: the header's length (u64, little-endian), the JSON header (each key's dtype,
    shape and ``data_offsets`` into the data that follows, contiguous; ``__metadata__``), padded with spaces to 8
    bytes, then the tensors' bytes, C order. Read back by safetensors itself (``export``'s proof, the frameworks).

    A mapping with ``spec(key) -> (shape, dtype)`` gives the header without making its tensors. Raises OSError for a
    write the filesystem refuses (a full disk), ValueError for a tensor that differs from its spec.
    """
    spec = getattr(tensors, "spec", None) or (lambda key: (tensors[key].shape, tensors[key].dtype))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    specs, offset = [], 0
    for key in tensors:
        shape, dtype = spec(key)
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        specs.append((key, tuple(shape), np.dtype(dtype)))
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for key, shape, dtype in specs:
            tensor = np.ascontiguousarray(tensors[key])
            if tensor.shape != shape or tensor.dtype != dtype:
                raise ValueError(f"{key}: made {tensor.shape} {tensor.dtype}, its header says {shape} {dtype}")
            f.write(tensor.reshape(-1).view(np.uint8).data)


def read(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a written ``model.safetensors`` (bfloat16 as ``ml_dtypes.bfloat16``)."""
    import safetensors.numpy

    return safetensors.numpy.load_file(pathlib.Path(directory) / SAFETENSORS_FILE)


def check(
    tensors: Mapping[str, np.ndarray], params: Mapping[Path, np.ndarray], model: str, *, seed: int = 0
) -> dict[str, dict]:
    """Proves every exported tensor against the merged tree through its module's equation (see the module doc).

    Returns ``{kind: {"tensors", "max_rel_error", "bound_ratio", "rounding_ratio"}}``: the worst error against the
    merged arrays relative to the largest output, and the worst error over its bound, against the merged arrays
    rounded as stored (``bound_ratio``, float32 rounding) and as merged (``rounding_ratio``, the stored dtype's
    rounding). Raises ``NumericsError`` on any failure.
    """
    params = {tuple(p): a for p, a in params.items()}
    mods = _modules(_shapes(params), model)
    shapes = _shapes(params)
    want = {k: shape for mod in mods for k, shape in mod.shapes(shapes).items()}
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise errors.NumericsError(
            f"PyTorch export: {len(missing)} missing key(s) {missing[:3]}, {len(extra)} unexpected {extra[:3]}"
        )
    for key, shape in want.items():
        t = tensors[key]
        if tuple(t.shape) != shape or np.dtype(t.dtype) not in _UNIT_ROUNDOFF:
            raise errors.NumericsError(
                f"PyTorch export: {key} is {tuple(t.shape)} {np.dtype(t.dtype).name}, expected {shape} "
                "float32 or bfloat16"
            )
    rng = np.random.default_rng(seed)
    report: dict[str, dict] = {}
    for mod in mods:
        stats = report.setdefault(
            mod.kind, {"tensors": 0, "max_rel_error": 0.0, "bound_ratio": 0.0, "rounding_ratio": 0.0}
        )
        stats["tensors"] += len(mod.shapes(shapes))
        for got, want_y, mag, unit, as_merged in mod.probe(tensors, params, rng):
            err = np.abs(got - want_y)
            bound = (unit + _F32_OUTPUT) * mag
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(err == 0, 0.0, err / bound)  # A non-zero error against a zero bound: inf.
            worst = float(np.max(ratio)) if np.all(np.isfinite(got)) else math.inf
            which = "rounding_ratio" if as_merged else "bound_ratio"
            stats[which] = max(stats[which], worst)
            if as_merged:
                scale = float(np.max(np.abs(want_y))) or 1.0
                stats["max_rel_error"] = max(stats["max_rel_error"], float(np.max(err)) / scale)
            if not worst <= 1.0:
                where = getattr(mod, "prefix", None) or mod.key
                raise errors.NumericsError(
                    f"PyTorch export: {where} ({mod.kind}) does not reproduce the merged tree through its equation "
                    f"({'as merged' if as_merged else 'rounded as stored'}): error {float(np.max(err)):.3g} is "
                    f"{worst:.3g} times the bound"
                )
    return report
