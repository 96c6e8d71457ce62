"""Tiny experts with clearly separated domains (digits vs letters) and routed repos over them."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from hfmerge.recipe.schema import ProbeSpec, RouteSpec
from hfmerge.routing import (
    BackboneRef,
    BuiltRouter,
    ExpertEntry,
    ModelLocation,
    build_router,
    routed_manifest,
    write_routed_repo,
)
from tests.support.lm import save_lm

NAMES = ("digits", "letters")
LENGTH = 32


def digit_texts(count: int, *, seed: int = 0) -> list[str]:
    """Lines of random numbers."""
    rng = random.Random(seed)
    return [" ".join(str(rng.randint(0, 99999)) for _ in range(12)) for _ in range(count)]


def letter_texts(count: int, *, seed: int = 0) -> list[str]:
    """Lines of random lowercase words."""
    rng = random.Random(seed)
    return [
        " ".join("".join(rng.choice("abcdefghijklmnop") for _ in range(5)) for _ in range(10))
        for _ in range(count)
    ]


def save_experts(root: Path) -> dict[str, Path]:
    """Two tiny random Llamas sharing the char tokenizer, and a third as a separate backbone."""
    return {
        "digits": save_lm("llama", root / "digits", seed=0),
        "letters": save_lm("llama", root / "letters", seed=1),
        "backbone": save_lm("llama", root / "backbone", seed=2),
    }


def build(
    method: str, experts: dict[str, Path], *, backbone: str = "digits", **route: Any
) -> BuiltRouter:
    """`method` fitted on digit vs letter texts, with `experts[backbone]` as the backbone; `route`
    holds other keys of the recipe's `route:` section."""
    return build_router(
        RouteSpec.model_validate({"method": method, **route}),
        ProbeSpec(samples=24, max_length=LENGTH),
        experts=[experts[n] for n in NAMES],
        backbone=experts[backbone],
        calibration_texts=[digit_texts(12), letter_texts(12)],
        names=NAMES,
    )


def write_bundled(
    built: BuiltRouter, experts: dict[str, Path], out: Path, *, backbone: str = "digits"
) -> Path:
    """A routed repo bundling both experts (and the backbone when it is not one of them)."""
    entries = [ExpertEntry(n, ModelLocation(path=f"experts/{n}"), "float32") for n in NAMES]
    separate = backbone not in NAMES
    ref = (
        BackboneRef(location=ModelLocation(path="backbone"), dtype="float32")
        if separate
        else BackboneRef(expert=backbone)
    )
    manifest = routed_manifest(built, entries, backbone=ref)
    return write_routed_repo(
        out,
        manifest,
        built.router,
        bundle_sources={n: experts[n] for n in NAMES},
        backbone_source=experts[backbone] if separate else None,
    )


def load_expert(path: Path) -> PreTrainedModel:
    """An expert loaded independently of the routing code, float32 on the CPU."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train(False)
    return model


def mixed_batch(tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    """Digit and letter rows interleaved, right-padded (rows have different lengths)."""
    texts = [
        digit_texts(1, seed=7)[0][:20],
        letter_texts(1, seed=8)[0],
        letter_texts(1, seed=9)[0][:25],
        digit_texts(1, seed=10)[0],
    ]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


EXPECTED_ROUTES = [0, 1, 1, 0]  # of `mixed_batch`
