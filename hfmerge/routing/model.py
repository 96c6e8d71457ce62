"""`RoutedModel`: a routed repo served as one model: route each sequence, run only its expert.

Per batch the router backbone runs once (or, for the perplexity router, every expert scores
the input); then each chosen expert runs on its own rows only, and the rows are put back in
order. A row's logits are exactly what its expert gives for that sub-batch.

Experts that are LoRA adapters share their base: the pool holds each base once, and an adapter
expert runs as its base with its factors hooked on for that call (`routing/adapters.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hfmerge.lm.batches import model_inputs, pad_id_of
from hfmerge.lm.load import input_device, load_tokenizer
from hfmerge.lm.placement import DeviceMap, MaxMemory
from hfmerge.routing.adapters import ExpertAdapter, read_expert_adapter
from hfmerge.routing.features import pooled_features
from hfmerge.routing.losses import loss_matrix, sequence_losses
from hfmerge.routing.manifest import RoutedManifest
from hfmerge.routing.placement import ExpertPool, PooledModel
from hfmerge.routing.repo import LocalRoutedRepo, open_routed_repo
from hfmerge.routing.routers import Router
from hfmerge.routing.vocab import check_expert_vocabularies
from hfmerge.tensors import parse_size

BACKBONE = "_router_backbone"  # pool name of a separate backbone (never a valid expert name)
SHARED_BASE = "_base"  # pool names of adapter experts' bases: `_base0`, `_base1`, ...


@dataclass(frozen=True)
class RoutedOutput:
    """What a routed forward pass returns: logits, and which expert produced each row."""

    logits: torch.Tensor  # [B, T, V]
    experts: torch.Tensor  # [B] long, indices into `RoutedModel.experts`


class RoutedModel:
    """Experts behind a per-sequence router, loaded lazily within a memory budget."""

    def __init__(
        self,
        manifest: RoutedManifest,
        router: Router,
        pool: ExpertPool,
        tokenizer: PreTrainedTokenizerBase,
        *,
        backbone: str | None,
        source: str = "",
        revision: str | None = None,
        adapters: Mapping[str, ExpertAdapter] | None = None,
        pool_names: Mapping[str, str] | None = None,
    ) -> None:
        self.manifest = manifest
        self.router = router
        self.pool = pool
        self.tokenizer = tokenizer
        self.backbone = backbone  # expert or pool name of the router backbone; None: perplexity
        self.source = source
        self.revision = revision
        self.adapters = dict(adapters or {})  # adapter experts' factors, by expert name
        self.pool_names = dict(pool_names or {})  # expert -> the pool model it runs on

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path,
        *,
        device_map: DeviceMap | None = "auto",
        max_memory: MaxMemory | None = None,
        memory_budget: int | str | None = None,
        offline: bool = False,
        revision: str | None = None,
        progress: bool = False,
    ) -> RoutedModel:
        """Open a routed repo (folder or Hub id `org/name[@rev]`); experts load on first use.

        `device_map` and `max_memory` are accelerate's, used for each expert. The experts in
        memory at once stay within `memory_budget` bytes (default: the sum of `max_memory`;
        neither: no limit), evicting the least recently used.

        Raises:
            RoutedRepoError: missing or malformed manifest or router tensors.
            IncompatibleModelsError: the experts do not share one vocabulary.
            RoutingError: the budget cannot hold the largest expert.
            HubError: a Hub repo or pinned expert cannot be fetched.
        """
        repo = open_routed_repo(
            path_or_repo_id, revision=revision, offline=offline, progress=progress
        )
        budget = None if memory_budget is None else parse_size(memory_budget)
        return cls.from_local(
            repo, device_map=device_map, max_memory=max_memory, memory_budget=budget
        )

    @classmethod
    def from_local(
        cls,
        repo: LocalRoutedRepo,
        *,
        device_map: DeviceMap | None = "auto",
        max_memory: MaxMemory | None = None,
        memory_budget: int | None = None,
    ) -> RoutedModel:
        """A routed model over an opened repo whose models are all on disk."""
        manifest = repo.manifest
        check_expert_vocabularies(repo.expert_paths)
        pooled, pool_names, bases = _pooled_experts(repo)
        adapters = {
            name: read_expert_adapter(name, repo.expert_paths[name], path)
            for name, path in repo.adapter_paths.items()
        }
        backbone, tokenizer_path = _backbone_entry(repo, pooled, bases)
        pool = ExpertPool(
            pooled, device_map=device_map, max_memory=max_memory, budget_bytes=memory_budget
        )
        tokenizer = load_tokenizer(tokenizer_path, label=f"{repo.ref} router backbone")
        return cls(
            manifest,
            repo.router,
            pool,
            tokenizer,
            backbone=backbone,
            source=repo.ref,
            revision=repo.revision,
            adapters=adapters,
            pool_names=pool_names,
        )

    @property
    def experts(self) -> tuple[str, ...]:
        """Expert names; `route` and `RoutedOutput.experts` index into this."""
        return self.manifest.names

    @property
    def config(self) -> dict[str, Any]:
        """The manifest as JSON (experts, router settings, calibration report)."""
        return self.manifest.to_json()

    def train(self, mode: bool = True) -> RoutedModel:
        """Routed models serve inference only; `train(False)` (eval mode) is a no-op."""
        if mode:
            raise NotImplementedError("a RoutedModel cannot be trained; train its experts")
        return self

    def eval(self) -> RoutedModel:
        """Eval mode (always on)."""
        return self.train(False)

    # -- routing ---------------------------------------------------------------------------

    def route(self, texts: Sequence[str], *, batch_size: int = 16) -> list[int]:
        """The expert index each text goes to (from its first `max_length` tokens)."""
        limit = self.manifest.router.max_length
        rows = [
            torch.tensor(
                self.tokenizer(text, truncation=True, max_length=limit)["input_ids"],
                dtype=torch.long,
            )
            for text in texts
        ]
        routes: list[int] = []
        for start in range(0, len(rows), batch_size):
            batch = model_inputs(rows[start : start + batch_size], pad_id=pad_id_of(self.tokenizer))
            routes += self.route_ids(batch["input_ids"], batch["attention_mask"]).tolist()
        return routes

    def route_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, T] ids -> [B] long expert indices (CPU), from each row's first `max_length`
        real tokens."""
        attention_mask = _mask_of(input_ids, attention_mask)
        batch = self._router_batch(input_ids, attention_mask)
        if self.router.inputs == "losses":
            inputs = loss_matrix(
                functools.partial(self._expert_losses, batch), len(self.experts)
            )  # [B, E]
        else:
            inputs = self._features(batch)  # [B, d]
        return self.router.choose(inputs)

    def _router_batch(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Each row's real tokens, cut to max_length, right-padded: the router sees inputs
        laid out as its calibration windows were, whatever the caller's padding side."""
        limit = self.manifest.router.max_length
        rows = [
            ids[mask.bool()][:limit]
            for ids, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)
        ]
        if any(len(row) == 0 for row in rows):
            raise ValueError("a row has no real token (its attention mask is all zeros)")
        return model_inputs(rows, pad_id=pad_id_of(self.tokenizer))

    @contextmanager
    def _running(self, name: str) -> Iterator[PreTrainedModel]:
        """The model that runs expert (or pool entry) `name`: its own, or its shared base with
        its adapter hooked on until the block ends."""
        model = self.pool.get(self.pool_names.get(name, name))
        adapter = self.adapters.get(name)
        if adapter is None:
            yield model
            return
        with adapter.active(model):
            yield model

    def _features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.backbone is not None
        assert self.manifest.router.layer is not None
        with self._running(self.backbone) as model:
            return pooled_features(
                model, batch["input_ids"], batch["attention_mask"], layer=self.manifest.router.layer
            )  # [B, d]

    def _expert_losses(self, batch: dict[str, torch.Tensor], expert: int) -> torch.Tensor:
        with self._running(self.experts[expert]) as model:
            return sequence_losses(model, batch["input_ids"], batch["attention_mask"])  # [B]

    # -- running the experts ---------------------------------------------------------------

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> RoutedOutput:
        """Route each row, run each chosen expert on its rows; logits [B, T, V] in row order,
        on `input_ids`' device."""
        attention_mask = _mask_of(input_ids, attention_mask)
        choice = self.route_ids(input_ids, attention_mask)
        logits: torch.Tensor | None = None  # [B, T, V], made once the first expert answers
        for expert in torch.unique(choice).tolist():
            rows = choice == expert  # [B]
            part = self._expert_logits(expert, input_ids[rows], attention_mask[rows])
            if logits is None:
                logits = part.new_empty((len(choice), *part.shape[1:]), device=input_ids.device)
            elif part.dtype != logits.dtype:  # experts of mixed dtypes: widen, never round
                logits = logits.to(torch.promote_types(logits.dtype, part.dtype))
            logits[rows.to(logits.device)] = part.to(logits)
        assert logits is not None  # a batch has at least one row
        return RoutedOutput(logits, choice)

    def _expert_logits(
        self, expert: int, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        with self._running(self.experts[expert]) as model, torch.inference_mode():
            device = input_device(model)
            out = model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                use_cache=False,
            )
        logits: torch.Tensor = out.logits  # [r, T, V]
        return logits

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Route on the prompt, generate with each chosen expert on its rows, and return
        [B, T'] ids (rows shorter than the longest are right-padded with the pad id).

        Batched prompts of different lengths should be left-padded, as for any decoder.
        """
        attention_mask = _mask_of(input_ids, attention_mask)
        choice = self.route_ids(input_ids, attention_mask)
        parts = {
            int(e): self._expert_generate(
                int(e), input_ids[choice == e], attention_mask[choice == e], generate_kwargs
            )
            for e in torch.unique(choice)
        }
        width = max(part.shape[1] for part in parts.values())
        out = torch.full(
            (len(choice), width),
            pad_id_of(self.tokenizer),
            dtype=torch.long,
            device=input_ids.device,
        )  # [B, T']
        for expert, part in parts.items():
            out[(choice == expert).to(input_ids.device), : part.shape[1]] = part.to(out.device)
        return out

    def _expert_generate(
        self,
        expert: int,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        kwargs.setdefault("pad_token_id", pad_id_of(self.tokenizer))
        with self._running(self.experts[expert]) as model, torch.inference_mode():
            device = input_device(model)
            # Typed loosely by transformers (mypy sees nn.Module's __getattr__).
            sequences = cast(Any, model).generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs
            )
        if not isinstance(sequences, torch.Tensor):
            raise TypeError(
                "RoutedModel.generate returns token ids only; leave return_dict_in_generate unset"
            )
        return sequences  # [r, T + new]


def _mask_of(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError(
            f"input_ids must be a non-empty [batch, tokens], got {tuple(input_ids.shape)}"
        )
    return torch.ones_like(input_ids) if attention_mask is None else attention_mask


def _pooled_experts(
    repo: LocalRoutedRepo,
) -> tuple[list[PooledModel], dict[str, str], dict[Path, str]]:
    """The pool's models (each expert, or once each base that adapter experts share), the pool
    name each expert runs on, and the pool name of each shared base's folder."""
    pooled: list[PooledModel] = []
    names: dict[str, str] = {}
    bases: dict[Path, str] = {}  # a base folder -> its pool name
    for expert in repo.manifest.experts:
        path = repo.expert_paths[expert.name]
        if expert.name not in repo.adapter_paths:
            pooled.append(PooledModel(expert.name, path, expert.dtype))
            names[expert.name] = expert.name
            continue
        if path not in bases:
            bases[path] = f"{SHARED_BASE}{len(bases)}"
            pooled.append(PooledModel(bases[path], path, expert.dtype))
        names[expert.name] = bases[path]
    return pooled, names, bases


def _backbone_entry(
    repo: LocalRoutedRepo, pooled: list[PooledModel], bases: dict[Path, str]
) -> tuple[str | None, Path]:
    """(pool name of the router backbone, folder of the router tokenizer); a separate backbone
    joins `pooled` pinned, since it runs on every batch, unless it is the shared base of
    adapter experts (`bases`), which then serves as both."""
    backbone = repo.manifest.router.backbone
    if backbone is None:  # perplexity: tokenize as the experts do
        return None, repo.expert_paths[repo.manifest.names[0]]
    if backbone.expert is not None:
        return backbone.expert, repo.expert_paths[backbone.expert]
    assert repo.backbone_path is not None  # resolved by open_routed_repo
    if repo.backbone_path in bases:
        return bases[repo.backbone_path], repo.backbone_path
    pooled.append(
        PooledModel(BACKBONE, repo.backbone_path, backbone.dtype, head=False, pinned=True)
    )
    return BACKBONE, repo.backbone_path


__all__ = ["RoutedModel", "RoutedOutput"]
