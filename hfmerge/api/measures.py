"""`units`: model references in, the unit correspondence report out.

Measures of how two models' units relate, beyond `cka` (`api/models.py`). Like every api module,
the references are resolved here and the text is read before any model is resolved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hfmerge.analysis.unit_report import UnitsReport
    from hfmerge.lm.load import DeviceMap, MaxMemory


def units(
    model_a: str,
    model_b: str,
    *,
    data: str | None = None,
    samples: int = 256,
    max_length: int = 128,
    batch_size: int = 8,
    l1_penalty: float | None = None,
    device_map: DeviceMap = "auto",
    max_memory: str | MaxMemory | None = None,
    progress: bool = True,
) -> UnitsReport:
    """How the units of `model_a` and `model_b` correspond, layer by layer (Li et al. 2016):
    one-to-one (matched correlation), one-to-many (sparse prediction) and many-to-many (groups).

    Args:
        model_a: first model.
        model_b: second model (it must share `model_a`'s tokenizer).
        data: probe text (`evaluate`'s forms; None: `builtin`).
        samples: probe windows; every fourth is held out to score the regressions.
        max_length: tokens per window.
        batch_size: windows per forward pass.
        l1_penalty: the lasso's penalty in correlation units (None: 0.05).
        device_map: `auto`, `cpu`, `cuda:0`, ..., a JSON device map, or a mapping.
        max_memory: per-device limits, `0=20GiB,cpu=60GiB` or a mapping.
        progress: draw progress bars on stderr.

    Returns:
        The report: per layer pair `one_to_one`, `one_to_many` and `many_to_many`, with the
        windows and tokens used; `to_json()` is the `hfmerge units --json` document.

    Raises:
        ModelSourceError: a bad device map or memory limit, or a model that cannot be probed.
        InputDataError: unreadable text (checked before any model loads), or too little of it.
        IncompatibleModelsError: the models do not share a tokenizer, or one is causal and the
            other is not.
        OptionError: a negative L1 penalty.
        HfMergeError: models too wide for their moments to fit in memory.
    """
    from hfmerge.analysis.correspondence import L1_PENALTY
    from hfmerge.analysis.unit_report import compute_units
    from hfmerge.errors import OptionError
    from hfmerge.lm.load import parse_device_map, parse_max_memory
    from hfmerge.lm.textdata import load_texts
    from hfmerge.sources.refs import resolve_model

    penalty = L1_PENALTY if l1_penalty is None else l1_penalty
    if penalty < 0:
        raise OptionError(
            "--l1",
            str(penalty),
            "is negative",
            why="the lasso's penalty weighs the coefficients' absolute sum",
            fix=f"give a penalty of 0 or more ({L1_PENALTY:g} by default)",
        )
    placement = parse_device_map(device_map) if isinstance(device_map, str) else device_map
    limits = parse_max_memory(max_memory) if isinstance(max_memory, str) else max_memory
    load_texts(data)  # a bad data file fails before a download or a zoo build
    a, b = (resolve_model(ref, progress=progress) for ref in (model_a, model_b))
    return compute_units(
        a,
        b,
        data=data,
        samples=samples,
        max_length=max_length,
        batch_size=batch_size,
        device_map=placement,
        max_memory=limits or None,
        l1_penalty=penalty,
        progress=progress,
    )


__all__ = ["units"]
