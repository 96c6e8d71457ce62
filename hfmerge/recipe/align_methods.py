"""The alignment methods, named once: a recipe's `align.method`, `hfmerge align --method` and
`hfmerge barrier --align` all take these names.

They live in recipe/, the lowest layer that names them (its schema validates `align.method`);
align/, analysis/ and cli/ sit above it and import them from here.
"""

from __future__ import annotations

from typing import Literal, get_args

AlignMethod = Literal["none", "weight", "activation", "canonical"]
ALIGN_METHODS: tuple[AlignMethod, ...] = get_args(AlignMethod)
