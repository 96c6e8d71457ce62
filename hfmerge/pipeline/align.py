"""The recipe's `align:` step: every input mapped into the base's basis before merging.

Permutations (and, for the orthogonal methods, the norm fold, a residual rotation and within-head
maps of attention) are solved per input against the base and applied on read by the engine, so
the aligned inputs are never written out. The fold unties a tied head (`untie_folded_heads`): the
output is then written untied. With `report_barrier`, the loss barrier between the base
and each input is measured with and without alignment for the model card.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hfmerge.arch.config import config_field
from hfmerge.arch.layers import layer_of
from hfmerge.arch.residual import FOLDED, BasisMap, mapped_names, reader_norms, require_foldable
from hfmerge.engine.plan import MergePlan, untie_heads
from hfmerge.recipe.align_methods import ACTIVATION_METHODS, ORTHOGONAL_METHODS
from hfmerge.recipe.schema import Recipe
from hfmerge.sources.inspection import InspectedModel

if TYPE_CHECKING:
    from hfmerge.pipeline.repair import RepairReport


@dataclass(frozen=True)
class BarrierRow:
    """Barrier between the base and one input, before and after alignment."""

    model: str
    vanilla: float
    aligned: float
    midpoint_vanilla: float
    midpoint_aligned: float
    repaired: float | None = None  # aligned + REPAIR, when the recipe repairs
    midpoint_repaired: float | None = None


@dataclass(frozen=True)
class Alignment:
    """Per-input maps into the base's basis (None: read as it is) and the optional report."""

    method: str
    bases: list[BasisMap | None]
    barriers: list[BarrierRow] = field(default_factory=list)
    untied: list[str] = field(default_factory=list)  # heads written untied (`untied_heads`)

    def card_section(self, repaired: RepairReport | None = None) -> str:
        """Markdown for the model card ('' when nothing was aligned or repaired)."""
        if self.method == "none" and repaired is None:
            return ""
        lines = ["## Alignment", ""]
        lines.append(
            "The inputs were merged in their own bases (no permutation alignment)."
            if self.method == "none"
            else _aligned_sentence(self.method)
        )
        lines += [_untied_sentence(head) for head in self.untied]
        if repaired is not None:
            lines += repaired.card_lines()
        if self.barriers:
            lines += ["", *_barrier_table(self.barriers)]
        return "\n".join(lines)


_ORTHOGONAL_HOW = {
    "weight+orthogonal": "Procrustes on the weights, alternated with weight matching of the FF "
    "and attention units",
    "activation+orthogonal": "Procrustes on residual activations of the probe text, with "
    "activation matching of the FF and attention units",
    "learned": "Procrustes on the weights alternated with weight matching of the FF and "
    "attention units, then the orthogonal map refined by gradient descent on the loss of the "
    "interpolated models (λ drawn from 0.4 to 0.6) on the probe text",
}


def _aligned_sentence(method: str) -> str:
    if method in ORTHOGONAL_METHODS:
        return (
            "Every norm gain (and LayerNorm bias) was folded into the layers that read it (an "
            "exact rewrite: the merged model's norm gains are 1), and every input's residual "
            "stream was mapped into "
            f"the base's by one orthogonal matrix (**{method}**: {_ORTHOGONAL_HOW[method]}; "
            "Theus et al. 2025, *Generalized linear mode connectivity for transformers*), and its "
            "attention heads mapped within (an orthogonal map of query/key dims, per RoPE pair "
            "where RoPE turns them; an orthogonal map of value dims) before merging."
        )
    if method == "canonical":
        return (
            "Every input was put into canonical unit order (every permutation group sorted by "
            "keys read from its own weights) and then into the base's basis before merging."
        )
    return (
        f"Every input was permutation-aligned into the base's basis by **{method} matching** "
        "(Git Re-Basin, https://arxiv.org/abs/2209.04836) before merging."
    )


def _untied_sentence(head: str) -> str:
    return (
        f"\nThe base's LM head `{head}` was tied to its input embedding. Folding the final "
        "norm's gain gives the head values of its own (the gain scales what the head reads, not "
        f"the embedding), so the output is written untied: `{head}` saved as the merge of the "
        "folded heads, and `tie_word_embeddings: false` in config.json."
    )


