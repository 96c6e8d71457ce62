"""The zoo's sizes and step counts (`ZooConfig`), and which of them `zoo:NAME` references use."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Literal

from hfmerge.errors import OptionError, UnknownNameError


@dataclass(frozen=True)
class ZooConfig:
    """Every size and step count of the zoo; part of the cache key."""

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 352  # Llama SwiGLU at ~2.75x hidden (GPT-2 members use 4x hidden)
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2  # Llama GQA: two query heads per KV head (GPT-2 has no GQA)
    context: int = 128
    batch_size: int = 16
    pretrain_steps: int = 300
    finetune_steps: int = 100
    pretrain_lr: float = 3e-3
    finetune_lr: float = 1e-3
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    train_chars: int | None = None  # cap on each domain's train text; None uses all of it
    eval_windows: int = 128  # held-out windows per domain for the losses in zoo.json
    # Fixed so results do not depend on the machine. One thread, because on a shared 2-core box
    # two OpenMP threads that get preempted spin at barriers and run many times slower.
    threads: int = 1

    @classmethod
    def tiny(cls) -> ZooConfig:
        """A zoo that builds in seconds, for tests: same shapes of things, far smaller."""
        return cls(
            vocab_size=384,
            hidden_size=32,
            intermediate_size=88,
            num_layers=2,
            num_heads=2,
            num_kv_heads=1,
            context=64,
            batch_size=8,
            pretrain_steps=120,
            finetune_steps=50,
            pretrain_lr=5e-3,
            finetune_lr=2e-3,
            train_chars=150_000,
            eval_windows=16,
        )

    def with_width(self, hidden_size: int) -> ZooConfig:
        """This config at another width: FF at the same multiple of it, heads and KV heads fixed.

        Depth, data, steps, tokenizer and learning rates stay as they are, so only the width
        differs. Heads stay fixed (head_dim grows with the width) rather than head_dim, so every
        width has the same symmetry groups (one residual group, one FF group per block, the same
        KV heads with the same query heads) and only their sizes grow, as when Entezari et al.
        widen the layers of an MLP. It also makes this config's own width give this very config
        (same cache key), so the default zoo's seed pair is one of the widths.

        Raises:
            OptionError: `hidden_size` is not a positive multiple of 2 x `num_heads` (each head
                gets an even head_dim, which RoPE rotates in pairs).
        """
        step = 2 * self.num_heads
        if hidden_size < step or hidden_size % step:
            raise OptionError(
                "hidden_size",
                str(hidden_size),
                f"not a positive multiple of {step} (2 x {self.num_heads} heads)",
                why="every head needs the same even head_dim: RoPE rotates pairs of dimensions",
                fix=f"pick a width such as {step * max(1, hidden_size // step)}",
            )
        ff = round(hidden_size * self.intermediate_size / self.hidden_size)
        return replace(self, hidden_size=hidden_size, intermediate_size=ff)


ZOO_SIZE_ENV = "HFMERGE_ZOO_SIZE"  # "default" or "tiny": which config `zoo:NAME` references use


_SIZES = ("default", "tiny")


def configured_zoo() -> ZooConfig:
    """The config that `zoo:NAME` references use: `$HFMERGE_ZOO_SIZE` (default or tiny).

    `tiny` builds in seconds; it exists for smoke tests of recipes that name zoo models.
    """
    size = os.environ.get(ZOO_SIZE_ENV, "default") or "default"
    if size not in _SIZES:
        raise UnknownNameError(f"zoo size (${ZOO_SIZE_ENV})", size, list(_SIZES))
    return ZooConfig.tiny() if size == "tiny" else ZooConfig()


ZooArch = Literal["llama", "gpt2"]
