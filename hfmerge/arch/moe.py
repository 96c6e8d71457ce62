"""Sparse mixture-of-experts FF blocks of Llama-style decoders (Mixtral, Qwen3-MoE).

An MoE block is a router (`gate.weight`, [num_experts, hidden]) and `num_experts` gated FF experts,
saved as separate tensors per expert (`experts.{e}.w1.weight`, ...). Two kinds of symmetry:

- the order of the experts (`layers.{i}.experts`): the router picks experts by its rows, so
  moving expert e's tensors to slot s and router row e to row s together changes nothing;
- each expert's FF units (`layers.{i}.experts.{e}.mlp`): gate and up rows share one order, which
  the down projection's input reads, as in a dense SwiGLU block.

An expert's FF group is keyed by the expert (see `arch/spec.py`): it travels with it when the
experts are reordered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hfmerge.arch.common import R, SpecBuilder, config_int
from hfmerge.arch.spec import AxisRole, ExpertSlot, PermGroup
from hfmerge.errors import ArchitectureError


@dataclass(frozen=True)
class MoeBlock:
    """How one family names its MoE block: its module and the expert projections."""

    module: str  # "block_sparse_moe" (Mixtral), "mlp" (Qwen3-MoE)
    gate_up: tuple[
        str, str
    ]  # the two rows multiplied elementwise: ("w1", "w3"), ("gate_proj", ...)
    down: str  # the projection reading the FF units: "w2", "down_proj"


@dataclass(frozen=True)
class MoeShape:
    """A checkpoint's MoE sizes, from config.json."""

    num_experts: int
    inner: int  # FF units per expert
    sparse: frozenset[int]  # block indices with an MoE block; the others hold a dense FF


def experts_group(layer: int) -> str:
    """Name of the expert-order group of one block."""
    return f"layers.{layer}.experts"


def expert_mlp_group(layer: int, expert: int) -> str:
    """Name of the FF group of one expert (keyed by the expert, not by its slot)."""
    return f"{experts_group(layer)}.{expert}.mlp"


def moe_shape(config: Mapping[str, Any], layers: int, *, label: str) -> MoeShape:
    """Experts per block, their FF width and which blocks are sparse, as transformers reads them.

    Qwen3-MoE keeps a dense FF in the blocks listed in `mlp_only_layers` and in those whose index
    + 1 is not a multiple of `decoder_sparse_step`; Mixtral has neither field: every block is
    sparse.
    """
    experts = config_int(config, "num_experts", "num_local_experts", label=label)
    inner = config_int(config, "moe_intermediate_size", "intermediate_size", label=label)
    step = config_int(config, "decoder_sparse_step", label=label, default=1)
    dense_only = config.get("mlp_only_layers") or []
    if not isinstance(dense_only, list) or not all(isinstance(i, int) for i in dense_only):
        raise ArchitectureError(
            label,
            f"config.json field 'mlp_only_layers' is {dense_only!r}, not a list of block indices",
            fix="use the model's original config.json",
        )
    sparse = frozenset(i for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
    return MoeShape(experts, inner, sparse)


def add_moe(b: SpecBuilder, base: str, layer: int, block: MoeBlock, shape: MoeShape) -> None:
    """The groups and tensors of one MoE block; `base` is the block's prefix (`model.layers.3.`)."""
    order = experts_group(layer)
    b.group(PermGroup(order, "experts", shape.num_experts))
    module = f"{base}{block.module}."
    # Router rows are the experts' logits: row e moves with expert e; columns read the residual.
    b.add(f"{module}gate.weight", AxisRole(order), R)
    for e in range(shape.num_experts):
        slot = ExpertSlot(order, e)
        units = AxisRole(expert_mlp_group(layer, e))
        b.group(PermGroup(units.group, "ff", shape.inner, expert=slot))
        expert = f"{module}experts.{e}."
        for proj in block.gate_up:
            b.add(f"{expert}{proj}.weight", units, R, expert=slot)
        b.add(f"{expert}{block.down}.weight", R, units, expert=slot)
