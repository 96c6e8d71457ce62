"""Shared pieces of the family builders: config readers, group names and the exact name check.

Each family module lists its tensors as data through `SpecBuilder`; `finish` matches them against
the checkpoint's names and refuses unknown or missing ones instead of silently skipping them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from hfmerge.arch.spec import ArchSpec, AxisRole, ExpertSlot, Layout, PermGroup, TensorSpec
from hfmerge.errors import ArchitectureError

RESIDUAL = "residual"
R = AxisRole(RESIDUAL)
MAX_LISTED = 12  # names shown per problem in an error; the rest are counted


def mlp_group(layer: int) -> str:
    """Name of the FF group of one block."""
    return f"layers.{layer}.mlp"


def attn_group(layer: int) -> str:
    """Name of the attention group of one block."""
    return f"layers.{layer}.attn"


def ff(layer: int) -> AxisRole:
    """Axis role: the FF hidden units of one block."""
    return AxisRole(mlp_group(layer))


def attn(layer: int, layout: Layout) -> AxisRole:
    """Axis role: one head-major attention axis of one block."""
    return AxisRole(attn_group(layer), layout)


def config_int(
    config: Mapping[str, Any], *keys: str, label: str, default: int | None = None
) -> int:
    """The first of `keys` present in config.json as a positive int, else `default`, else error."""
    for key in keys:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ArchitectureError(
                label,
                f"config.json field {key!r} is {value!r}, not a positive integer",
                fix="use the model's original config.json",
            )
        return value
    if default is not None:
        return default
    raise ArchitectureError(
        label,
        f"config.json has no {' or '.join(repr(k) for k in keys)}",
        fix="use the model's original config.json",
    )


def config_flag(config: Mapping[str, Any], key: str, *, default: bool) -> bool:
    """A boolean config.json field; a missing or null field means the family's default."""
    value = config.get(key)
    return default if value is None else bool(value)


def split_heads(hidden: int, num_heads: int, *, label: str) -> int:
    """head_dim when the config does not give one: hidden_size must split evenly over the heads."""
    if hidden % num_heads:
        raise ArchitectureError(
            label, f"hidden size {hidden} does not split into {num_heads} heads"
        )
    return hidden // num_heads


def attention_group(
    layer: int,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    qk_free_dims: tuple[int, int],
    label: str,
) -> PermGroup:
    """The attention group of one block, after checking that GQA splits evenly."""
    if num_heads % num_kv_heads:
        raise ArchitectureError(
            label, f"{num_heads} attention heads do not split into {num_kv_heads} key/value heads"
        )
    return PermGroup(
        attn_group(layer),
        "attention",
        num_heads * head_dim,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        qk_free_dims=qk_free_dims,
    )


def detect_prefix(
    names: Collection[str], probe: str, prefixes: tuple[str, ...], *, label: str, family: str
) -> str:
    """The name prefix (e.g. "model." for *ForCausalLM, "" for a bare model) that holds `probe`."""
    for prefix in prefixes:
        if prefix + probe in names:
            return prefix
    looked = ", ".join(repr(p + probe) for p in prefixes)
    raise ArchitectureError(
        label,
        f"its checkpoint has none of {looked}, so it is not a {family} "
        "checkpoint that hfmerge knows",
    )


def has_lm_head(
    config: Mapping[str, Any], names: Collection[str], *, prefix: str, head_names: tuple[str, ...]
) -> bool:
    """Whether the checkpoint is a causal-LM class: prefixed body, head tensor or config says so."""
    architectures = config.get("architectures") or []
    says_lm = any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return bool(prefix) or says_lm or any(n in names for n in head_names)


def listing(names: Collection[str]) -> str:
    """At most MAX_LISTED names, then a count of the rest."""
    ordered = sorted(names)
    shown = ", ".join(ordered[:MAX_LISTED])
    more = len(ordered) - MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


@dataclass(frozen=True)
class _Entry:
    """One tensor the family may hold; `names` are accepted spellings, the canonical one first."""

    names: tuple[str, ...]
    axes: tuple[AxisRole | None, ...]
    required: bool
    buffer: bool
    tied_to: str | None  # absent when tied: recorded in ArchSpec.tied instead
    expert: ExpertSlot | None = None  # a tensor of one expert: moves whole with it


