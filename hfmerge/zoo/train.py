"""Train and evaluate the zoo's small causal LMs (Llama, GPT-2): a plain, deterministic AdamW loop.

Determinism comes from fixed seeds, a forked RNG, a fixed CPU thread count and no dropout.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from hfmerge.runtime import fixed_threads
from hfmerge.zoo.config import ZooArch, ZooConfig

if TYPE_CHECKING:
    from pathlib import Path

    from rich.progress import Progress


Streams = Mapping[str, torch.Tensor]  # domain -> 1-D int64 token ids of one long text
_EVAL_BATCH = 16
_LOSS_TAIL = 20  # steps averaged for the reported final train loss: one step's loss is noisy


@dataclass(frozen=True)
class TrainResult:
    """What one training run did: its step count, wall time and per-step losses."""

    steps: int
    seconds: float
    losses: tuple[float, ...]

    @property
    def final_loss(self) -> float:
        """Mean loss over the last few steps."""
        tail = self.losses[-_LOSS_TAIL:]
        return sum(tail) / len(tail) if tail else math.nan


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    """Token ids of a long text, without specials; the backend skips the max-length warning."""
    ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    return torch.tensor(ids, dtype=torch.long)


ZOO_ARCHS: tuple[ZooArch, ...] = ("llama", "gpt2")


def _llama_config(config: ZooConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """GQA, SwiGLU, RoPE, RMSNorm, untied LM head, no dropout."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.context,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _gpt2_config(config: ZooConfig, tokenizer: PreTrainedTokenizerFast) -> GPT2Config:
    """GPT-2 as published: learned positions, LayerNorm, GELU FF at 4x width, tied head.

    Same width, depth, heads and data as the Llama members, so the two families' barriers
    compare; no GQA (GPT-2 has none) and dropout off for determinism.
    """
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.context,
        n_embd=config.hidden_size,
        n_layer=config.num_layers,
        n_head=config.num_heads,
        n_inner=4 * config.hidden_size,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def new_model(
    config: ZooConfig, tokenizer: PreTrainedTokenizerFast, *, seed: int, arch: ZooArch = "llama"
) -> PreTrainedModel:
    """A freshly initialised causal LM of family `arch`, seeded without touching global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: PreTrainedModel = (
            GPT2LMHeadModel(_gpt2_config(config, tokenizer))
            if arch == "gpt2"
            else LlamaForCausalLM(_llama_config(config, tokenizer))
        )
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_length=config.context,
    )
    return model


def sample_batch(
    streams: Streams,
    mix: Mapping[str, int],
    *,
    context: int,
    bos_id: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """[sum(mix), context] windows: `mix[d]` random windows of domain d, each led by BOS."""
    rows: list[torch.Tensor] = []
    for domain, count in mix.items():
        tokens = streams[domain]
        starts = torch.randint(0, len(tokens) - context + 1, (count,), generator=generator)
        offsets = torch.arange(context - 1)
        windows = tokens[starts[:, None] + offsets[None, :]]  # [count, context - 1]
        bos = torch.full((count, 1), bos_id, dtype=torch.long)
        rows.append(torch.cat([bos, windows], dim=1))  # [count, context]
    return torch.cat(rows, dim=0)


def _bos_id(model: PreTrainedModel) -> int:
    bos = model.config.bos_token_id
    if not isinstance(bos, int):
        raise ValueError("zoo models always set bos_token_id; this model has none")
    return bos


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, object]]:
    # Decay matrices only: shrinking norm gains and embeddings-as-vectors hurts small models.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    keep = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def lr_factor(step: int, *, steps: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to 1, then cosine decay to `floor` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup - 1)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _progress_bar() -> Progress:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def train_lm(
    model: PreTrainedModel,
    streams: Streams,
    *,
    mix: Mapping[str, int],
    steps: int,
    lr: float,
    config: ZooConfig,
    seed: int,
    label: str = "training",
    progress: bool = True,
) -> TrainResult:
    """Train `model` in place for `steps` AdamW steps on batches drawn as `mix` says."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(
        _param_groups(model, config.weight_decay), lr=lr, betas=(0.9, 0.95), eps=1e-8
    )
    warmup = max(1, round(config.warmup_fraction * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps=steps, warmup=warmup)
    )
    bos_id = _bos_id(model)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    with fixed_threads(config.threads), _progress_bar() if progress else nullcontext() as bar:
        task = bar.add_task(label, total=steps) if bar is not None else None
        for _ in range(steps):
            batch = sample_batch(
                streams, mix, context=config.context, bos_id=bos_id, generator=generator
            )
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.item()))
            if bar is not None and task is not None:
                bar.update(task, advance=1, description=f"{label} loss {losses[-1]:.3f}")
    model.train(False)
    return TrainResult(steps=steps, seconds=time.perf_counter() - start, losses=tuple(losses))


def eval_windows(tokens: torch.Tensor, *, context: int, bos_id: int, limit: int) -> torch.Tensor:
    """[n, context] BOS-led windows tiling `tokens`: at most `limit`, spread over the text."""
    body = context - 1
    count = len(tokens) // body
    tiles = tokens[: count * body].view(count, body)  # [count, context - 1]
    if count > limit:
        tiles = tiles[torch.linspace(0, count - 1, limit).round().long()]
    bos = torch.full((len(tiles), 1), bos_id, dtype=torch.long)
    return torch.cat([bos, tiles], dim=1)  # [n, context]


@torch.no_grad()
def heldout_loss(model: PreTrainedModel, tokens: torch.Tensor, *, config: ZooConfig) -> float:
    """Mean next-token loss (nats) over evenly spread windows of held-out `tokens`."""
    windows = eval_windows(
        tokens, context=config.context, bos_id=_bos_id(model), limit=config.eval_windows
    )
    total, count = 0.0, 0
    model.train(False)
    with fixed_threads(config.threads):
        for batch in torch.split(windows, _EVAL_BATCH):
            logits = model(input_ids=batch).logits[:, :-1].float()  # [b, context - 1, vocab]
            targets = batch[:, 1:]  # [b, context - 1]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += targets.numel()
    return total / count


def unigram_loss(train: torch.Tensor, heldout: torch.Tensor, *, vocab_size: int) -> float:
    """Held-out cross-entropy (nats/token) of add-one-smoothed train token frequencies."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    return float(-log_probs[heldout].mean())


@contextmanager
def quiet_hf_bars() -> Iterator[None]:
    """Hide transformers' one-shard load/save bars (noise beside ours), then restore them."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """Write a loadable model dir; current `transformers` always writes safetensors."""
    with quiet_hf_bars():
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def load_model(model_dir: Path) -> PreTrainedModel:
    """Load a zoo model (either family) in float32 for further training."""
    with quiet_hf_bars():
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
        )
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"{model_dir} did not load as a transformers model")
    return model


def log(message: str) -> None:
    """One progress line on stderr (stdout is for data)."""
    print(f"hfmerge: {message}", file=sys.stderr, flush=True)
