"""Loading models and tokenizers with `transformers`: the one place hfmerge does it.

Every model hfmerge runs (to evaluate, probe, fit REPAIR or route) is loaded here, from the
safetensors in a local directory, with its config's own class and no remote code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from hfmerge.arch.config import read_config
from hfmerge.arch.heads import auto_class_name
from hfmerge.errors import IncompatibleModelsError, ModelSourceError
from hfmerge.lm.placement import DeviceMap, MaxMemory
from hfmerge.tensors import has_tokenizer, read_checkpoint_index

Objective = Literal["causal", "masked"]


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' load bars and reports while loading; problems are checked by hand."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    hf_logging.set_verbosity(logging.ERROR)
    # accelerate warns that offloaded layers sit on the meta device: the report says where they went
    offload = logging.getLogger("accelerate.big_modeling")
    offload_level = offload.level
    offload.setLevel(logging.ERROR)
    try:
        yield
    finally:
        offload.setLevel(offload_level)
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def load_pretrained(
    auto: Any,
    path: Path,
    *,
    label: str,
    dtype: torch.dtype = torch.float32,
    device_map: DeviceMap | None = None,
    max_memory: MaxMemory | None = None,
    complete: Completeness | None = None,
    adapter: Path | None = None,
    offload_folder: Path | None = None,
) -> PreTrainedModel:
    """`auto.from_pretrained(path)` as hfmerge allows it: the model, in eval mode.

    Every model hfmerge runs is loaded through here: from safetensors only (a folder with only
    pickle weights is refused before transformers sees it, since unpickling runs code), with
    `trust_remote_code=False` (a config that needs the folder's own Python is refused, with no
    prompt), and with transformers' bars and warnings hidden. `device_map` and `max_memory` place
    it with accelerate.

    Args:
        auto: the transformers class to load with (`AutoModelForCausalLM`, `AutoModel`, ...).
        path: the model's local folder.
        label: the model's name in errors.
        dtype: the weights' dtype once loaded.
        device_map: an accelerate device map, or None to load on the CPU.
        max_memory: per-device limits for `device_map`.
        complete: when given, weights the checkpoint lacks (which transformers would fill with
            random values) are an error saying what needs them and the fix.
        adapter: a local PEFT LoRA adapter folder for the base in `path`, applied in place once
            loaded (`lm.adapter.apply_adapter`: `W + scale·B·A`, as a merge reads BASE+ADAPTER).
        offload_folder: where accelerate may put layers that `max_memory` leaves no room for.

    Raises:
        ModelSourceError: no safetensors weights, the model needs its own code, or weights that
            `complete` requires are missing.
        AdapterError: `adapter` does not fit the base.
    """
    read_checkpoint_index(path, label=label)  # refuses pickle-only folders, names the model
    placement: dict[str, Any] = {}
    if device_map is not None:
        placement["device_map"] = device_map
        if max_memory:  # a copy: accelerate rewrites the sizes in the dict it is given
            placement["max_memory"] = dict(max_memory)
        if offload_folder is not None:
            placement["offload_folder"] = str(offload_folder)
    with quiet_transformers(), _no_remote_code(path, label=label):
        loaded: Any = auto.from_pretrained(
            path,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=False,
            output_loading_info=True,
            **placement,
        )
    model, info = loaded  # (model, {"missing_keys": [...], ...})
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"{path} loaded as a {type(model).__name__}, not a transformers model")
    if complete is not None:
        complete.check(info.get("missing_keys", []), label=label)
    if adapter is not None:
        from hfmerge.lm.adapter import apply_adapter

        apply_adapter(model, path, adapter, label=label)
    model.train(False)  # in place; no dropout
    return model


@dataclass(frozen=True)
class Completeness:
    """Which weights a use of a model needs: missing ones would be random, so they are an error."""

    needs: str  # what needs them, for the message: "its LM head", "its layers"
    fix: str
    optional_prefixes: tuple[str, ...] = ()  # weights this use does without (a BERT pooler)

    def check(self, missing_keys: Sequence[str], *, label: str) -> None:
        """Raise when a weight outside `optional_prefixes` is missing."""
        missing = sorted(k for k in missing_keys if not k.startswith(self.optional_prefixes))
        if missing:
            raise ModelSourceError(
                label,
                f"lacks weights {self.needs} needs ({', '.join(missing[:5])}); they would be "
                "random",
                self.fix,
            )


@contextmanager
def _no_remote_code(path: Path, *, label: str) -> Iterator[None]:
    """Turn transformers' refusal of a folder's own code into an error naming the model."""
    try:
        yield
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise ModelSourceError(
            label,
            "needs Python code from its own folder (`auto_map` in its config), which hfmerge "
            "never runs",
            "use a checkpoint of an architecture that transformers ships (`hfmerge archs`)",
        ) from None


def load_config(path: Path, *, label: str) -> PretrainedConfig:
    """The model's transformers config (no weights read), as `load_pretrained` would build it;
    of an encoder-decoder, the same config its encoder keeps.

    Raises:
        ModelSourceError: no readable config.json, or one that needs the folder's own code.
    """
    from transformers import AutoConfig

    read_config(path, label=label)  # a missing or broken config.json, named
    with quiet_transformers(), _no_remote_code(path, label=label):
        config: PretrainedConfig = AutoConfig.from_pretrained(path, trust_remote_code=False)
    return config


def empty_model(auto: Any, path: Path, *, label: str) -> PreTrainedModel:
    """The model `auto` builds from the config in `path`, on the meta device: its modules and
    parameter names, no weights (what to hook, before a model too big to hold twice loads)."""
    from accelerate import init_empty_weights

    config = load_config(path, label=label)
    with quiet_transformers(), init_empty_weights():
        model = auto.from_config(config) if hasattr(auto, "from_config") else auto(config)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"{path} built a {type(model).__name__}, not a transformers model")
    return model


def load_tokenizer(path: Path, *, label: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a model directory; a clear error when there is none."""
    from transformers import AutoTokenizer

    if not has_tokenizer(path):
        raise ModelSourceError(
            label,
            "has no tokenizer (no tokenizer.json, tokenizer_config.json or vocabulary file)",
            "save the tokenizer the model was trained with into its directory, e.g. "
            f"`AutoTokenizer.from_pretrained(BASE).save_pretrained('{path}')`",
        )
    with quiet_transformers(), _no_remote_code(path, label=label):
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            path, trust_remote_code=False
        )
    return tokenizer


