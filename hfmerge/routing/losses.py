"""Per-sequence mean next-token loss of causal LMs: the perplexity router's inputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel

from hfmerge.lm.load import input_device

# Runs expert e on a batch and returns its per-sequence losses [b]; the router stacks them.
ExpertLossFn = Callable[[int], torch.Tensor]


def logits_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """[b, t, v] logits of [b, t] ids -> [b] float32 mean loss over each row's real targets.

    Position i predicts token i + 1; a target counts when both it and its context position are
    real tokens, which handles left and right padding alike.
    """
    mask = attention_mask.bool().to(logits.device)
    targets = input_ids.to(logits.device)[:, 1:]  # [b, t-1]
    valid = mask[:, 1:] & mask[:, :-1]  # [b, t-1]
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2),  # [b, t-1, v] -> [b, v, t-1] (class dim 1)
        targets,
        reduction="none",
    )  # [b, t-1]
    summed = (per_token * valid).sum(1)  # [b]
    return (summed / valid.sum(1).clamp_min(1)).cpu()


def sequence_losses(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """[b] float32 CPU: the mean next-token loss of each row under causal LM `model`."""
    device = input_device(model)
    with torch.inference_mode():
        logits = model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            use_cache=False,
        ).logits  # [b, t, v]
    return logits_loss(logits, input_ids, attention_mask)


def loss_matrix(loss_of_expert: ExpertLossFn, num_experts: int) -> torch.Tensor:
    """[b, E]: column e holds expert e's per-sequence losses."""
    columns: Sequence[torch.Tensor] = [loss_of_expert(e) for e in range(num_experts)]
    return torch.stack(list(columns), dim=1)  # E x [b] -> [b, E]


__all__ = ["ExpertLossFn", "logits_loss", "loss_matrix", "sequence_losses"]
