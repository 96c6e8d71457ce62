"""Architecture specs as data: every tensor name, and which permutation group acts on which axis.

A permutation group is a symmetry of the network: reordering the units it names (and every axis that
reads or writes those units) leaves the model's function unchanged. Alignment solves for one
permutation per group; merging and checks only need names, axes and the buffer flag.

Index convention everywhere: a permutation is a gather index, `new[i] = old[perm[i]]`.

Mixtures of experts add an `experts` group per MoE layer: the order of its experts. The checkpoint
holds each expert's projections as separate tensors (`...experts.{e}.w1.weight`), so that group acts
on tensor NAMES as well as on the router's expert axis: output expert slot e is old expert
`perm[e]`, read whole (`arch/permute.py` `source_name`). Each expert has its own FF group
(`layers.{i}.experts.{e}.mlp`), keyed by the expert it belongs to, not by the slot it lands in: the
FF permutation applied to output slot e is the one of old expert `perm[e]`, which travels with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

import torch

GroupKind = Literal["residual", "ff", "attention", "experts"]
# The family of a model_type that no family module covers: names and shapes only, no groups.
GENERIC_FAMILY = "generic"


class Layout(StrEnum):
    """How an axis is laid out in terms of its group's units.

    `UNITS` is a plain axis of `group.size` units (residual stream, FF hidden units); `UNITS_PAIR`
    two such halves side by side, both in the units' order. The other layouts belong to attention
    groups and describe head-major axes, so a head permutation moves whole `head_dim` blocks and
    within-head permutations move entries inside a block.
    """

    UNITS = "units"
    UNITS_PAIR = "units_pair"  # Phi-3 gate_up_proj: [gate | up], each `size` FF units
    Q = "q"  # [num_heads * head_dim]: query rows (or Conv1D columns), head-major
    K = "k"  # [num_kv_heads * head_dim]: key rows
    V = "v"  # [num_kv_heads * head_dim]: value rows
    O = "o"  # noqa: E741 [num_heads * head_dim]: input axis of the attention output projection
    QKV_CONCAT = "qkv_concat"  # GPT-2 c_attn: [Q | K | V], each num_heads * head_dim
    QKV_PER_HEAD = "qkv_per_head"  # GPT-NeoX query_key_value: [head][q | k | v][head_dim]


@dataclass(frozen=True)
class ExpertSlot:
    """Expert `index` of the experts group `group` (e.g. "layers.3.experts")."""

    group: str
    index: int


@dataclass(frozen=True)
class PermGroup:
    """One permutation symmetry of the network.

    For `residual`, `ff` and `experts` groups, `size` units (or experts) are permuted freely. For
    `attention` groups the permutation is structured (see `AttentionPerm`): KV groups move as
    wholes (each with its query heads), query heads may reorder inside their KV group, V/O dims may
    reorder inside each head, and Q/K dims may reorder inside each head only within `qk_free_dims`
    (rotary dims are pinned).
    """

    name: str  # "residual", "layers.3.mlp", "layers.3.attn", "layers.3.experts"
    kind: GroupKind
    size: int  # residual/ff: units; experts: experts; attention: num_heads * head_dim
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    qk_free_dims: tuple[int, int] = (0, 0)  # [start, end) of head dims that Q/K may permute
    expert: ExpertSlot | None = None  # an expert's FF group: the expert it moves with

    @property
    def queries_per_kv(self) -> int:
        """Query heads that share one KV head (1 without GQA)."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class AxisRole:
    """Which group acts on one tensor axis, and how that axis is laid out."""

    group: str
    layout: Layout = Layout.UNITS


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the checkpoint: its name and, per axis, the group acting on it (or None)."""

    name: str
    axes: tuple[AxisRole | None, ...]
    buffer: bool = False  # a non-parameter (e.g. position_ids): copied from the base, never merged
    # A tensor of one expert, named `...experts.{index}....`: it moves whole with its expert.
    expert: ExpertSlot | None = None


@dataclass(frozen=True)
class ArchSpec:
    """The full spec of one checkpoint of one family."""

    family: str  # registry name: "bert", "llama", "gemma", ...; GENERIC_FAMILY for the rest
    model_type: str  # config.json's model_type: "bert", "llama", "mistral", "gemma2", ...
    groups: dict[str, PermGroup]
    tensors: dict[str, TensorSpec]
    # Tensors that share storage with another one and are absent from the checkpoint when tied,
    # e.g. {"lm_head.weight": "model.embed_tokens.weight"}. Informational: never written out.
    tied: dict[str, str] = field(default_factory=dict)
    # Norm gain -> the linear layers that read its output, e.g. {"model.norm.weight":
    # ("lm_head.weight",)}: the data of the norm-folding rewrite (`arch/residual.py`). Empty for
    # families where folding is not exact (Gemma's 1 + gain, norms after a block's output).
    norm_readers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # LayerNorm gain -> its bias (`arch/residual.py` folds it too); absent for RMSNorms.
    norm_biases: dict[str, str] = field(default_factory=dict)
    # Norm reader weight -> its own bias, where it has one (it can absorb the norm's bias).
    reader_biases: dict[str, str] = field(default_factory=dict)
    # The residual norms subtract the mean (LayerNorm): a residual rotation keeps the function
    # only if it fixes the all-ones direction (`arch/residual.py` `rotation_space`).
    centred_norms: bool = False
    # Whether RoPE turns queries and keys; False for learned absolute positions (GPT-2, BERT),
    # where a within-head Q/K map may be any orthogonal matrix (`arch/head_maps.py`).
    rotary: bool = True
    # Why the norm gains do not fold, when the family knows (`require_foldable`'s message).
    fold_refusal: str = ""

    @property
    def permutable(self) -> bool:
        """Whether the spec has permutation groups: False for a generic (familyless) model, which
        merges tensor by tensor but cannot be aligned, repaired or probed block by block."""
        return self.family != GENERIC_FAMILY

    @property
    def foldable(self) -> bool:
        """Whether every residual-width norm's gain (and LayerNorm bias) folds into its readers."""
        return bool(self.norm_readers)

    @property
    def has_experts(self) -> bool:
        """Whether the spec has mixture-of-experts layers (an `experts` group)."""
        return any(g.kind == "experts" for g in self.groups.values())

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks (count of attention groups)."""
        return sum(1 for g in self.groups.values() if g.kind == "attention")


@dataclass(frozen=True)
class AttentionPerm:
    """A structured permutation of one attention group (gather indices, `new[i] = old[perm[i]]`).

    Attributes:
        kv_heads: [num_kv_heads]; new KV slot g holds old KV head `kv_heads[g]`.
        q_in_group: [num_kv_heads, queries_per_kv]; in new KV slot g, new query position j holds old
            query position `q_in_group[g, j]` within the old group `kv_heads[g]`.
        qk_dims: [num_kv_heads, head_dim]; within-head Q/K order of the head in new slot g (shared
            by the KV head and all its query heads). Identity outside `qk_free_dims`.
        vo_dims: [num_kv_heads, head_dim]; within-head V order of the head in new slot g, shared by
            the matching output-projection input dims of all its query heads.
    """

    kv_heads: torch.Tensor
    q_in_group: torch.Tensor
    qk_dims: torch.Tensor
    vo_dims: torch.Tensor


GroupPerm = torch.Tensor | AttentionPerm  # [size] index (residual/ff/experts); AttentionPerm
Permutations = dict[str, GroupPerm]  # group name -> its permutation