@dataclass
class SpecBuilder:
    """Collects one family's groups and tensors, then matches them against a checkpoint."""

    family: str
    model_type: str
    label: str
    groups: dict[str, PermGroup] = field(default_factory=dict)
    entries: list[_Entry] = field(default_factory=list)
    norm_readers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    norm_biases: dict[str, str] = field(default_factory=dict)
    centred_norms: bool = False  # see ArchSpec
    rotary: bool = True
    fold_refusal: str = ""

    def group(self, group: PermGroup) -> None:
        """Declare a permutation group."""
        self.groups[group.name] = group

    def add(
        self,
        name: str | tuple[str, ...],
        *axes: AxisRole | None,
        required: bool = True,
        expert: ExpertSlot | None = None,
    ) -> None:
        """A parameter; a tuple of names gives accepted spellings (first = the usual one).

        `expert`: the tensor belongs to that expert (its name holds `experts.{index}.`)."""
        names = (name,) if isinstance(name, str) else name
        self.entries.append(
            _Entry(names, axes, required, buffer=False, tied_to=None, expert=expert)
        )

    def buffer(self, name: str, *, ndim: int) -> None:
        """A non-parameter buffer that some checkpoints hold: optional, never permuted."""
        self.entries.append(
            _Entry((name,), (None,) * ndim, required=False, buffer=True, tied_to=None)
        )

    def tied(
        self, name: str | tuple[str, ...], *axes: AxisRole | None, to: str, is_tied: bool
    ) -> None:
        """A tensor that shares storage with `to` when tied (then optional), required otherwise."""
        names = (name,) if isinstance(name, str) else name
        self.entries.append(
            _Entry(names, axes, required=not is_tied, buffer=False, tied_to=to if is_tied else None)
        )

    def norm(self, name: str, *, readers: tuple[str, ...], bias: str | None = None) -> None:
        """A residual-width norm gain `name` (added with `add`), the tensors reading it and, for
        a LayerNorm, its bias."""
        self.norm_readers[name] = readers
        if bias is not None:
            self.norm_biases[name] = bias

    def finish(self, tensor_names: Collection[str]) -> ArchSpec:
        """The spec restricted to the checkpoint's names; unknown or missing names are an error."""
        names = set(tensor_names)
        tensors: dict[str, TensorSpec] = {}
        tied: dict[str, str] = {}
        missing: list[str] = []
        for entry in self.entries:
            present = [n for n in entry.names if n in names]
            if len(present) > 1:
                raise ArchitectureError(
                    self.label,
                    f"its checkpoint holds one tensor under several names: {', '.join(present)}",
                )
            if present:
                tensors[present[0]] = TensorSpec(
                    present[0], entry.axes, buffer=entry.buffer, expert=entry.expert
                )
            elif entry.tied_to is not None:
                tied[entry.names[0]] = entry.tied_to
            elif entry.required:
                missing.append(entry.names[0])
        self._check_names(names - tensors.keys(), missing)
        readers = {
            norm: tuple(r for r in found if r in tensors or r in tied)
            for norm, found in self.norm_readers.items()
            if norm in tensors
        }
        return ArchSpec(
            self.family,
            self.model_type,
            dict(self.groups),
            tensors,
            tied,
            norm_readers=readers,
            norm_biases={n: b for n, b in self.norm_biases.items() if n in readers},
            reader_biases=_reader_biases(readers, tensors),
            centred_norms=self.centred_norms,
            rotary=self.rotary,
            fold_refusal=self.fold_refusal,
        )

    def _check_names(self, unknown: Collection[str], missing: Collection[str]) -> None:
        problems = []
        if unknown:
            problems.append(
                f"{len(unknown)} checkpoint tensor(s) are not in the {self.family} "
                f"spec ({listing(unknown)})"
            )
        if missing:
            problems.append(
                f"{len(missing)} tensor(s) of the {self.family} spec are missing from "
                f"the checkpoint ({listing(missing)})"
            )
        if problems:
            raise ArchitectureError(
                self.label,
                "; ".join(problems),
                fix=f"check that config.json (model_type {self.model_type!r}, sizes, bias and "
                "tying flags) matches the weights; modified or unsupported variants of a family "
                "(extra heads, cross-attention, relative positions) cannot be aligned",
            )


def _reader_biases(
    readers: dict[str, tuple[str, ...]], tensors: Mapping[str, TensorSpec]
) -> dict[str, str]:
    """Norm reader `X.weight` -> `X.bias` where the checkpoint holds one (as every transformers
    Linear and Conv1D names them); a tied head has none."""
    found = {r: r.removesuffix(".weight") + ".bias" for rs in readers.values() for r in rs}
    return {r: bias for r, bias in found.items() if r.endswith(".weight") and bias in tensors}