def _barrier_table(rows: list[BarrierRow]) -> list[str]:
    """Markdown table of each input's barriers (and REPAIR columns when measured)."""
    repaired = all(r.repaired is not None for r in rows)
    head = [
        "input",
        "barrier, unaligned",
        "barrier, aligned",
        "midpoint loss, unaligned",
        "midpoint loss, aligned",
    ]
    head += ["barrier, aligned + REPAIR", "midpoint loss, aligned + REPAIR"] if repaired else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            f"`{r.model}`",
            *(f"{v:.4f}" for v in (r.vanilla, r.aligned, r.midpoint_vanilla, r.midpoint_aligned)),
        ]
        if repaired:
            cells += [f"{r.repaired:.4f}", f"{r.midpoint_repaired:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def align_inputs(
    recipe: Recipe, plan: MergePlan, *, progress: bool, max_memory_bytes: int | None = None
) -> Alignment:
    """Solve each input's map into the base's basis (`align.method`); weight matching
    within `max_memory_bytes` (`--max-memory`) when given."""
    method = recipe.align.method
    if method == "none":
        return Alignment(method, [None] * len(plan.inputs))
    from hfmerge.align import align_basis
    from hfmerge.lm.batches import text_batches

    folds = method in ORTHOGONAL_METHODS
    if folds:
        for model in plan.inputs:  # before any matching
            feature = f"`align.method: {method}`"
            require_foldable(model.spec, label=model.label, feature=feature)

    batches = None
    if method in ACTIVATION_METHODS:
        probe = recipe.probe
        batches = text_batches(
            plan.base.source.path,
            label=plan.base.label,
            data=probe.data,
            max_length=probe.max_length,
            samples=probe.samples,
        )
    bases: list[BasisMap | None] = []
    for model in plan.inputs:
        if model is plan.base:
            bases.append(FOLDED if folds else None)  # the base is its own basis
            continue
        bases.append(
            align_basis(
                method,
                plan.base.source,
                model.source,
                seed=recipe.align.seed,
                batches=batches,
                progress=progress,
                max_memory_bytes=max_memory_bytes,
            )
        )
    barriers = (
        _barriers(recipe, plan, bases, progress=progress) if recipe.align.report_barrier else []
    )
    return Alignment(method, bases, barriers, untied_heads(recipe, plan.base))


def untied_heads(recipe: Recipe, base: InspectedModel) -> list[str]:
    """The base's LM heads that the output writes untied: tied to the input embedding in the
    base (absent from its checkpoint, or saved beside it under a config that ties them) when
    `align.method` folds the norms. A head reads the final norm and the embedding does not, so
    after the fold they differ; the output's config must say so.
    """
    if recipe.align.method not in ORTHOGONAL_METHODS:
        return []
    spec = base.spec
    names = list(base.index.names)
    absent = [name for name in mapped_names(spec, names, FOLDED) if name not in names]
    if config_field(base.config, "tie_word_embeddings") is not True:
        return absent
    saved = [name for name in reader_norms(spec) if name in names and layer_of(name) is None]
    return absent + saved


def untie_folded_heads(recipe: Recipe, plan: MergePlan, *, max_shard_bytes: int) -> MergePlan:
    """The plan writing each untied head the base's checkpoint lacks (`untied_heads`) as a tensor
    of its own, the merge of the inputs' folded heads (`engine.plan.untie_heads`)."""
    absent = [head for head in untied_heads(recipe, plan.base) if head in plan.base.spec.tied]
    return untie_heads(plan, absent, max_shard_bytes=max_shard_bytes)


def _barriers(
    recipe: Recipe, plan: MergePlan, bases: list[BasisMap | None], *, progress: bool
) -> list[BarrierRow]:
    """Barrier of each input with the base, unaligned and with the permutations being merged."""
    from hfmerge.analysis.barrier import compare_barriers

    rows = []
    for model, solved in zip(plan.inputs, bases, strict=True):
        if model is plan.base or solved is None:
            continue
        method = recipe.align.method
        curves = ("none", method) + ((f"{method}+repair",) if recipe.align.repair else ())
        none, aligned, *repaired = compare_barriers(
            plan.base.source,
            model.source,
            aligns=curves,
            data=recipe.probe.data,
            max_length=recipe.probe.max_length,
            samples=recipe.probe.samples,
            progress=progress,
            solved={method: solved},
        )
        fixed = repaired[0] if repaired else None
        rows.append(
            BarrierRow(
                model.label,
                none.barrier,
                aligned.barrier,
                none.loss_mid,
                aligned.loss_mid,
                fixed.barrier if fixed else None,
                fixed.loss_mid if fixed else None,
            )
        )
    return rows