def lm_objective(architectures: Sequence[str], *, label: str) -> Objective:
    """`masked` or `causal` from config.json's `architectures`; an error for headless models."""
    if any(name.endswith("ForMaskedLM") for name in architectures):
        return "masked"
    if not architectures or any("CausalLM" in n or "LMHead" in n for n in architectures):
        return "causal"
    raise ModelSourceError(
        label,
        f"is a {', '.join(architectures)}, which has no language-model head to score text",
        "evaluate a checkpoint with its LM head (…ForCausalLM or …ForMaskedLM)",
    )


def auto_class(config: Mapping[str, Any]) -> Any:
    """The transformers Auto class for config.json's `architectures` (`arch.heads`): the causal
    LM, masked LM, seq2seq LM, classifier, ... class, or `AutoModel` for a headless model."""
    import transformers

    return getattr(transformers, auto_class_name(config))


def load_model(path: Path, *, label: str, adapter: Path | None = None) -> PreTrainedModel:
    """The model in `path` with the head its config names (`auto_class`), float32, eval mode,
    with its LoRA `adapter` folder applied; weights the checkpoint lacks are an error (they would
    be random)."""
    auto = auto_class(read_config(path, label=label))
    whole = Completeness("its head and layers", "load a complete checkpoint (all safetensors)")
    return load_pretrained(auto, path, label=label, complete=whole, adapter=adapter)


