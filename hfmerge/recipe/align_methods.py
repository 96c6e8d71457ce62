"""The alignment methods, named once: a recipe's `align.method`, `hfmerge align --method` and
`hfmerge barrier --align` all take these names.

They live in recipe/, the lowest layer that names them (its schema validates `align.method`);
align/, analysis/ and cli/ sit above it and import them from here.
"""

from __future__ import annotations

from typing import Literal, get_args

AlignMethod = Literal[
    "none",
    "weight",
    "activation",
    "canonical",
    "weight+orthogonal",
    "activation+orthogonal",
    "learned",
]
ALIGN_METHODS: tuple[AlignMethod, ...] = get_args(AlignMethod)
# Methods that fold the norm gains and rotate the residual stream (pre-norm families): the
# base is then read folded too, and the merge's norm gains are all 1.
ORTHOGONAL_METHODS = frozenset({"weight+orthogonal", "activation+orthogonal", "learned"})
# Methods that run probe text (transformers loads the models): through both models, or for
# `learned` through the interpolated one.
ACTIVATION_METHODS = frozenset({"activation", "activation+orthogonal", "learned"})
