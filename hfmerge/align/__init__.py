"""Permutation alignment (Git Re-Basin): weight matching, activation matching, aligned checkpoints.

`align_permutations` is the one-call entry point; `align_checkpoint` also writes B into A's basis.
"""

from hfmerge.align.activation_matching import activation_matching
from hfmerge.align.apply import (
    PERMUTATIONS_FILE,
    align_checkpoint,
    align_permutations,
    canonicalize_checkpoint,
    load_permutations,
    permutation_tensors,
    save_permutations,
)
from hfmerge.align.attention import attention_objective, head_slices, solve_attention
from hfmerge.align.canonical import canonical_permutations
from hfmerge.align.cross_stats import CrossStats
from hfmerge.align.lap import solve_lap
from hfmerge.align.weight_matching import MatchResult, weight_matching

__all__ = [
    "PERMUTATIONS_FILE",
    "CrossStats",
    "MatchResult",
    "activation_matching",
    "align_checkpoint",
    "align_permutations",
    "attention_objective",
    "canonical_permutations",
    "canonicalize_checkpoint",
    "head_slices",
    "load_permutations",
    "permutation_tensors",
    "save_permutations",
    "solve_attention",
    "solve_lap",
    "weight_matching",
]
