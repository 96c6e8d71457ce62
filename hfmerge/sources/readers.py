"""The reader of one model's tensors: its checkpoint, with its LoRA adapter applied on read when
it has one (`hfmerge.lora.AdaptedReader`), so no merged copy of the two is written or held."""

from __future__ import annotations

from contextlib import ExitStack

from hfmerge.lora import AdaptedReader
from hfmerge.sources.inspection import InspectedModel
from hfmerge.tensors import LazyCheckpoint, TensorReader, file_index


def open_reader(stack: ExitStack, model: InspectedModel) -> TensorReader:
    """`model`'s tensors, as the merge reads them; files stay open until `stack` closes."""
    checkpoint = stack.enter_context(LazyCheckpoint(model.source.path))
    if model.adapter is None:
        return checkpoint
    weights = model.adapter.weights
    index = file_index(weights, label=model.adapter.source.label)
    adapter = stack.enter_context(LazyCheckpoint(weights.parent, index=index))
    return AdaptedReader(checkpoint, adapter, model.adapter.layout)
