"""REPAIR: folding equals scaling activations, fits meet their targets, RoPE pairs commute."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from hfmerge.align.repair import (
    Factors,
    ProbeBatches,
    Repairer,
    SiteRms,
    blend,
    fit,
    fold,
    fold_factors,
    hooked_sites,
    measure,
    scaled,
)
from hfmerge.align.repair_checkpoint import fold_into_checkpoint, folded_tensors
from hfmerge.align.repair_sites import RepairSite, repair_sites, rope_ties
from hfmerge.errors import NoPermutationSpecError
from hfmerge.tensors import LazyCheckpoint
from tests.support.tiny_models import make_tiny_model, max_abs_diff, model_outputs, tiny_batch

KINDS = ["llama", "qwen2", "mistral", "gpt2", "gpt_neox", "bert", "bert_base_model"]
DECODER_KINDS = ["granite", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "olmo3"]
DECODER_KINDS += ["exaone4"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/support/fixtures.py one_thread


def _probe(kind: str, *, seed: int = 0) -> ProbeBatches:
    batch = tiny_batch(kind, seed=seed, batch=4, length=12)
    return [{k: batch[k] for k in ("input_ids", "attention_mask")}]


def _channel_counts(
    model: PreTrainedModel, sites: list[RepairSite], probe: ProbeBatches
) -> dict[str, int]:
    """Factor count per site, read off one forward pass (all channels where untied and unpicked)."""
    return {site: len(rms) for site, rms in measure(model, sites, probe).items()}


def _effective(rms: SiteRms, factors: Factors, sites: list[RepairSite]) -> SiteRms:
    """RMS as the site's weights see it: an input site's factor lives in the weights reading it."""
    return {
        s.module: rms[s.module] * factors[s.module] if s.side == "input" else rms[s.module]
        for s in sites
    }


@pytest.mark.parametrize("kind", [*KINDS, *DECODER_KINDS])
def test_folded_factors_equal_scaling_the_activations(kind: str) -> None:
    model = make_tiny_model(kind, seed=3, dtype=torch.float64)
    sites, probe = repair_sites(model), _probe(kind)
    counts = _channel_counts(model, sites, probe)
    generator = torch.Generator().manual_seed(7)
    factors = {
        s: 0.5 + torch.rand(n, generator=generator, dtype=torch.float64) for s, n in counts.items()
    }
    by_module = {site.module: site for site in sites}

    def scale(activation: torch.Tensor, site: RepairSite) -> torch.Tensor:
        return scaled(activation, site, factors[site.module])

    inputs = tiny_batch(kind, seed=1)
    plain = model_outputs(model, inputs)
    with hooked_sites(model, sites, scale):
        hooked = model_outputs(model, inputs)
    folded = copy.deepcopy(model)
    modules = dict(folded.named_modules())
    for module, factor in factors.items():
        fold(modules[module], by_module[module], factor)
    assert max_abs_diff(model_outputs(folded, inputs), hooked) < 1e-10
    assert max_abs_diff(plain, hooked) > 1e-3  # negative control: the factors do change it


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt_neox", "bert", *DECODER_KINDS])
def test_fit_meets_every_target_and_is_the_identity_on_own_statistics(kind: str) -> None:
    model = make_tiny_model(kind, seed=3, dtype=torch.float64)
    sites, probe = repair_sites(model), _probe(kind)
    own = measure(model, sites, probe)
    before = {n: p.clone() for n, p in model.named_parameters()}
    factors = fit(model, sites, probe, own)
    assert all(torch.allclose(f, torch.ones_like(f), atol=1e-12) for f in factors.values())
    assert all(torch.allclose(p, before[n], atol=1e-12) for n, p in model.named_parameters())

    generator = torch.Generator().manual_seed(2)
    target = {
        s: r * (0.6 + 0.8 * torch.rand(len(r), generator=generator, dtype=torch.float64))
        for s, r in own.items()
    }
    factors = fit(model, sites, probe, target)
    for site, wanted in _effective(measure(model, sites, probe), factors, sites).items():
        torch.testing.assert_close(wanted, target[site], rtol=1e-9, atol=1e-12)


def test_sites_cover_each_block_and_rope_pairs_share_a_factor() -> None:
    model = make_tiny_model("llama")
    sites = repair_sites(model)
    assert len(sites) == 6 * model.config.num_hidden_layers + 1
    assert sites[-1].module == "model.norm"
    # head_dim 8, full rotary: dim j pairs with j + 4 in every head; 4 factors per head.
    ties = rope_ties(num_heads=2, head_dim=8, rotary_dims=8)
    assert ties.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7]
    partial = rope_ties(num_heads=1, head_dim=8, rotary_dims=4)  # dims 0..3 rotate, 4..7 do not
    assert partial.tolist() == [0, 1, 0, 1, 2, 3, 4, 5]


# Sites per block: norms, Q/K (projections or their norms), O input, down input.
SITES_PER_BLOCK = {"granite": 6, "qwen3": 6, "gemma": 6, "gemma2": 8, "gemma3_text": 8}
SITES_PER_BLOCK |= {"phi3": 5, "olmo2": 6, "olmo3": 6, "exaone4": 6}


@pytest.mark.parametrize("kind", DECODER_KINDS)
def test_decoder_sites_cover_each_block(kind: str) -> None:
    model = make_tiny_model(kind)
    sites = repair_sites(model)
    assert len(sites) == SITES_PER_BLOCK[kind] * model.config.num_hidden_layers + 1
    assert sites[-1].module == "model.norm"
    modules = dict(model.named_modules())
    assert all(site.module in modules for site in sites)
    offset = 1.0 if kind.startswith("gemma") else 0.0  # Gemma norms compute x * (1 + w)
    norms = [site for site in sites if site.module.endswith("norm")]
    assert norms
    assert all(site.gain_offset == offset for site in norms)
    counts = _channel_counts(model, sites, _probe(kind))
    if kind in (
        "qwen3",
        "gemma3_text",
        "exaone4",
    ):  # per-head q/k norm: one factor per RoPE pair of a head
        head_dim = model.config.head_dim
        assert counts["model.layers.0.self_attn.q_norm"] == head_dim // 2


def test_a_tied_factor_commutes_with_rotary_embedding() -> None:
    heads, length, head_dim = 2, 5, 8
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, length, head_dim, generator=generator, dtype=torch.float64)
    angles = torch.randn(length, head_dim // 2, generator=generator, dtype=torch.float64)
    cos = torch.cat([angles.cos(), angles.cos()], -1)[None]  # [1, t, head_dim]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[None]
    ties = rope_ties(heads, head_dim, head_dim).view(heads, head_dim)  # [heads, head_dim]
    factors = torch.rand(int(ties.max()) + 1, generator=generator, dtype=torch.float64) + 0.5
    scale = factors[ties][None, :, None, :]  # [1, heads, 1, head_dim]
    rotated_then_scaled = apply_rotary_pos_emb(q, q, cos, sin)[0] * scale
    scaled_then_rotated = apply_rotary_pos_emb(q * scale, q * scale, cos, sin)[0]
    torch.testing.assert_close(scaled_then_rotated, rotated_then_scaled)
    untied = torch.rand(1, heads, 1, head_dim, generator=generator, dtype=torch.float64) + 0.5
    assert not torch.allclose(
        apply_rotary_pos_emb(q * untied, q, cos, sin)[0],
        apply_rotary_pos_emb(q, q, cos, sin)[0] * untied,
    )


@pytest.mark.parametrize("kind", ["gpt2", "gemma3_text", "phi3", "olmo2"])
def test_repairer_targets_blend_the_endpoints(kind: str) -> None:
    a = make_tiny_model(kind, seed=1, dtype=torch.float64)
    b = make_tiny_model(kind, seed=2, dtype=torch.float64)
    probe = _probe(kind)
    repairer = Repairer(a, probe)
    repairer.measure_endpoints(lambda lam: a if lam == 0.0 else b)
    target = blend(repairer.rms_a, repairer.rms_b, 0.25)
    site = repairer.sites[0].module
    torch.testing.assert_close(
        target[site], 0.75 * repairer.rms_a[site] + 0.25 * repairer.rms_b[site]
    )
    mid = copy.deepcopy(a)
    with torch.no_grad():
        for (_, p_mid), p_b in zip(mid.named_parameters(), b.parameters(), strict=True):
            p_mid.lerp_(p_b, 0.25)
    factors = repairer.apply(mid, 0.25)
    reached = _effective(measure(mid, repairer.sites, probe), factors, repairer.sites)
    for name, wanted in target.items():
        torch.testing.assert_close(reached[name], wanted, rtol=1e-9, atol=1e-12)


def test_unsupported_family_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_tiny_model("llama")
    monkeypatch.setattr(model.config, "model_type", "t5")  # a class variable, set on the instance
    refusal = "REPAIR needs a permutation spec, and model_type 't5' has none"
    with pytest.raises(NoPermutationSpecError, match=refusal):
        repair_sites(model)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen3", "gemma"])
def test_folding_into_a_checkpoint_streams_and_equals_folding_into_the_model(
    kind: str, tmp_path: Path
) -> None:
    depth: dict[str, Any] = {"n_layer" if kind == "gpt2" else "num_hidden_layers": 4}
    model = make_tiny_model(kind, seed=3, **depth)
    model.save_pretrained(tmp_path)
    sites, probe = repair_sites(model), _probe(kind)
    generator = torch.Generator().manual_seed(7)
    factors = {
        s: 0.5 + torch.rand(n, generator=generator)
        for s, n in _channel_counts(model, sites, probe).items()
    }
    expected = copy.deepcopy(model)
    fold_factors(expected, sites, factors)

    # Every tensor comes out once, and only tensors still awaiting a later site are held (a
    # few at a time, however deep the model), not every folded matrix at once.
    held: list[int] = []
    names: list[str] = []
    with LazyCheckpoint(tmp_path, label="m") as reader:

        def read(name: str) -> torch.Tensor:
            held.append(len(held) + 1 - len(names))
            return reader.get(name)

        for name, _value in folded_tensors(model, sites, factors, read, label="m"):
            names.append(name)
    assert len(names) == len(set(names)) > 4 * 4
    assert max(held) <= 3

    fold_into_checkpoint(tmp_path, model, sites, factors, label="m")
    reloaded = type(model).from_pretrained(tmp_path)
    want = expected.state_dict()
    for name, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=1e-6, atol=1e-7, msg=name)
    assert any(not torch.equal(v, model.state_dict()[n]) for n, v in want.items())
