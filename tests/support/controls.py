"""Negative controls of permutation symmetries: tiny float64 models, and how far outputs move.

A kept symmetry moves float64 outputs by less than KEPT; a broken one must move some output by more
than CHANGED.
"""

from __future__ import annotations

import functools

import torch
from transformers import PreTrainedModel

from hfmerge.arch import spec_for
from hfmerge.arch.permute import identity_permutations
from hfmerge.arch.spec import ArchSpec, AttentionPerm, Permutations
from tests.support.tiny_models import make_tiny_model, max_abs_diff, model_outputs, tiny_batch

CHANGED = 1e-3  # a broken symmetry must move some output by more than this
KEPT = 1e-10  # a kept symmetry moves float64 outputs by less than this


@functools.cache
def tiny(kind: str) -> tuple[PreTrainedModel, ArchSpec]:
    """One float64 model per kind and its spec (from the in-memory state dict names)."""
    model = make_tiny_model(kind, dtype=torch.float64)
    return model, spec_for(model.config.to_dict(), model.state_dict().keys())


def tiny_params(kind: str) -> dict[str, torch.Tensor]:
    """A copy of the tiny model's spec tensors (its checkpoint's, a tied head absent)."""
    model, spec = tiny(kind)
    return {n: t.clone() for n, t in model.state_dict().items() if n in spec.tensors}


def state_of(kind: str) -> tuple[dict[str, torch.Tensor], ArchSpec]:
    """A copy of the tiny model's state dict (tests may edit it) and its spec."""
    model, spec = tiny(kind)
    return {name: t.clone() for name, t in model.state_dict().items()}, spec


def outputs_after(kind: str, state: dict[str, torch.Tensor]) -> float:
    """Largest output change after loading `state` into a copy of the tiny float64 model."""
    model, _ = tiny(kind)
    changed = make_tiny_model(kind, seed=77, dtype=torch.float64)
    changed.load_state_dict(state, strict=True)
    inputs = tiny_batch(kind, seed=20)
    return max_abs_diff(model_outputs(model, inputs), model_outputs(changed, inputs))


def attention_perm(perms: Permutations, name: str) -> AttentionPerm:
    """The attention permutation of group `name`."""
    perm = perms[name]
    assert isinstance(perm, AttentionPerm)
    return perm


def attention_only(spec: ArchSpec, layer: int, **parts: torch.Tensor) -> Permutations:
    """Identity everywhere except the named parts of one layer's attention permutation."""
    perm = attention_perm(identity_permutations(spec), f"layers.{layer}.attn")
    fields = {
        "kv_heads": perm.kv_heads,
        "q_in_group": perm.q_in_group,
        "qk_dims": perm.qk_dims,
        "vo_dims": perm.vo_dims,
        **parts,
    }
    return {f"layers.{layer}.attn": AttentionPerm(**fields)}


def reversed_range(rows: int, dim: int, start: int, end: int) -> torch.Tensor:
    """[rows, dim] within-head orders reversing dims [start, end): every dim there moves."""
    out = torch.arange(dim).repeat(rows, 1)  # [rows, dim]
    out[:, start:end] = torch.arange(end - 1, start - 1, -1)
    return out
