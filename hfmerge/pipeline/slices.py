"""The `slices:` side of a merge: the recipe's slices as planned slices, and the output's config.

A `slices:` recipe stacks block ranges of its models into a new model (frankenmerges, depth
up-scaling); the engine plans it in `engine/slices.py`. The output's config is the base's with
the new depth, and with each per-block list (e.g. `layer_types`) rebuilt block by block.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hfmerge.engine.plan import MergePlan
from hfmerge.engine.slices import PlannedSlice, SliceSourceRange, build_slice_plan, output_blocks
from hfmerge.methods import MergeMethod
from hfmerge.methods.schedule import schedule_for
from hfmerge.recipe.schema import ModelEntry, Recipe
from hfmerge.sources.inspection import InspectedModel


def plan_slices(
    recipe: Recipe,
    method: MergeMethod,
    *,
    base: tuple[ModelEntry, InspectedModel],
    inputs: Sequence[tuple[ModelEntry, InspectedModel]],
    max_shard_bytes: int,
) -> tuple[MergePlan, list[PlannedSlice]]:
    """The merge plan of `recipe.slices`, and the planned slices (for the output's config).

    `base` is the model whose config and tokenizer the output takes (reader 0); `inputs` are the
    other models the slices read, each with its recipe entry.
    """
    assert recipe.slices is not None
    assert recipe.merge is not None
    reader = {entry.ref: index for index, (entry, _) in enumerate([base, *inputs])}
    planned = []
    for one in recipe.slices:
        sources = tuple(
            SliceSourceRange(reader[s.ref], s.layer_range[0], s.layer_range[1]) for s in one.sources
        )
        base_name = one.base or recipe.base
        base_at = None
        if method.needs_base:
            base_at = next(i for i, s in enumerate(one.sources) if base_name in (s.model, s.ref))
        settings = [s.method_params for i, s in enumerate(one.sources) if i != base_at]
        schedule = schedule_for(method, one.parameters, settings, fallback=recipe.merge.parameters)
        planned.append(PlannedSlice(sources, base_at, schedule))
    plan = build_slice_plan(
        method,
        planned,
        base=base[1],
        inputs=[model for _, model in inputs],
        out_dtype=recipe.output.dtype,
        max_shard_bytes=max_shard_bytes,
    )
    return plan, planned


def write_slices_config(config_path: Path, plan: MergePlan, slices: Sequence[PlannedSlice]) -> None:
    """Set the output config's depth, and rebuild its per-block lists from the blocks' sources."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    blocks = output_blocks(slices)
    depth = config.get("num_hidden_layers")
    for key, value in list(config.items()):
        if isinstance(value, list) and isinstance(depth, int) and len(value) == depth:
            config[key] = [_per_block(plan.readers[m].config, key, i) for m, i in blocks]
    if "num_hidden_layers" in config:
        config["num_hidden_layers"] = len(blocks)
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _per_block(config: dict[str, Any], key: str, index: int) -> Any:
    return config[key][index]
