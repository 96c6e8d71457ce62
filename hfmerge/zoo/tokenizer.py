"""The zoo's shared tokenizer: a byte-level BPE trained deterministically on the train split.

Wrapped as a `PreTrainedTokenizerFast` that prepends `<s>` like Llama tokenizers do.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2: the trainer adds specials first, in this order
_TRAIN_CHUNK_CHARS = 4_000


def _chunks(texts: Sequence[str]) -> Iterator[str]:
    # Feeding the trainer fixed chunks keeps its input order, and so its word counts, reproducible.
    for text in texts:
        for start in range(0, len(text), _TRAIN_CHUNK_CHARS):
            yield text[start : start + _TRAIN_CHUNK_CHARS]


def train_bpe(texts: Sequence[str], *, vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (specials included) on `texts`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_chunks(texts), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def wrap(tokenizer: Tokenizer, *, model_max_length: int) -> PreTrainedTokenizerFast:
    """The `transformers` face of `tokenizer`, with bos/eos/pad set, ready for `save_pretrained`."""
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_tokenizer(
    texts: Sequence[str], *, vocab_size: int, model_max_length: int
) -> PreTrainedTokenizerFast:
    """Train the BPE on `texts` and wrap it for `transformers`."""
    return wrap(train_bpe(texts, vocab_size=vocab_size), model_max_length=model_max_length)
