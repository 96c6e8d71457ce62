"""Hidden states of two models on the same probe windows, as per-layer samples, padding masked.

Models load under an accelerate device map; they run alternately batch by batch and nothing is kept.
"""

# Which states: `hidden_states` = embeddings output, then every block's output. transformers 5 ties
# the last entry to `last_hidden_state`, which is after the final norm and so not comparable with
# the others (per-token RMS scaling changes CKA); `tie_last_hidden_states=False` keeps the block's
# own output. Position 0 of a causal LM sees only itself (BOS, attention sink, massive activations):
# it is the same for every window and would dominate, so it is dropped.
#
# Pooling. `mean` (default): the masked mean per window is one sample. It compares per-input
# summaries, the view that routing and the merge gate care about; tokens of one window are not
# independent and both models see the same token ids, which lifts early layers under `tokens`. It
# also keeps the cost at the forward passes: the exact estimator's d×d cross sums cost n·d² per
# layer pair, which with every token a sample (~32k for 256 windows) outweighs the forward passes
# on a CPU. `tokens`: every kept token is one sample, so the debiased estimator's spread shrinks
# like 1/sqrt(n); unit matching (`--units`) needs those samples (n well above the width), so it
# defaults to `tokens`. Token pairing needs one tokenizer, which `cka` requires anyway.

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hfmerge.errors import IncompatibleModelsError, ModelSourceError
from hfmerge.lm.scoring import load_tokenizer, model_inputs, pad_id_of, quiet_transformers
from hfmerge.progress import track

Pooling = Literal["tokens", "mean"]
POOLINGS: tuple[Pooling, ...] = ("mean", "tokens")


def default_pooling(*, units: bool) -> Pooling:
    """`mean`, or `tokens` when unit correspondence is asked for (it needs many samples)."""
    return "tokens" if units else "mean"
DeviceMap = str | dict[str, int | str]
MaxMemory = dict[int | str, str]
_NAMED_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "electra", "albert",
                            "deberta", "deberta-v2", "mpnet", "camembert", "modernbert"})
_MAP_FIX = ("use auto, balanced, sequential, cpu, a device such as cuda:0, or a JSON mapping of "
            'module names to devices such as \'{"": "cpu"}\'')


def parse_device_map(text: str) -> DeviceMap:
    """`--device-map`: a named strategy, one device for everything, or a JSON module -> device map.

    Raises:
        ModelSourceError: an unknown strategy or device, or a malformed JSON map.
    """
    text = text.strip()
    if text.startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelSourceError("--device-map", f"is not valid JSON ({exc.msg})", _MAP_FIX
                                   ) from None
        if not isinstance(mapping, dict) or not all(
            isinstance(v, int | str) for v in mapping.values()
        ):
            raise ModelSourceError("--device-map", "must map module names to devices", _MAP_FIX)
        return mapping
    if text in _NAMED_MAPS:
        return text
    try:
        torch.device(text)
    except RuntimeError:
        raise ModelSourceError("--device-map", f"{text!r} is neither a strategy nor a device",
                               _MAP_FIX) from None
    return text


def parse_max_memory(text: str) -> MaxMemory:
    """`0=20GiB,cpu=60GiB` -> {0: "20GiB", "cpu": "60GiB"} (accelerate's `max_memory`).

    Raises:
        ModelSourceError: an entry without `=`.
    """
    limits: MaxMemory = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        device, sep, size = entry.partition("=")
        if not sep or not device.strip() or not size.strip():
            raise ModelSourceError("--max-memory", f"entry {entry!r} is not DEVICE=SIZE",
                                   "write it like `0=20GiB,cpu=60GiB`")
        key = device.strip()
        limits[int(key) if key.isdigit() else key] = size.strip()
    return limits


def is_causal(config: Any) -> bool:
    """False for bidirectional encoders (BERT family, masked LMs), True for everything else."""
    architectures = list(getattr(config, "architectures", None) or [])
    if any(name.endswith("ForMaskedLM") for name in architectures):
        return False
    return getattr(config, "model_type", "") not in _ENCODER_TYPES