def lm_class(path: Path, *, label: str) -> Any:
    """The transformers auto class of the model in `path` with its LM head: masked or causal."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    config = load_config(path, label=label)
    objective = lm_objective(list(config.architectures or []), label=label)
    return AutoModelForMaskedLM if objective == "masked" else AutoModelForCausalLM


def load_lm(
    path: Path,
    *,
    label: str,
    adapter: Path | None = None,
    device_map: DeviceMap | None = None,
    max_memory: MaxMemory | None = None,
    offload_folder: Path | None = None,
) -> PreTrainedModel:
    """The model in `path` with its LM head, float32, eval mode, with its LoRA `adapter` folder
    applied; missing weights are an error. `device_map`, `max_memory` and `offload_folder` place
    it with accelerate (default: whole, on the CPU)."""
    head = Completeness("its LM head", "evaluate a checkpoint saved with its LM head")
    return load_pretrained(
        lm_class(path, label=label),
        path,
        label=label,
        complete=head,
        adapter=adapter,
        device_map=device_map,
        max_memory=max_memory,
        offload_folder=offload_folder,
    )


def position_limit(config: Any) -> int | None:
    """The longest window a model config allows (absolute position embeddings), if any.

    `config` is a transformers config or a config.json mapping.
    """
    get = config.get if isinstance(config, Mapping) else partial(getattr, config)
    limits = [get(key, None) for key in ("max_position_embeddings", "n_positions")]
    known = [limit for limit in limits if isinstance(limit, int) and limit > 0]
    return min(known) if known else None


def usable_length(model: PreTrainedModel, max_length: int) -> int:
    """`max_length`, capped at the model's position limit (absolute position embeddings)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    limit = position_limit(model.config)
    return max_length if limit is None else min(max_length, limit)


_ENCODER_TYPES = frozenset(
    {
        "bert",
        "roberta",
        "xlm-roberta",
        "distilbert",
        "electra",
        "albert",
        "deberta",
        "deberta-v2",
        "mpnet",
        "camembert",
        "modernbert",
    }
)


def is_causal(config: Any) -> bool:
    """False for bidirectional encoders (BERT family, masked LMs, the encoder of an
    encoder-decoder, which is all `load_probe_model` keeps of one), True for everything else."""
    get = config.get if isinstance(config, Mapping) else partial(getattr, config)
    architectures = list(get("architectures", None) or [])
    if any(name.endswith("ForMaskedLM") for name in architectures):
        return False
    if get("is_encoder_decoder", False):
        return False
    return get("model_type", "") not in _ENCODER_TYPES


def load_probe_model(
    path: Path,
    *,
    label: str,
    device_map: DeviceMap | None = "auto",
    max_memory: MaxMemory | None = None,
    dtype: torch.dtype = torch.float32,
    adapter: Path | None = None,
    offload_folder: Path | None = None,
) -> PreTrainedModel:
    """The model's base (no LM head), placed by accelerate, in eval mode, with its LoRA
    `adapter` folder applied; of an encoder-decoder (T5, BART), its encoder.

    The encoder of an encoder-decoder is a bidirectional stack over the input tokens, probed like
    an encoder-only model (embeddings, then each block). The decoder is left out: its states are a
    function of the target tokens fed to it as well as of the encoder's output, so a window of
    text alone gives it no input to compare two models on.

    Raises:
        ModelSourceError: weights of the base model are missing (they would be random).
    """
    from transformers import AutoModel

    config = read_config(path, label=label)
    layers = Completeness(
        "its layers",
        "compare complete checkpoints (config.json and all safetensors)",
        optional_prefixes=("pooler.",),  # not a hidden state: MLM checkpoints lack it harmlessly
    )
    model = load_pretrained(
        AutoModel,
        path,
        label=label,
        dtype=dtype,
        device_map=device_map,
        max_memory=max_memory,
        complete=layers,
        adapter=adapter,
        offload_folder=offload_folder,
    )
    if config.get("is_encoder_decoder"):
        model = model.get_encoder()  # a PreTrainedModel itself, with its own config copy
    model.config.tie_last_hidden_states = False  # see the note at the top
    return model


def shared_tokenizer(
    path_a: Path, path_b: Path, *, label_a: str, label_b: str
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
        raise IncompatibleModelsError(
            label_a,
            label_b,
            [
                f"their tokenizers differ ({len(tokenizer)} vs {len(other)} tokens, or the same "
                "tokens with other ids), so token positions cannot be paired"
            ],
        )
    for path, label in ((path_a, label_a), (path_b, label_b)):
        vocab_size = read_config(path, label=label).get("vocab_size")
        if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
            raise ModelSourceError(
                label,
                f"has {vocab_size} embeddings, fewer than the {len(tokenizer)} tokens of "
                f"{label_a}'s tokenizer",
                "compare models trained with the same tokenizer",
            )
    return tokenizer


def input_device(model: PreTrainedModel) -> torch.device:
    """Where the inputs go: the embedding's device (offloaded weights sit on `meta`: use cpu)."""
    weight = model.get_input_embeddings().weight
    device = weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")
    return torch.device("cpu") if device.type == "meta" else device
