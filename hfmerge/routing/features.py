"""Router features: one masked mean of a block's output per input sequence, float32 on the CPU.

A forward hook on the chosen block captures its output and then stops the forward pass: later
blocks and the LM head would only be thrown away. The hook works under an accelerate device map,
because torch runs forward hooks around accelerate's wrapped `forward`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from hfmerge.errors import RoutingError
from hfmerge.lm.batches import model_inputs
from hfmerge.lm.load import input_device, is_causal
from hfmerge.lm.probe import kept_positions, pool


class _Captured(Exception):  # noqa: N818 -- a signal that ends the forward pass, not an error
    """Raised by the hook once the block's output is pooled: the rest of the pass is skipped."""

    def __init__(self, pooled: torch.Tensor) -> None:
        super().__init__("router features captured")
        self.pooled = pooled


def default_layer(num_layers: int) -> int:
    """About two thirds of the depth: past the token-level early blocks, before the output-specific
    late ones (the experts' inputs still agree there; see the CKA notes)."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    return max(1, round(2 * num_layers / 3))


def num_blocks(model: PreTrainedModel) -> int:
    """The number of transformer blocks (`num_hidden_layers`, or GPT-2's `n_layer`)."""
    config = model.config
    for key in ("num_hidden_layers", "n_layer"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise RoutingError(
        f"{config.name_or_path} does not say how many blocks it has",
        fix="use a transformers model whose config has num_hidden_layers",
    )


def blocks(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The model's list of transformer blocks: the first ModuleList as long as the block count.

    One rule covers Llama (`model.layers`), GPT-2 (`transformer.h`), GPT-NeoX, BERT
    (`encoder.layer`) and the heads around them, without a table of module paths per family.
    """
    count = num_blocks(model)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise RoutingError(
        f"{model.config.name_or_path}: no list of {count} blocks was found",
        fix="use a transformer model (Llama, GPT-2, GPT-NeoX, BERT families)",
    )


def check_layer(model: PreTrainedModel, layer: int) -> None:
    """`layer` counts block outputs from 1 (hidden_states index): 1..num_blocks."""
    count = num_blocks(model)
    if not 1 <= layer <= count:
        raise RoutingError(
            f"router layer {layer} is outside the backbone's blocks 1..{count}",
            fix=f"choose a layer from 1 to {count}, or leave it unset for {default_layer(count)}",
        )


def pooled_features(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, layer: int
) -> torch.Tensor:
    """[b, t] ids -> [b, d] float32 CPU: masked mean of block `layer`'s output over kept tokens.

    Padding is masked and a causal LM's position 0 (BOS, the same for every input) is dropped;
    a row left with no kept token (a lone BOS) falls back to all its real tokens.
    """
    check_layer(model, layer)
    if not bool(attention_mask.bool().any(1).all()):
        raise ValueError("a row has no real token (its attention mask is all zeros)")
    keep = kept_positions(attention_mask, causal=is_causal(model.config))  # [b, t]
    empty = ~keep.any(1)  # [b]
    keep[empty] = attention_mask[empty].bool()

    def capture(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output  # [b, t, d]
        summed = pool(hidden, keep, pooling="mean")  # [b, d]: every row has a kept token
        raise _Captured(summed.to(device="cpu", dtype=torch.float32))

    device = input_device(model)
    handle = blocks(model)[layer - 1].register_forward_hook(capture)
    try:
        with torch.inference_mode():
            model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                use_cache=False,
            )
    except _Captured as captured:
        return captured.pooled
    finally:
        handle.remove()
    raise RoutingError(
        f"block {layer} of {model.config.name_or_path} never ran",
        fix="use a standard transformers model class",
    )


def window_features(
    model: PreTrainedModel,
    windows: Sequence[torch.Tensor],
    *,
    layer: int,
    pad_id: int,
    batch_size: int = 16,
) -> torch.Tensor:
    """[n, d] float32 features of 1-D token windows, batched with right padding."""
    if not windows:
        raise ValueError("no windows to pool")
    parts = []
    for start in range(0, len(windows), batch_size):
        batch = model_inputs(windows[start : start + batch_size], pad_id=pad_id)
        parts.append(
            pooled_features(model, batch["input_ids"], batch["attention_mask"], layer=layer)
        )
    return torch.cat(parts)  # [n, d]


__all__ = [
    "blocks",
    "check_layer",
    "default_layer",
    "num_blocks",
    "pooled_features",
    "window_features",
]
