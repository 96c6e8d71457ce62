"""The two models a probing command (`cka`, `units`) compares: their tokenizer, their configs and
where they go, then their states on the probe batches, run together or one at a time.

Nothing loads until `ProbePair.states` runs: the windows, the statistics' size and the placement
are all settled from configs and headers first, so a budget too small fails before any download
is read.
"""

from __future__ import annotations

import tempfile
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hfmerge.errors import IncompatibleModelsError
from hfmerge.lm.placement import Footprint, ProbePlacement, plan_placement
from hfmerge.lm.probe_time import ProbeText, announce_probe
from hfmerge.sources.refs import ModelSource
from hfmerge.tensors.malloc import return_freed_blocks, trim_heap

if TYPE_CHECKING:  # lm/probe.py imports transformers, which a merge without `check:` never needs
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from hfmerge.lm.placement import DeviceMap, MaxMemory
    from hfmerge.lm.probe import PairedStates, Pooling


@dataclass(frozen=True)
class ProbePair:
    """Both models' sources, configs and shared tokenizer, and how they will be placed."""

    sources: tuple[ModelSource, ModelSource]
    configs: tuple[Any, Any]  # transformers configs of the probed modules
    tokenizer: PreTrainedTokenizerBase
    causal: bool
    placement: ProbePlacement

    @property
    def revisions(self) -> dict[str, str | None]:
        """The pinned revisions, as reports name them."""
        return {"model_a": self.sources[0].revision, "model_b": self.sources[1].revision}

    def widths(self) -> tuple[int, int]:
        """The hidden size of each model."""
        a, b = (int(c.hidden_size) for c in self.configs)
        return a, b

    def depths(self) -> tuple[int, int]:
        """The hidden states of each model: the embeddings, then every block."""
        a, b = (int(c.num_hidden_layers) + 1 for c in self.configs)
        return a, b

    def within(self, budget: int, *, working: int, kept: int) -> ProbePair:
        """This pair placed within `budget` bytes of host memory (`lm.placement.plan_placement`):
        `working` bytes the caller holds in any case, `kept` more when the models run one at a
        time."""
        footprints = (
            Footprint.of(self.sources[0].path, label=self.sources[0].label),
            Footprint.of(self.sources[1].path, label=self.sources[1].label),
        )
        placement = plan_placement(
            footprints,
            budget=budget,
            device_map=self.placement.device_map,
            working=working,
            kept=kept,
        )
        return replace(self, placement=placement)

    def announce(self, task: str, *, budget: int, text: ProbeText) -> None:
        """Say the plan before the work starts (`ProbePlacement.announce`), with the time of
        both models' passes over `text`."""
        source = self.sources[0]
        announce_probe(
            self.placement,
            task,
            budget=budget,
            path=source.path,
            label=source.label,
            text=text,
            passes=2,
        )

    def states(
        self,
        batches: Sequence[Mapping[str, torch.Tensor]],
        *,
        pooling: Pooling,
        tokens_per_window: int | None,
        progress: bool,
    ) -> Iterator[PairedStates]:
        """Both models' states on each batch: loaded together and run batch by batch, or A on
        every batch (its samples kept) and then B."""
        from hfmerge.lm.probe import PairedStates, model_states, paired_states

        with ExitStack() as stack:
            folder = None
            if self.placement.offload:
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hfmerge-")))
            if not self.placement.one_at_a_time:
                yield from paired_states(
                    self._load(0, folder),
                    self._load(1, folder),
                    batches,
                    causal=self.causal,
                    pooling=pooling,
                    tokens_per_window=tokens_per_window,
                    progress=progress,
                )
                return
            return_freed_blocks()  # offloaded layers come and go: see tensors/malloc.py
            states_of = partial(
                model_states,
                batches=batches,
                causal=self.causal,
                pooling=pooling,
                tokens_per_window=tokens_per_window,
                progress=progress,
            )
            model = self._load(0, folder)
            first = deque(states_of(model, description=self.sources[0].label))
            del model
            trim_heap()  # A's layers go before B's load
            model = self._load(1, folder)
            for states_b, _ in states_of(model, description=self.sources[1].label):
                states_a, kept = first.popleft()  # A's samples go as they are used
                yield PairedStates(states_a, states_b, kept)

    def _load(self, side: int, offload_folder: Path | None) -> PreTrainedModel:
        from hfmerge.lm.load import load_probe_model

        source = self.sources[side]
        return load_probe_model(
            source.path,
            label=source.ref,
            device_map=self.placement.device_map,
            max_memory=self.placement.max_memory,
            adapter=source.adapter_path,
            offload_folder=None if offload_folder is None else offload_folder / str(side),
        )


def open_pair(
    source_a: ModelSource,
    source_b: ModelSource,
    *,
    device_map: DeviceMap | None,
    max_memory: MaxMemory | None,
) -> ProbePair:
    """The pair, from configs and tokenizers alone (no weights read).

    Raises:
        ModelSourceError: a model's config cannot be read, or needs its own code.
        IncompatibleModelsError: no shared tokenizer, or one is causal and the other is not.
    """
    from hfmerge.lm.load import is_causal, load_config, shared_tokenizer

    label_a, label_b = source_a.label, source_b.label
    tokenizer = shared_tokenizer(source_a.path, source_b.path, label_a=label_a, label_b=label_b)
    configs = (
        load_config(source_a.path, label=source_a.ref),
        load_config(source_b.path, label=source_b.ref),
    )
    causal = is_causal(configs[0])
    if is_causal(configs[1]) != causal:
        raise IncompatibleModelsError(
            label_a, label_b, ["one is a causal LM and the other a bidirectional encoder"]
        )
    placement = ProbePlacement(device_map, max_memory)
    return ProbePair((source_a, source_b), configs, tokenizer, causal, placement)


def probe_windows(
    pair: ProbePair, texts: list[str], *, max_length: int, samples: int | None
) -> tuple[list[torch.Tensor], int]:
    """The probe windows of `texts` for both models, and their length (`max_length`, or less
    where a model's position limit is lower)."""
    from hfmerge.lm.load import position_limit
    from hfmerge.lm.textdata import token_windows

    limits = [limit for c in pair.configs if (limit := position_limit(c)) is not None]
    length = min([max_length, *limits])
    return token_windows(pair.tokenizer, texts, max_length=length, samples=samples), length


__all__ = ["ProbePair", "open_pair", "probe_windows"]
