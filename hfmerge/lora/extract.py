"""A LoRA adapter extracted from a fine-tune: the delta of each linear weight against the base,
factored (`factor.py`) and written in PEFT's format, one tensor at a time.

Only 2-D linear weights become LoRA pairs. Other changed tensors (embeddings, norms, biases) are
skipped, or with `modules_to_save` saved whole: a module without a LoRA pair as PEFT's
`modules_to_save` (every tensor of it, so PEFT's copy of the module is the fine-tune's), the
biases of the LoRA modules as PEFT's `bias: lora_only` saves them (`M.base_layer.bias`). A tied
embedding saved whole does not carry its tie to the output head in PEFT. The factors are kept
(they are small) until every rank is known; then the adapter file is planned and written, the
saved tensors read again from the fine-tune one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from hfmerge.errors import NonFiniteWeightsError
from hfmerge.lora.config import ADAPTER_WEIGHTS
from hfmerge.lora.factor import Factors, RankChoice, factorize
from hfmerge.lora.layout import PEFT_PREFIX
from hfmerge.progress import track
from hfmerge.tensors import (
    OutputTensor,
    PlannedShard,
    ShardPlan,
    ShardWriter,
    TensorInfo,
    TensorReader,
    dtype_kind,
    plan_shards,
)

Kind = Literal["lora", "saved", "skipped", "unchanged"]
# Embedding tables whose module name does not say `embed`: GPT-2's and GPT-J's, T5's and BART's
# shared table, T5's relative position buckets. PEFT adapts an embedding with its own pair kind.
_EMBEDDING_NAMES = frozenset({"wte", "wpe", "shared", "relative_attention_bias"})
_NO_SHARD_CAP = 1 << 62  # PEFT reads one adapter file


@dataclass(frozen=True)
class ExtractedTensor:
    """What happened to one tensor of the fine-tune: its row in the report."""

    name: str
    shape: tuple[int, ...]
    kind: Kind  # lora: a LoRA pair; saved: whole (modules_to_save); skipped/unchanged: left out
    rank: int  # of its LoRA pair; 0 otherwise
    energy: float  # share of its delta's squared Frobenius norm the adapter keeps


@dataclass(frozen=True)
class Extraction:
    """The report of an extraction, tensor by tensor, and the modules saved whole."""

    tensors: tuple[ExtractedTensor, ...]
    modules_to_save: tuple[str, ...]
    lora_biases: bool  # the LoRA modules' biases are saved (PEFT's `bias: lora_only`)

    @property
    def lora(self) -> tuple[ExtractedTensor, ...]:
        """The tensors that became LoRA pairs."""
        return tuple(t for t in self.tensors if t.kind == "lora")


@dataclass(frozen=True)
class ExtractSources:
    """The two checkpoints read and the tensors to compare (the base's non-buffer floats)."""

    base: TensorReader
    model: TensorReader
    tensors: Sequence[TensorInfo]
    label: str  # the fine-tune's name in errors
    conv1d: bool  # linear weights stored [in, out] (GPT-2's Conv1D)


def module_of(name: str) -> str:
    """`model.layers.0.mlp.up_proj.weight` -> `model.layers.0.mlp.up_proj`."""
    return name.rpartition(".")[0]


def is_linear_weight(info: TensorInfo) -> bool:
    """A 2-D `.weight` of a linear layer (not an embedding table): what LoRA adapts."""
    if len(info.shape) != 2 or not info.name.endswith(".weight"):
        return False
    leaf = module_of(info.name).rpartition(".")[2]
    return "embed" not in leaf and leaf not in _EMBEDDING_NAMES


def extract_adapter(
    sources: ExtractSources,
    out_dir: Path,
    choice: RankChoice,
    *,
    modules_to_save: bool,
    device: torch.device,
    progress: bool = True,
) -> Extraction:
    """Write `adapter_model.safetensors` into `out_dir`; what became of every tensor.

    Raises:
        NonFiniteWeightsError: a delta holds NaN or Inf values (nothing usable to factor).
    """
    factors: dict[str, Factors] = {}
    rows: list[ExtractedTensor] = []
    described = "extracting LoRA factors"
    for info in track(list(sources.tensors), description=described, enabled=progress):
        delta = _delta(sources, info, device)
        if is_linear_weight(info):
            # LoRA's B·A is [out, in]; Conv1D stores the weight [in, out]
            found = factorize(delta.T if sources.conv1d else delta, choice)
            factors[info.name] = Factors(found.b.cpu(), found.a.cpu(), found.energy)
            rows.append(ExtractedTensor(info.name, info.shape, "lora", found.rank, found.energy))
        else:
            kind: Kind = "skipped" if bool(delta.any()) else "unchanged"
            kept = 0.0 if kind == "skipped" else 1.0  # an unchanged tensor loses nothing
            rows.append(ExtractedTensor(info.name, info.shape, kind, 0, kept))
    adapted = frozenset(module_of(name) for name in factors)
    changed = [module_of(row.name) for row in rows if row.kind == "skipped"]
    saved = tuple(dict.fromkeys(m for m in changed if m not in adapted)) if modules_to_save else ()
    biases = modules_to_save and any(m in adapted for m in changed)
    whole = frozenset(saved) | (adapted if biases else frozenset())
    rows = [_mark_saved(row, whole) for row in rows]
    _write(sources, out_dir, factors, rows, adapted)
    return Extraction(tuple(rows), saved, biases)


def _delta(sources: ExtractSources, info: TensorInfo, device: torch.device) -> torch.Tensor:
    """Fine-tune minus base of one tensor, float32 on `device`, checked finite."""
    model = sources.model.get(info.name).to(device=device, dtype=torch.float32)
    delta = model.sub_(sources.base.get(info.name).to(device=device, dtype=torch.float32))
    if not bool(torch.isfinite(delta).all()):
        raise NonFiniteWeightsError(
            sources.label,
            info.name,
            nan=int(delta.isnan().sum()),
            posinf=int(delta.isposinf().sum()),
            neginf=int(delta.isneginf().sum()),
            method="extract-lora",
        )
    return delta


def _mark_saved(row: ExtractedTensor, whole: frozenset[str]) -> ExtractedTensor:
    """A tensor of a module saved whole (changed or not: PEFT's copy is the whole module)."""
    if row.kind in ("skipped", "unchanged") and module_of(row.name) in whole:
        return ExtractedTensor(row.name, row.shape, "saved", 0, 1.0)
    return row


def _saved_name(name: str, adapted: frozenset[str]) -> str:
    """The adapter key of a tensor saved whole: a LoRA module's own tensors (its bias) sit
    under `base_layer`, as PEFT names the wrapped layer."""
    module, _, leaf = name.rpartition(".")
    if module in adapted:
        return f"{PEFT_PREFIX}{module}.base_layer.{leaf}"
    return PEFT_PREFIX + name


def _write(
    sources: ExtractSources,
    out_dir: Path,
    factors: dict[str, Factors],
    rows: list[ExtractedTensor],
    adapted: frozenset[str],
) -> None:
    """Plan the one adapter file from the known ranks, then write every tensor into it."""
    dtypes = {info.name: info.dtype for info in sources.tensors}
    planned: list[OutputTensor] = []
    for row in rows:
        if row.kind == "lora":
            pair = factors[row.name]
            a_name, b_name = _pair_names(row.name)
            planned.append(OutputTensor(a_name, "F32", tuple(pair.a.shape)))
            planned.append(OutputTensor(b_name, "F32", tuple(pair.b.shape)))
        elif row.kind == "saved":
            planned.append(
                OutputTensor(_saved_name(row.name, adapted), dtypes[row.name], row.shape)
            )
    single = plan_shards(planned, max_shard_bytes=_NO_SHARD_CAP).shards[0]
    plan = ShardPlan((PlannedShard(ADAPTER_WEIGHTS, single.tensors),))
    with ShardWriter(out_dir, plan, metadata={"format": "pt", "extracted_by": "hfmerge"}) as w:
        for row in rows:
            if row.kind == "lora":
                a_name, b_name = _pair_names(row.name)
                w.write(a_name, factors[row.name].a)
                w.write(b_name, factors[row.name].b)
            elif row.kind == "saved":
                w.write(_saved_name(row.name, adapted), sources.model.get(row.name))


def _pair_names(name: str) -> tuple[str, str]:
    module = PEFT_PREFIX + module_of(name)
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def float_parameters(tensors: Sequence[TensorInfo], buffers: frozenset[str]) -> list[TensorInfo]:
    """The tensors an extraction compares: float, and not buffers."""
    return [t for t in tensors if dtype_kind(t.dtype) == "float" and t.name not in buffers]
