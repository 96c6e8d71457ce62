"""Weight matching's first-sweep time, estimated before any weight is read: the FLOP it counts
are the products the sweep runs, and the estimate is said before the work starts."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from hfmerge.align import matching_time, weight_matching
from hfmerge.align.matching_problem import group_touches
from hfmerge.align.matching_time import (
    CALIBRATION_UNITS,
    LAP_EXPONENT,
    MachineSpeed,
    SweepEstimate,
    SweepWork,
    first_sweep_estimate,
)
from hfmerge.align.weights import Weights
from hfmerge.arch import spec_for
from hfmerge.arch.permute import permute_state_dict
from hfmerge.arch.spec import ArchSpec
from tests.support.tiny_models import make_tiny_model, nontrivial_permutations

State = dict[str, torch.Tensor]


def _state(kind: str) -> tuple[State, ArchSpec]:
    model = make_tiny_model(kind, seed=0)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, spec_for(model.config.to_dict(), state.keys())


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen3"])
def test_counted_flop_are_the_first_sweeps_products(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    state, spec = _state(kind)
    permuted = permute_state_dict(state, spec, nontrivial_permutations(spec, seed=2))
    done: list[float] = []
    real = torch.Tensor.addmm_

    def counted(total: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> Any:
        done.append(2.0 * left.shape[0] * left.shape[1] * right.shape[1])
        return real(total, left, right)

    monkeypatch.setattr(torch.Tensor, "addmm_", counted)
    weight_matching(spec, state, permuted, max_iter=1)
    touches = {g: ts for g, ts in group_touches(spec, list(state)).items() if ts}
    work = SweepWork.of(spec, touches, Weights.of(state))
    assert work.flop == sum(done) > 0
    plain = [g for g in touches if spec.groups[g].kind != "attention"]
    assert sorted(work.assignments) == sorted(spec.groups[g].size for g in plain)


def test_estimate_is_products_at_the_rate_plus_scaled_assignments() -> None:
    work = SweepWork(flop=4e12, assignments=(CALIBRATION_UNITS, 2 * CALIBRATION_UNITS))
    speed = MachineSpeed(flop_per_second=1e11, assignment_seconds=0.5)
    estimate = SweepEstimate.of(work, speed)
    assert estimate.seconds == pytest.approx(40 + 0.5 + 0.5 * 2**LAP_EXPONENT)


def test_machine_speed_is_measured() -> None:
    speed = MachineSpeed.measure(widest=256)
    assert math.isfinite(speed.flop_per_second)
    assert speed.flop_per_second > 1e6
    assert 0 < speed.assignment_seconds < 60


def test_estimate_is_said_before_the_first_sweep_and_only_when_worth_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state, spec = _state("llama")
    touches = {g: ts for g, ts in group_touches(spec, list(state)).items() if ts}
    assert first_sweep_estimate(spec, touches, Weights.of(state)) is None  # a tiny model

    monkeypatch.setattr(matching_time, "WORTH_ESTIMATING_FLOP", 0)
    result = weight_matching(spec, state, state, progress=True)
    said = capsys.readouterr().err
    assert "the first sweep should take about" in said
    assert said.index("first sweep should take") < said.index("weight matching, sweep 1")
    assert len(result.seconds) == result.iterations
    assert all(s > 0 for s in result.seconds)