def load_probe_model(path: Path, *, label: str, device_map: DeviceMap | None = "auto",
                     max_memory: MaxMemory | None = None,
                     dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The model's base (no LM head), placed by accelerate, in eval mode.

    Raises:
        ModelSourceError: weights of the base model are missing (they would be random).
    """
    from transformers import AutoModel

    placement: dict[str, Any] = {}
    if device_map is not None:
        placement["device_map"] = device_map
        if max_memory:
            placement["max_memory"] = max_memory
    with quiet_transformers():
        loaded: Any = AutoModel.from_pretrained(path, dtype=dtype, output_loading_info=True,
                                                **placement)
    model, info = loaded
    # A BERT pooler is not a hidden state: its absence from MLM checkpoints is harmless.
    missing = sorted(k for k in info.get("missing_keys", []) if not k.startswith("pooler."))
    if missing:
        raise ModelSourceError(label, f"lacks weights its layers need ({', '.join(missing[:5])})",
                               "compare complete checkpoints (config.json and all safetensors)")
    model.config.tie_last_hidden_states = False  # see the note at the top
    model.train(False)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"{path} loaded as a {type(model).__name__}, not a transformers model")
    return model


def shared_tokenizer(path_a: Path, path_b: Path, *, label_a: str, label_b: str
                     ) -> PreTrainedTokenizerBase:
    """Model A's tokenizer, after checking that model B reads the same token ids.

    B's own tokenizer, when it has one, must have A's vocabulary; without one, B's embedding
    table must at least cover A's vocabulary.

    Raises:
        ModelSourceError: A has no tokenizer, or the vocabulary is larger than a model's embedding.
        IncompatibleModelsError: B's tokenizer has another vocabulary.
    """
    tokenizer = load_tokenizer(path_a, label=label_a)
    try:
        other: PreTrainedTokenizerBase | None = load_tokenizer(path_b, label=label_b)
    except ModelSourceError:
        other = None  # no tokenizer files: B is read with A's tokenizer (checked below)
    if other is not None and other.get_vocab() != tokenizer.get_vocab():
        raise IncompatibleModelsError(label_a, label_b, [
            f"their tokenizers differ ({len(tokenizer)} vs {len(other)} tokens, or the same "
            "tokens with other ids), so token positions cannot be paired"])
    for path, label in ((path_a, label_a), (path_b, label_b)):
        vocab_size = _config_value(path, "vocab_size")
        if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
            raise ModelSourceError(
                label, f"has {vocab_size} embeddings, fewer than the {len(tokenizer)} tokens of "
                f"{label_a}'s tokenizer", "compare models trained with the same tokenizer")
    return tokenizer


def _config_value(path: Path, key: str) -> Any:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return config.get(key) if isinstance(config, dict) else None


def probe_batches(windows: Sequence[torch.Tensor], tokenizer: PreTrainedTokenizerBase, *,
                  batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded `input_ids` and `attention_mask` batches of `windows`."""
    pad_id = pad_id_of(tokenizer)
    return [model_inputs(windows[i : i + batch_size], pad_id=pad_id)
            for i in range(0, len(windows), batch_size)]


def kept_positions(attention_mask: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """[b, t] bool: real tokens, minus position 0 for causal LMs."""
    keep = attention_mask.bool().clone()
    if causal:
        keep[:, 0] = False
    return keep


def pool(hidden: torch.Tensor, keep: torch.Tensor, *, pooling: Pooling) -> torch.Tensor:
    """[b, t, d] hidden states -> [samples, d]: kept tokens, or one masked mean per window."""
    keep = keep.to(hidden.device)
    if pooling == "tokens":
        return hidden[keep]  # [b, t, d] indexed by [b, t] mask -> [kept, d]
    counts = keep.sum(1)  # [b]
    sums = (hidden * keep.unsqueeze(-1)).sum(1)  # [b, t, d] * [b, t, 1] -> [b, d]
    rows = counts > 0  # a window with no kept token has no mean
    return sums[rows] / counts[rows].unsqueeze(-1).to(sums.dtype)  # [b', d] / [b', 1]


def _input_device(model: PreTrainedModel) -> torch.device:
    """Where the inputs go: the embedding's device (offloaded weights sit on `meta`: use cpu)."""
    weight = model.get_input_embeddings().weight
    device = weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")
    return torch.device("cpu") if device.type == "meta" else device


def layer_states(model: PreTrainedModel, batch: Mapping[str, torch.Tensor], *, causal: bool,
                 pooling: Pooling) -> list[torch.Tensor]:
    """One [samples, d] tensor per hidden state (embeddings, then each block), float32, CPU."""
    device = _input_device(model)
    inputs = {key: value.to(device) for key, value in batch.items()}
    with torch.inference_mode():
        out = model(**inputs, output_hidden_states=True)
    states = out.hidden_states
    expected = getattr(model.config, "num_hidden_layers", None)
    if states is None or (isinstance(expected, int) and len(states) != expected + 1):
        raise ModelSourceError(
            str(model.config.name_or_path), f"returned {len(states or ())} hidden states for "
            f"{expected} layers", "probe a model whose class returns the embeddings and every "
            "block output with output_hidden_states=True")
    keep = kept_positions(batch["attention_mask"], causal=causal)
    return [pool(h, keep, pooling=pooling).to(device="cpu", dtype=torch.float32) for h in states]


@dataclass(frozen=True)
class PairedStates:
    """One batch's per-layer samples from both models (row i of every tensor is one sample)."""

    a: list[torch.Tensor]
    b: list[torch.Tensor]
    tokens: int  # real tokens kept in this batch (before mean pooling)


def paired_states(model_a: PreTrainedModel, model_b: PreTrainedModel,
                  batches: Sequence[Mapping[str, torch.Tensor]], *, causal: bool,
                  pooling: Pooling = "tokens", progress: bool = False) -> Iterator[PairedStates]:
    """Run A, then B, on each batch and yield their states; the caller streams them away."""
    for batch in track(batches, description="probing both models", enabled=progress):
        kept = int(kept_positions(batch["attention_mask"], causal=causal).sum())
        yield PairedStates(layer_states(model_a, batch, causal=causal, pooling=pooling),
                           layer_states(model_b, batch, causal=causal, pooling=pooling), kept)


__all__ = [
    "POOLINGS",
    "DeviceMap",
    "MaxMemory",
    "PairedStates",
    "Pooling",
    "is_causal",
    "kept_positions",
    "layer_states",
    "load_probe_model",
    "paired_states",
    "parse_device_map",
    "parse_max_memory",
    "pool",
    "probe_batches",
]
