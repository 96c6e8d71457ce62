"""Where each tensor of a PEFT LoRA adapter lands on its base, checked from headers alone.

PEFT saves the adapter of module `M` (a name in the base model, e.g.
`model.layers.0.self_attn.q_proj`) as `base_model.model.M.lora_A.weight` [r, in] and
`base_model.model.M.lora_B.weight` [out, r]; they change the base tensor `M.weight` by
`scale·B·A` ([out, in]). An embedding's pair is `M.lora_embedding_A` [r, num_embeddings] and
`M.lora_embedding_B` [dim, r], whose product lands transposed on `M.weight` [num_embeddings, dim],
as it does on a GPT-2 Conv1D weight, stored [in, out]. Any other tensor of the adapter (PEFT's
`modules_to_save`, a trained bias, an embedding saved whole as `M.base_layer.weight`) replaces the
base tensor of the same name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hfmerge.lora.config import AdapterConfig
from hfmerge.tensors import TensorInfo, dtype_kind

PEFT_PREFIX = "base_model.model."
_PAIR_SUFFIXES = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
}


@dataclass(frozen=True)
class LowRankDelta:
    """One base tensor's LoRA pair: `tensor += scale·B·A`, transposed onto [in, out] storage."""

    tensor: str  # the base tensor it changes
    a: str  # adapter tensor names
    b: str
    rank: int
    scale: float
    transposed: bool  # the base stores [in, out] (Conv1D, embeddings): rows of (B·A)ᵀ


@dataclass(frozen=True)
class AdapterLayout:
    """Every base tensor an adapter changes: low-rank deltas, and whole replacements."""

    deltas: dict[str, LowRankDelta]  # by base tensor name
    replaced: dict[str, str]  # base tensor name -> the adapter tensor that replaces it

    def changes(self, name: str) -> bool:
        """Whether the adapter changes base tensor `name`."""
        return name in self.deltas or name in self.replaced


@dataclass
class _Pair:
    kind: str
    a: TensorInfo | None = None
    b: TensorInfo | None = None


def plan_adapter(
    config: AdapterConfig,
    tensors: Sequence[TensorInfo],
    base: Mapping[str, TensorInfo],
    *,
    conv1d: bool,
) -> tuple[AdapterLayout, list[str]]:
    """The layout of an adapter's `tensors` over the `base` tensors (by name), and every problem.

    `conv1d`: the base family stores its linear weights [in, out] (GPT-2), which decides the
    orientation of a square weight's delta, as PEFT decides it from the layer type.
    """
    problems: list[str] = []
    pairs: dict[str, _Pair] = {}
    replaced: dict[str, str] = {}
    for info in tensors:
        if not info.name.startswith(PEFT_PREFIX):
            problems.append(f"tensor {info.name} is not a PEFT adapter key ({PEFT_PREFIX}…)")
            continue
        if dtype_kind(info.dtype) != "float":
            problems.append(f"tensor {info.name} is {info.dtype}, not a float type")
            continue
        rest = info.name.removeprefix(PEFT_PREFIX)
        part = _pair_part(rest)
        if part is not None:
            module, kind, side = part
            slot = pairs.setdefault(module, _Pair(kind))
            setattr(slot, side.lower(), info)
        elif "lora_" in rest:
            problems.append(f"tensor {info.name} is not a LoRA A/B weight (DoRA or another type)")
        else:
            target = rest.replace(".base_layer.", ".")
            problems += _replacement_problems(info, base.get(target), target)
            replaced[target] = info.name
    deltas: dict[str, LowRankDelta] = {}
    for module, pair in pairs.items():
        delta, found = _delta(module, pair, config, base, conv1d=conv1d)
        problems += found
        if delta is not None:
            deltas[delta.tensor] = delta
    if not deltas and not replaced and not problems:
        problems.append("it holds no LoRA weights")
    return AdapterLayout(deltas=deltas, replaced=replaced), problems


def _pair_part(rest: str) -> tuple[str, str, str] | None:
    """(module, kind, "A" or "B") of a LoRA pair key, without the prefix; None for others."""
    for suffix, (kind, side) in _PAIR_SUFFIXES.items():
        if rest.endswith(suffix):
            return rest.removesuffix(suffix), kind, side
    return None


def _replacement_problems(info: TensorInfo, base: TensorInfo | None, target: str) -> list[str]:
    if base is None:
        return [f"tensor {info.name} replaces {target}, which the base does not have"]
    if tuple(base.shape) != tuple(info.shape):
        return [
            f"tensor {info.name} has shape {list(info.shape)}, but the base's {target} has "
            f"{list(base.shape)}"
        ]
    return []


def _delta(
    module: str,
    pair: _Pair,
    config: AdapterConfig,
    base: Mapping[str, TensorInfo],
    *,
    conv1d: bool,
) -> tuple[LowRankDelta | None, list[str]]:
    """The checked delta of one module's pair, or None and its problems."""
    if pair.a is None or pair.b is None:
        missing = "lora_A" if pair.a is None else "lora_B"
        return None, [f"module {module} has no {missing} weight"]
    a, b = tuple(pair.a.shape), tuple(pair.b.shape)
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        return None, [f"module {module}: lora_A {list(a)} and lora_B {list(b)} do not pair up"]
    rank = a[0]
    problems = []
    if config.rank(module) != rank:
        problems.append(
            f"module {module} has rank {rank} in its weights but {config.rank(module)} in "
            "adapter_config.json (r / rank_pattern)"
        )
    if not config.targets(module):
        problems.append(f"module {module} is not among target_modules {config.target_modules}")
    target = f"{module}.weight"
    weight = base.get(target)
    if weight is None or len(weight.shape) != 2:
        shown = "does not have it" if weight is None else f"has it {len(weight.shape)}-D"
        return None, [*problems, f"module {module} adapts {target}, but the base {shown}"]
    # Linear: delta = B·A is [out, in] = [b0, a1]; an embedding's lands transposed.
    product = (b[0], a[1])
    shape = tuple(weight.shape)
    transposed = _transposed(
        product, shape, kind=pair.kind, ambiguous=conv1d or config.fan_in_fan_out
    )
    if transposed is None:
        problems.append(
            f"module {module}: lora_B·lora_A is {list(product)} (rank {rank}), which does not fit "
            f"the base's {target} {list(shape)}"
        )
    if problems or transposed is None:
        return None, problems
    scale = config.scale(module)
    return LowRankDelta(target, pair.a.name, pair.b.name, rank, scale, transposed), []


def _transposed(
    product: tuple[int, int], shape: tuple[int, ...], *, kind: str, ambiguous: bool
) -> bool | None:
    """Whether the product lands transposed on `shape`; None when it does not fit at all."""
    if kind == "embedding":
        return True if shape == product[::-1] else None
    fits, fits_transposed = shape == product, shape == product[::-1]
    if fits and fits_transposed:  # square: the layer type decides, as in PEFT
        return ambiguous
    if fits or fits_transposed:
        return fits_transposed
    return None
