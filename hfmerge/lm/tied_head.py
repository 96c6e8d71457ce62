"""A loaded model's tied LM head, untied and tied back in place.

The orthogonal alignments fold the final norm's gain into the head and not into the embedding, so
a model run with folded weights (the barrier's interpolation skeleton) needs a head of its own;
the curves that do not fold run the model tied, as it was loaded.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def _embeddings(model: PreTrainedModel) -> tuple[torch.nn.Module, torch.nn.Parameter] | None:
    """(the head module, the input embedding's weight), or None for a model without a head."""
    head: object = model.get_output_embeddings()  # type: ignore[no-untyped-call]
    weight = getattr(model.get_input_embeddings(), "weight", None)
    if not isinstance(head, torch.nn.Module) or not isinstance(weight, torch.nn.Parameter):
        return None
    return head, weight


def head_is_tied(model: PreTrainedModel) -> bool:
    """Whether the model's LM head is its input embedding's parameter (storage shared)."""
    found = _embeddings(model)
    return found is not None and getattr(found[0], "weight", None) is found[1]


def untie_head(model: PreTrainedModel) -> None:
    """Give a tied head a parameter of its own (a copy of the embedding, on its device) and mark
    the config untied, so that nothing ties them again; an untied head is left as it is."""
    found = _embeddings(model)
    if found is None or not head_is_tied(model):
        return
    head, weight = found
    head.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    _set_tied_flag(model, tied=False)


def tie_head(model: PreTrainedModel) -> None:
    """Make the head the input embedding's parameter again (as loaded) and mark the config tied."""
    found = _embeddings(model)
    if found is None:
        return
    head, weight = found
    head.weight = weight
    _set_tied_flag(model, tied=True)


def _set_tied_flag(model: PreTrainedModel, *, tied: bool) -> None:
    """`tie_word_embeddings` of the config and of its text config (multimodal models)."""
    configs = {id(model.config): model.config}
    text = model.config.get_text_config()
    configs[id(text)] = text
    for config in configs.values():
        config.tie_word_embeddings = tied


__all__ = ["head_is_tied", "tie_head", "untie_head"]
