"""A loaded model with a LoRA adapter applied in place: `W + scale·B·A` written into its weights.

`load_pretrained` calls `apply_adapter` when it is given an adapter folder. The adapter is checked
against the base folder from headers (`sources.inspection`, as a merge checks it), and every
tensor it changes is read through the merge's own reader (`sources.readers`: float32, then cast to
the model's dtype), so a whole-model step sees the very weights a merge of BASE+ADAPTER would
write. Only `adapter_model.safetensors` is read: no peft, no pickle.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from transformers import PreTrainedModel

from hfmerge.errors import ModelSourceError
from hfmerge.lm.checkpoint_views import file_views
from hfmerge.sources.inspection import inspect_downloaded
from hfmerge.sources.readers import open_reader
from hfmerge.sources.refs import ModelSource


def apply_adapter(model: PreTrainedModel, path: Path, adapter: Path, *, label: str) -> list[str]:
    """Write the adapter in folder `adapter` into `model`, loaded from the base folder `path`.

    Returns the checkpoint names written. A changed tensor the loaded class has no place for (the
    LM head of a headless model) is left out, as transformers leaves it out of the load.

    Raises:
        AdapterError: the adapter does not fit the base (checked from headers).
        ModelSourceError: a changed weight was offloaded to disk by the device map.
    """
    source = ModelSource(ref=label, path=path, adapter=ModelSource(ref=str(adapter), path=adapter))
    inspected = inspect_downloaded(source)
    assert inspected.adapter is not None  # the source has one
    layout = inspected.adapter.layout
    targets = _targets(model, sorted({*layout.deltas, *layout.replaced}), label=label)
    with ExitStack() as stack, torch.no_grad():
        reader = open_reader(stack, inspected)
        for name, target in targets.items():
            if target.device.type == "meta":
                raise ModelSourceError(
                    label,
                    f"has {name} offloaded to disk, where its LoRA adapter cannot be applied",
                    "give the model more memory (max_memory) or load it on fewer devices",
                )
            target.copy_(reader.get(name))  # float32 W + scale·B·A, cast to the model's dtype
    return list(targets)


def _targets(model: PreTrainedModel, names: list[str], *, label: str) -> dict[str, torch.Tensor]:
    """Checkpoint name -> the loaded tensor it sets, for the names the loaded class holds.

    A headless model (`AutoModel` of a `…ForCausalLM` checkpoint) holds its tensors without the
    checkpoint's base-model prefix (`model.layers.0…` is `layers.0…`).
    """
    tensors = file_views(model, label=label)  # views, fused expert parameters included
    headless = model.base_model is model
    prefix = f"{model.base_model_prefix}."
    found: dict[str, torch.Tensor] = {}
    for name in names:
        key = name.removeprefix(prefix) if headless and name not in tensors else name
        if key in tensors:
            found[name] = tensors[key]
    return found


__all__ = ["apply_adapter"]
