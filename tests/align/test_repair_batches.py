"""REPAIR over probe batches: the multi-pass fit equals the sequential one-batch fit."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import PreTrainedModel

from hfmerge.align.repair import (
    MAX_PASSES,
    Factors,
    ProbeBatches,
    SiteRms,
    channel_rms,
    fit,
    fit_factors,
    fold,
    hooked_sites,
    measure,
    scaled,
)
from hfmerge.align.repair_sites import RepairSite, repair_sites
from tests.support.tiny_models import make_tiny_model, tiny_batch

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/support/fixtures.py one_thread

WINDOWS = 16


def _windows(kind: str) -> dict[str, torch.Tensor]:
    """Sixteen windows of 32 tokens in one padded batch, rows of three lengths."""
    batch = tiny_batch(kind, seed=5, batch=WINDOWS, length=32)
    mask = batch["attention_mask"]
    mask[1::3, 20:] = 0  # more padded rows, so batches differ in their real-token counts
    return {"input_ids": batch["input_ids"], "attention_mask": mask}


def _split(batch: dict[str, torch.Tensor], size: int) -> ProbeBatches:
    """The rows of `batch`, `size` at a time (each keeps the full padded length)."""
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, WINDOWS, size)]


def _sequential_fit(
    model: PreTrainedModel, sites: list[RepairSite], batch: dict[str, torch.Tensor], target: SiteRms
) -> Factors:
    """Reference: one forward pass, each site fitted and folded as the pass reaches it."""
    modules, mask = dict(model.named_modules()), batch["attention_mask"].bool()
    factors: Factors = {}

    def correct(activation: torch.Tensor, site: RepairSite) -> torch.Tensor | None:
        now = channel_rms(activation, mask, site)
        factor = torch.where(now > 1e-8, target[site.module] / now, torch.ones_like(now))
        factors[site.module] = factor
        fold(modules[site.module], site, factor)
        return scaled(activation, site, factor) if site.side == "output" else None

    with hooked_sites(model, sites, correct), torch.no_grad():
        model(**batch)
    return factors


def _target(model: PreTrainedModel, sites: list[RepairSite], probe: ProbeBatches) -> SiteRms:
    """Each site's own RMS times a spread of 0.6..1.4 (a target that moves every site)."""
    generator = torch.Generator().manual_seed(2)
    return {
        s: r * (0.6 + 0.8 * torch.rand(len(r), generator=generator, dtype=torch.float64))
        for s, r in measure(model, sites, probe).items()
    }


def _assert_same(got: Factors, want: Factors, *, rtol: float) -> None:
    assert got.keys() == want.keys()
    for site, factor in want.items():
        torch.testing.assert_close(got[site], factor, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_one_batch_fit_equals_the_sequential_fit(kind: str) -> None:
    model = make_tiny_model(kind, seed=3, dtype=torch.float64)
    sites, batch = repair_sites(model), _windows(kind)
    target = _target(model, sites, [batch])
    reference = copy.deepcopy(model)
    want = _sequential_fit(reference, sites, batch, target)
    factors, passes = fit_factors(model, sites, [batch], target)
    assert passes == 1  # one batch: the first pass is the sequential fit
    _assert_same(factors, want, rtol=1e-9)
    assert max(float((f - 1).abs().max()) for f in want.values()) > 0.05  # factors do move
    fit(model, sites, [batch], target)
    for (name, folded), expected in zip(
        model.named_parameters(), reference.parameters(), strict=True
    ):
        torch.testing.assert_close(folded, expected, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("size", [4, 5])
def test_batched_fit_equals_the_one_batch_fit(kind: str, size: int) -> None:
    model = make_tiny_model(kind, seed=3, dtype=torch.float64)
    sites, batch = repair_sites(model), _windows(kind)
    batches = _split(batch, size)
    assert len(batches) > 2
    one = measure(model, sites, [batch])
    for site, rms in measure(model, sites, batches).items():  # sums, not means of batch means
        torch.testing.assert_close(rms, one[site], rtol=1e-12, atol=1e-14)
    target = _target(model, sites, [batch])
    want = _sequential_fit(copy.deepcopy(model), sites, batch, target)
    first, _ = fit_factors(model, sites, batches[:1], target)
    assert max(float((first[s] - want[s]).abs().max()) for s in want) > 1e-3  # control
    factors, passes = fit_factors(model, sites, batches, target)
    assert 1 < passes < MAX_PASSES  # settled, after more than one pass
    _assert_same(factors, want, rtol=1e-5)


def test_a_fit_that_runs_out_of_passes_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import hfmerge.align.repair as repair

    model = make_tiny_model("llama", seed=3, dtype=torch.float64)
    sites, batch = repair_sites(model), _windows("llama")
    batches = _split(batch, 4)
    target = _target(model, sites, [batch])
    monkeypatch.setattr(repair, "MAX_PASSES", 2)  # the batched fit needs about 8
    _, passes = fit_factors(model, sites, batches, target)
    assert passes == 2
    warning = capsys.readouterr().err
    assert "REPAIR's fit stopped after 2 passes" in warning
    _, passes = fit_factors(model, sites, [batch], target)  # one batch: exact in one pass
    assert passes == 1
    assert capsys.readouterr().err == ""
