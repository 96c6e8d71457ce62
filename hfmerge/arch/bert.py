"""BERT (BertModel, BertForMaskedLM, BertForPreTraining): post-LayerNorm encoder, learned positions.

The MLM decoder is tied to the word embeddings, so `cls.predictions.transform.dense` reads and
writes the residual basis; the pooler output (and the NSP head reading it) keeps its original basis.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from hfmerge.arch.common import (
    RESIDUAL,
    R,
    SpecBuilder,
    attention_group,
    attn,
    config_flag,
    config_int,
    detect_prefix,
    ff,
    mlp_group,
    split_heads,
)
from hfmerge.arch.spec import ArchSpec, Layout, PermGroup

NAME = "bert"
MODEL_TYPES = ("bert",)
DESCRIPTION = "BERT encoders (BertModel, BertForMaskedLM, BertForPreTraining); tied MLM decoder"
MLM_HEAD = "cls.predictions."
POST_LN = (
    "BERT is post-LN: each LayerNorm normalises the residual sum after a block (and after the "
    "embeddings), so its output is the residual stream itself, which every later block reads "
    "and adds to. Its gain and bias act on the stream, not on one layer's input: they cannot be "
    "folded into readers, and a LayerNorm with a gain other than 1 does not commute with a "
    "rotation of the stream"
)


def _norm(b: SpecBuilder, base: str) -> None:
    """A residual LayerNorm; old TF-converted checkpoints spell weight/bias as gamma/beta."""
    b.add((f"{base}.weight", f"{base}.gamma"), R)
    b.add((f"{base}.bias", f"{base}.beta"), R)


def _embeddings(b: SpecBuilder, p: str) -> None:
    # Rows are token ids / positions / segment ids: never permuted; columns live in the residual.
    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        b.add(f"{p}embeddings.{table}.weight", None, R)
    _norm(b, f"{p}embeddings.LayerNorm")
    b.buffer(f"{p}embeddings.position_ids", ndim=2)
    b.buffer(f"{p}embeddings.token_type_ids", ndim=2)


def _layer(b: SpecBuilder, p: str, i: int) -> None:
    base = f"{p}encoder.layer.{i}."
    for proj, layout in (("query", Layout.Q), ("key", Layout.K), ("value", Layout.V)):
        b.add(f"{base}attention.self.{proj}.weight", attn(i, layout), R)
        b.add(f"{base}attention.self.{proj}.bias", attn(i, layout))
    b.add(f"{base}attention.output.dense.weight", R, attn(i, Layout.O))
    b.add(f"{base}attention.output.dense.bias", R)
    _norm(b, f"{base}attention.output.LayerNorm")
    b.add(f"{base}intermediate.dense.weight", ff(i), R)
    b.add(f"{base}intermediate.dense.bias", ff(i))
    b.add(f"{base}output.dense.weight", R, ff(i))
    b.add(f"{base}output.dense.bias", R)
    _norm(b, f"{base}output.LayerNorm")


def _pooler(b: SpecBuilder, p: str) -> None:
    # The pooled output is a model output (and the NSP head's input): its rows keep their order.
    b.add(f"{p}pooler.dense.weight", None, R)
    b.add(f"{p}pooler.dense.bias", None)


def _mlm_head(b: SpecBuilder, p: str, *, is_tied: bool) -> None:
    # transform.dense writes into the space the tied decoder reads (word embeddings): residual rows.
    b.add(f"{MLM_HEAD}transform.dense.weight", R, R)
    b.add(f"{MLM_HEAD}transform.dense.bias", R)
    _norm(b, f"{MLM_HEAD}transform.LayerNorm")
    b.add(f"{MLM_HEAD}bias", None)
    b.tied(
        f"{MLM_HEAD}decoder.weight",
        None,
        R,
        to=f"{p}embeddings.word_embeddings.weight",
        is_tied=is_tied,
    )
    b.tied(f"{MLM_HEAD}decoder.bias", None, to=f"{MLM_HEAD}bias", is_tied=True)


def _nsp_head(b: SpecBuilder) -> None:
    # Reads the pooled output, whose basis is never permuted.
    b.add("cls.seq_relationship.weight", None, None)
    b.add("cls.seq_relationship.bias", None)


def build(
    config: dict[str, Any], tensor_names: Collection[str], *, label: str = "model"
) -> ArchSpec:
    """The BERT spec of one checkpoint; the prefix and heads are read from its tensor names."""
    hidden = config_int(config, "hidden_size", label=label)
    heads = config_int(config, "num_attention_heads", label=label)
    head_dim = split_heads(hidden, heads, label=label)
    layers = config_int(config, "num_hidden_layers", label=label)
    inner = config_int(config, "intermediate_size", label=label)
    names = set(tensor_names)
    p = detect_prefix(
        names, "embeddings.word_embeddings.weight", ("bert.", ""), label=label, family=NAME
    )
    b = SpecBuilder(NAME, str(config.get("model_type", NAME)), label)
    b.rotary = False
    b.fold_refusal = POST_LN
    b.group(PermGroup(RESIDUAL, "residual", hidden))
    _embeddings(b, p)
    for i in range(layers):
        b.group(PermGroup(mlp_group(i), "ff", inner))
        # No rotary embedding: Q/K may reorder every dim inside a head.
        b.group(
            attention_group(
                i,
                num_heads=heads,
                num_kv_heads=heads,
                head_dim=head_dim,
                qk_free_dims=(0, head_dim),
                label=label,
            )
        )
        _layer(b, p, i)
    if f"{p}pooler.dense.weight" in names:
        _pooler(b, p)
    if f"{MLM_HEAD}transform.dense.weight" in names:
        _mlm_head(b, p, is_tied=config_flag(config, "tie_word_embeddings", default=True))
    if "cls.seq_relationship.weight" in names:
        _nsp_head(b)
    return b.finish(names)
