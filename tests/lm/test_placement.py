"""`--max-memory` as one size: parsing, and the plan that places two probed models within it."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from hfmerge.errors import HfMergeError, OptionError
from hfmerge.lm.placement import (
    BASE_BYTES,
    DeviceMap,
    Footprint,
    ProbePlacement,
    check_budget_map,
    parse_memory_limit,
    plan_placement,
)
from tests.support.lm import save_lm

MODEL = Footprint(weights=1000, largest_shard=600, largest_tensor=100)


def test_one_size_is_a_byte_budget_and_device_entries_are_accelerate_limits() -> None:
    assert parse_memory_limit("4GB") == 4 * 10**9
    assert parse_memory_limit(" 1.5GiB ") == int(1.5 * 2**30)
    assert parse_memory_limit("0=20GiB,cpu=60GiB") == {0: "20GiB", "cpu": "60GiB"}
    with pytest.raises(OptionError, match="--max-memory") as caught:
        parse_memory_limit("lots")
    assert "4GB" in str(caught.value.fix)


def place(budget: int, *, kept: int = 50) -> ProbePlacement:
    fixed = BASE_BYTES + MODEL.largest_shard + 10  # 10: the working bytes below
    return plan_placement(
        (MODEL, MODEL), budget=fixed + budget, device_map=None, working=10, kept=kept
    )


def test_the_plan_loads_together_then_one_at_a_time_then_offloads() -> None:
    together = place(2000)
    assert (together.one_at_a_time, together.offload, together.max_memory) == (False, False, None)
    assert together.device_map == "auto"
    alone = place(1050)  # one model and the first model's kept samples
    assert (alone.one_at_a_time, alone.offload, alone.max_memory) == (True, False, None)
    offloaded = place(1049)
    assert (offloaded.one_at_a_time, offloaded.offload) == (True, True)
    assert offloaded.max_memory == {"cpu": "0MiB"}  # 999 bytes: every layer goes to disk
    assert offloaded.describe() == "one at a time, with disk offload"


def test_a_budget_below_one_layer_is_refused_with_the_size_it_needs() -> None:
    assert place(250).offload  # room for two of the largest tensors beside the kept samples
    with pytest.raises(HfMergeError, match="cannot hold the probe of even one model") as caught:
        place(249)
    assert "--max-memory" in str(caught.value.fix)
    assert "GB or more" in str(caught.value.fix)


def test_a_budget_plans_the_map_itself() -> None:
    for strategy in (None, "auto", "sequential"):
        check_budget_map(strategy)
    fixed_maps: list[DeviceMap] = ["cpu", {"": "cpu"}]
    for fixed in fixed_maps:
        with pytest.raises(OptionError, match="--device-map"):
            check_budget_map(fixed)


def test_a_footprint_is_read_from_the_headers(tmp_path: Path) -> None:
    path = save_lm("llama", tmp_path / "m")
    footprint = Footprint.of(path, label="m")
    sizes = [t.numel() for t in load_file(path / "model.safetensors").values()]
    assert footprint.weights == 4 * sum(sizes)
    assert footprint.largest_tensor == 4 * max(sizes)
    assert footprint.largest_shard == (path / "model.safetensors").stat().st_size


def test_an_offloaded_plan_keeps_room_for_the_largest_tensors_in_flight() -> None:
    model = Footprint(weights=4000 * 2**20, largest_shard=2000 * 2**20, largest_tensor=250 * 2**20)
    fixed = BASE_BYTES + model.largest_shard + 100 * 2**20  # and the working bytes below
    budget = fixed + 1500 * 2**20
    placed = plan_placement(
        (model, model), budget=budget, device_map=None, working=100 * 2**20, kept=0
    )
    assert placed.offload
    assert placed.max_memory == {"cpu": "1000MiB"}  # 1500 MiB less two 250 MiB tensors
