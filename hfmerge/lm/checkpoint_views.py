"""Which part of a loaded model each checkpoint tensor loads into: checkpoint name -> a view.

transformers may rename tensors between file and module (GPT-NeoX `embed_out` is `lm_head`), and
since version 5 it fuses some of them on load: a mixture-of-experts block's per-expert tensors
(`experts.{e}.w1.weight` [inner, hidden], `experts.{e}.w3.weight`, `experts.{e}.w2.weight`
[hidden, inner]) become one 3-D parameter per projection (`experts.gate_up_proj` [experts,
2 * inner, hidden], gate rows then up rows; `experts.down_proj` [experts, hidden, inner]). Its own
save-time conversion maps module tensors back to file names; for a fused parameter it returns
copies, so the conversion is traced on the parameter's element positions instead, and each file
tensor becomes a strided view of the parameter (expert e's gate rows are `gate_up_proj[e, :inner]`).
Writing a file tensor into its view writes the model's own storage, whatever the layout.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import PreTrainedModel

from hfmerge.errors import ArchitectureError
from hfmerge.tensors import CheckpointIndex

_RESAVE = "re-save the model with transformers' save_pretrained"


def _file_tensors(
    model: PreTrainedModel, name: str, tensor: torch.Tensor
) -> dict[str, torch.Tensor]:
    """File name -> tensor of one module tensor, by transformers' own save-time conversion."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x stores module names unchanged
        return {name: tensor}
    reverted: dict[str, torch.Tensor] = revert_weight_conversion(model, {name: tensor})
    return reverted


def _strided_view(param: torch.Tensor, traced: torch.Tensor) -> torch.Tensor | None:
    """The view of `param` whose elements sit where `traced` [any shape] says (positions in
    `param`'s row-major order), or None when no single strided view holds them."""
    if traced.numel() == 0 or not param.is_contiguous():
        return None
    offset = int(traced.reshape(-1)[0])
    strides = []
    for axis, size in enumerate(traced.shape):
        step = [0] * traced.dim()
        step[axis] = 1 if size > 1 else 0
        strides.append(int(traced[tuple(step)]) - offset if size > 1 else 1)
    if any(stride < 0 for stride in strides):
        return None
    positions = torch.arange(param.numel())
    try:
        expected = positions.as_strided(traced.shape, strides, offset)
    except RuntimeError:  # out of bounds: not a view of this parameter
        return None
    if not torch.equal(expected, traced):
        return None
    return param.as_strided(traced.shape, strides, param.storage_offset() + offset)


def _traced_views(
    model: PreTrainedModel, name: str, param: torch.Tensor, *, label: str
) -> dict[str, torch.Tensor]:
    """File name -> view of `param`, for a module tensor the conversion copies (fused experts)."""
    positions = torch.arange(param.numel()).view(param.shape)  # each element's own index
    views = {}
    for file_name, traced in _file_tensors(model, name, positions).items():
        view = _strided_view(param, traced)
        if view is None:
            raise ArchitectureError(
                label,
                f"its checkpoint tensor {file_name} is not a slice of the loaded model's {name}",
                fix=_RESAVE,
            )
        views[file_name] = view
    if sum(v.numel() for v in views.values()) != param.numel():
        raise ArchitectureError(
            label, f"its checkpoint tensors do not cover the loaded model's {name}", fix=_RESAVE
        )
    return views


def _module_views(model: PreTrainedModel, *, label: str) -> dict[str, tuple[str, torch.Tensor]]:
    """File name -> (the model tensor it loads into, the view of it), for the whole state dict."""
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for name, tensor in model.state_dict().items():
        reverted = _file_tensors(model, name, tensor)
        storage = tensor.untyped_storage().data_ptr()
        if any(t.untyped_storage().data_ptr() != storage for t in reverted.values()):
            reverted = _traced_views(model, name, tensor, label=label)
        for file_name, view in reverted.items():
            # Tied tensors (embedding and head) revert to their own names, each a whole view.
            out.setdefault(file_name, (name, view))
    return out


def file_views(model: PreTrainedModel, *, label: str) -> dict[str, torch.Tensor]:
    """Checkpoint tensor name -> the view of the model's storage it loads into, for every tensor
    the model would save (writing a view writes the model)."""
    return {file: view for file, (_, view) in _module_views(model, label=label).items()}


def loaded_names(model: PreTrainedModel, *, label: str) -> dict[str, str]:
    """Checkpoint tensor name -> the model's state-dict name that holds it (the fused expert
    parameter for a per-expert tensor), for every tensor the model would save."""
    return {file: name for file, (name, _) in _module_views(model, label=label).items()}


def checkpoint_targets(
    model: PreTrainedModel, index: CheckpointIndex, *, label: str
) -> dict[str, torch.Tensor]:
    """Checkpoint tensor name -> the view of the model's storage that the tensor loads into.

    A tied weight appears once in the file, so writing through the file's names updates every
    tensor that shares it; a fused expert parameter is written slice by slice, one per file tensor.

    Raises:
        ArchitectureError: a checkpoint tensor has no place in the model or a different shape
            there, or a parameter is not written by any checkpoint tensor.
    """
    views = file_views(model, label=label)
    unknown = [n for n in index.names if n not in views]
    reshaped = [
        n for n in index.names if n in views and tuple(views[n].shape) != index.info(n).shape
    ]
    if unknown or reshaped:
        raise ArchitectureError(
            label,
            "its checkpoint tensors do not map one-to-one onto the "
            f"loaded model ({', '.join((unknown + reshaped)[:5])})",
            fix=_RESAVE,
        )
    targets = {n: views[n] for n in index.names}
    _check_coverage(model, targets, label=label)
    return targets


def _check_coverage(
    model: PreTrainedModel, targets: Mapping[str, torch.Tensor], *, label: str
) -> None:
    """Every parameter is written by some checkpoint tensor (else it would stay A's forever)."""
    written = {t.untyped_storage().data_ptr() for t in targets.values()}
    missed = [
        name
        for name, param in model.named_parameters()
        if param.untyped_storage().data_ptr() not in written
    ]
    if missed:
        raise ArchitectureError(
            label,
            f"parameters {', '.join(missed[:5])} are not in its checkpoint",
            fix="re-save the model with its full weights",
        )
