"""Shared by the alignment tests: comparing permutations, and padded random probe batches."""

from __future__ import annotations

import torch

from hfmerge.align import permutation_tensors
from hfmerge.arch.spec import Permutations
from tests.support.tiny_models import VOCAB

Batch = dict[str, torch.Tensor]


def assert_same_perms(found: Permutations, expected: Permutations) -> None:
    """Group by group and field by field, as the permutations file would store them."""
    got, want = permutation_tensors(found), permutation_tensors(expected)
    assert got.keys() == want.keys()
    wrong = [name for name in want if not torch.equal(got[name], want[name])]
    assert not wrong, f"differs: {wrong}"


def padded_batches(kind: str, *, seed: int = 0, count: int = 3) -> list[Batch]:
    """Random token ids, right padding of varying length in every batch (masked)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (4, 16), generator=generator)
        mask = torch.ones_like(ids)
        for row, pad in enumerate((0, 3, 7, 1)):
            mask[row, 16 - pad :] = 0
        batch = {"input_ids": ids, "attention_mask": mask}
        if kind.startswith("bert"):
            batch["token_type_ids"] = torch.randint(0, 2, ids.shape, generator=generator)
        batches.append(batch)
    return batches
