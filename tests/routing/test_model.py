"""RoutedModel over tiny experts: routes, exact per-row logits, generate, round trip, eval."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import torch
from safetensors.torch import load_file

from hfmerge.lm.load import is_causal, load_tokenizer
from hfmerge.lm.probe import kept_positions, pool
from hfmerge.lm.scoring import evaluate
from hfmerge.lm.textdata import token_windows
from hfmerge.routing import (
    MANIFEST_FILE,
    ROUTER_FILE,
    BuiltRouter,
    RoutedModel,
    default_layer,
    eval_routed,
    pooled_features,
    read_manifest,
)
from hfmerge.routing.model import BACKBONE
from tests.support.routing import (
    EXPECTED_ROUTES,
    LENGTH,
    NAMES,
    build,
    digit_texts,
    letter_texts,
    load_expert,
    mixed_batch,
    save_experts,
    write_bundled,
)
from tests.support.tiny_models import make_tiny_model, tiny_batch

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/support/fixtures.py one_thread


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_experts(tmp_path_factory.mktemp("experts"))


@pytest.fixture(scope="module")
def centroid(experts: dict[str, Path]) -> BuiltRouter:
    return build("centroid", experts)


@pytest.fixture(scope="module")
def repo(
    centroid: BuiltRouter, experts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return write_bundled(centroid, experts, tmp_path_factory.mktemp("routed") / "repo")


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_pooled_features_are_the_masked_mean_of_that_blocks_output(kind: str) -> None:
    model = make_tiny_model(kind)
    batch = tiny_batch(kind)
    features = pooled_features(model, batch["input_ids"], batch["attention_mask"], layer=1)
    with torch.no_grad():
        states = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
        ).hidden_states
    keep = kept_positions(batch["attention_mask"], causal=is_causal(model.config))
    assert torch.allclose(features, pool(states[1], keep, pooling="mean"), atol=1e-6)
    assert features.dtype == torch.float32
    assert features.device.type == "cpu"
    assert [default_layer(n) for n in (1, 2, 4, 12, 32)] == [1, 1, 3, 8, 21]


def test_calibration_report_and_layer(centroid: BuiltRouter) -> None:
    assert centroid.layer == default_layer(2)
    assert centroid.report.samples == [24, 24]
    assert centroid.report.heldout_accuracy == 1.0
    assert centroid.report.warnings == []


def test_texts_route_to_the_expert_of_their_domain(repo: Path) -> None:
    model = RoutedModel.from_pretrained(repo, device_map=None)
    assert model.experts == NAMES
    assert model.route(digit_texts(4, seed=5) + letter_texts(4, seed=6)) == [0] * 4 + [1] * 4


def test_each_row_gets_exactly_its_experts_logits(repo: Path) -> None:
    model = RoutedModel.from_pretrained(repo, device_map="cpu")
    batch = mixed_batch(model.tokenizer)
    out = model(batch["input_ids"], batch["attention_mask"])
    assert out.experts.tolist() == EXPECTED_ROUTES
    for index, name in enumerate(NAMES):
        rows = out.experts == index
        expert = load_expert(repo / "experts" / name)
        with torch.no_grad():
            expected = expert(
                input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows]
            ).logits
        assert torch.equal(out.logits[rows], expected)
    assert model.pool.device_maps == {"digits": {"": "cpu"}, "letters": {"": "cpu"}}


def test_the_saved_repo_routes_as_the_built_router(
    repo: Path, centroid: BuiltRouter, experts: dict[str, Path]
) -> None:
    saved = load_file(repo / ROUTER_FILE)
    assert saved.keys() == centroid.router.to_tensors().keys()
    assert all(torch.equal(saved[k], v) for k, v in centroid.router.to_tensors().items())
    manifest = read_manifest(repo)
    assert manifest.router.layer == centroid.layer
    assert manifest.calibration["samples"] == [24, 24]
    assert sorted(p.name for p in (repo / "experts" / "letters").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert sorted(p.name for p in repo.iterdir()) == ["experts", MANIFEST_FILE, ROUTER_FILE]
    # The built router on features of the original backbone, against the loaded repo.
    tokenizer = load_tokenizer(experts["digits"], label="digits")
    texts = digit_texts(3, seed=11) + letter_texts(3, seed=12)
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=LENGTH)
    backbone = load_expert(experts["digits"])
    features = pooled_features(
        backbone, batch["input_ids"], batch["attention_mask"], layer=centroid.layer or 0
    )
    loaded = RoutedModel.from_pretrained(repo, device_map=None)
    assert (
        loaded.route_ids(batch["input_ids"], batch["attention_mask"]).tolist()
        == centroid.router.choose(features).tolist()
        == [0, 0, 0, 1, 1, 1]
    )


def test_left_padding_routes_like_right_padding(repo: Path) -> None:
    model = RoutedModel.from_pretrained(repo, device_map=None)
    right = mixed_batch(model.tokenizer)
    model.tokenizer.padding_side = "left"
    left = mixed_batch(model.tokenizer)
    assert (
        model.route_ids(left["input_ids"], left["attention_mask"]).tolist()
        == model.route_ids(right["input_ids"], right["attention_mask"]).tolist()
    )


def test_generate_equals_each_experts_own_greedy_generate(repo: Path) -> None:
    model = RoutedModel.from_pretrained(repo, device_map=None)
    model.tokenizer.padding_side = "left"  # decoder prompts of different lengths
    batch = mixed_batch(model.tokenizer)
    out = model.generate(
        batch["input_ids"], batch["attention_mask"], max_new_tokens=4, do_sample=False
    )
    assert out.shape == (4, batch["input_ids"].shape[1] + 4)
    for index, name in enumerate(NAMES):
        rows = torch.tensor(EXPECTED_ROUTES) == index
        expert = load_expert(repo / "experts" / name)
        # transformers types `generate`'s self as a protocol that PreTrainedModel does not match.
        expected = cast(Any, expert).generate(
            input_ids=batch["input_ids"][rows],
            attention_mask=batch["attention_mask"][rows],
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_token_id,
        )
        assert torch.equal(out[rows], expected)


def test_a_separate_backbone_is_bundled_and_kept_loaded(
    experts: dict[str, Path], tmp_path: Path
) -> None:
    built = build("logistic", experts, backbone="backbone")
    repo = write_bundled(built, experts, tmp_path / "repo", backbone="backbone")
    assert read_manifest(repo).router.backbone is not None
    model = RoutedModel.from_pretrained(repo, device_map=None)
    assert model.route(digit_texts(2, seed=3) + letter_texts(2, seed=4)) == [0, 0, 1, 1]
    assert model.pool.models[BACKBONE].pinned
    assert not model.pool.models[BACKBONE].head
    assert model.pool.loaded == (BACKBONE,)  # routing needs no expert


def test_perplexity_router_picks_the_expert_with_the_lower_loss(
    experts: dict[str, Path], tmp_path: Path
) -> None:
    built = build("perplexity", experts)
    assert built.layer is None
    repo = write_bundled(built, experts, tmp_path / "repo")
    assert read_manifest(repo).router.backbone is None
    model = RoutedModel.from_pretrained(repo, device_map=None)
    batch = mixed_batch(model.tokenizer)
    losses = []
    for name in NAMES:
        expert = load_expert(repo / "experts" / name)
        row_losses = []
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            real = ids[mask.bool()].unsqueeze(0)  # [1, t]
            with torch.no_grad():
                row_losses.append(float(expert(input_ids=real, labels=real).loss))
        losses.append(row_losses)
    expected = torch.tensor(losses).argmin(0)  # [E, B] -> [B]
    assert (
        model.route_ids(batch["input_ids"], batch["attention_mask"]).tolist() == expected.tolist()
    )


def test_eval_scores_each_window_with_its_expert(repo: Path, tmp_path: Path) -> None:
    data = tmp_path / "digits.txt"
    data.write_text("\n".join(digit_texts(6, seed=21)), encoding="utf-8")
    routed = eval_routed(repo, data=str(data), max_length=LENGTH, device_map=None)
    tokenizer = load_tokenizer(repo / "experts" / "digits", label="digits")
    windows = token_windows(
        tokenizer, [data.read_text(encoding="utf-8")], max_length=LENGTH, samples=None
    )
    direct = evaluate(load_expert(repo / "experts" / "digits"), tokenizer, windows)
    assert routed.tokens == direct.tokens
    assert routed.windows == direct.windows
    assert routed.loss == pytest.approx(direct.loss, rel=1e-6)  # every window goes to digits
    assert routed.max_length == LENGTH
    assert routed.data == str(data)
