"""Permutation alignment (Git Re-Basin): weight matching, activation matching, aligned checkpoints;
and orthogonal residual alignment of pre-norm models (`orthogonal.py`), with within-head maps of
attention (`head_maps.py`).

`align_basis` is the one-call entry point (`align_permutations` for the permutation methods);
`align_checkpoint` also writes B into A's basis.
"""

from hfmerge.align.activation_matching import activation_matching
from hfmerge.align.apply import (
    align_basis,
    align_checkpoint,
    align_permutations,
    canonicalize_checkpoint,
)
from hfmerge.align.attention import attention_objective, head_slices, solve_attention
from hfmerge.align.canonical import canonical_permutations
from hfmerge.align.cross_stats import CrossStats
from hfmerge.align.head_maps import head_map_matching
from hfmerge.align.lap import solve_lap
from hfmerge.align.orthogonal import orthogonal_matching
from hfmerge.align.permutation_files import (
    HEAD_MAPS_FILE,
    PERMUTATIONS_FILE,
    ROTATION_FILE,
    load_head_maps,
    load_permutations,
    permutation_tensors,
    save_permutations,
)
from hfmerge.align.weight_matching import MatchResult, weight_matching

__all__ = [
    "HEAD_MAPS_FILE",
    "PERMUTATIONS_FILE",
    "ROTATION_FILE",
    "CrossStats",
    "MatchResult",
    "activation_matching",
    "align_basis",
    "align_checkpoint",
    "align_permutations",
    "attention_objective",
    "canonical_permutations",
    "canonicalize_checkpoint",
    "head_map_matching",
    "head_slices",
    "load_head_maps",
    "load_permutations",
    "orthogonal_matching",
    "permutation_tensors",
    "save_permutations",
    "solve_attention",
    "solve_lap",
    "weight_matching",
]
