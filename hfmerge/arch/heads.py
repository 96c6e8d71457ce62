"""Which `transformers` Auto class loads a checkpoint, from config.json's `architectures` alone.

Read without importing transformers, so the model card of a plain merge can name the class too;
`lm/load.py` turns the name into the class when a model is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

BARE_AUTO_CLASS = "AutoModel"  # a headless model (BertModel, T5EncoderModel, ...), an unknown head
# Head class suffix in config.architectures -> the Auto class that loads it, first match wins.
_AUTO_CLASSES = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ("ForMultipleChoice", "AutoModelForMultipleChoice"),
    ("ForImageClassification", "AutoModelForImageClassification"),
    ("ForPreTraining", "AutoModelForPreTraining"),
)
# `…ForConditionalGeneration` is a seq2seq LM (T5, BART) when the config is encoder-decoder, and
# an image-text-to-text model (Gemma 3, LLaVA) otherwise.
_GENERATION = "ForConditionalGeneration"


def auto_class_name(config: Mapping[str, Any]) -> str:
    """The name of the `transformers` Auto class that loads a model with this config."""
    architectures = config.get("architectures") or [""]
    head = str(architectures[0])
    for suffix, auto in _AUTO_CLASSES:
        if head.endswith(suffix):
            return auto
    if head.endswith(_GENERATION):
        if config.get("is_encoder_decoder"):
            return "AutoModelForSeq2SeqLM"
        return "AutoModelForImageTextToText"
    return BARE_AUTO_CLASS
