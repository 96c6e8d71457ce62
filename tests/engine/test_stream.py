"""The engine end to end: chunking, read-ahead and write-behind do not change outputs; the memory
budget sizes chunks and refuses what cannot fit; errors stop both threads and close every file."""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from hfmerge.engine import budget as engine_budget
from hfmerge.engine import compute as engine_compute
from hfmerge.engine import stream as engine
from hfmerge.engine.budget import ChunkPolicy, parse_memory_budget
from hfmerge.engine.io_threads import Prefetcher, WriteBehind
from hfmerge.engine.plan import TensorJob
from hfmerge.engine.tuning import DEFAULT_TUNING, EngineTuning
from hfmerge.errors import HfMergeError, MethodParameterError, OptionError
from hfmerge.methods.chunks import Chunk
from hfmerge.pipeline.options import RunOptions
from hfmerge.pipeline.run import run_recipe
from hfmerge.recipe.schema import parse_recipe
from hfmerge.tensors import LazyCheckpoint
from tests.support import engine as engine_support
from tests.support.engine import make_models, merge
from tests.support.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_models(tmp_path_factory.mktemp("engine"))


@pytest.mark.parametrize(
    "method",
    ["linear", "ties", "breadcrumbs", "dare_ties", "della", "model_stock", "nearswap", "nuslerp"],
)
def test_many_small_chunks_give_the_same_output(
    models: list[Path], tmp_path: Path, method: str
) -> None:
    whole = merge(models, tmp_path / "whole", method)
    small_chunks = dataclasses.replace(
        DEFAULT_TUNING,
        target_chunk_elements=100,  # rows of 1-3 per chunk
        elementwise_chunk_elements=100,
        read_ahead=1,
    )
    small = merge(models, tmp_path / "small", method, tuning=small_chunks)
    assert whole.keys() == small.keys()
    for name, tensor in whole.items():
        assert torch.equal(tensor, small[name]), name


def test_nuslerp_by_columns_merges_whole_tensors_whatever_the_chunk_size(
    models: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hfmerge.methods import get_method, validate_params

    layout = {"nuslerp_flatten": False, "nuslerp_row_wise": True}  # an angle per column
    monkeypatch.setitem(engine_support.GLOBAL_PARAMS, "nuslerp", layout)
    small_chunks = dataclasses.replace(
        DEFAULT_TUNING, target_chunk_elements=100, elementwise_chunk_elements=100, read_ahead=1
    )
    merged = merge(models, tmp_path / "out", "nuslerp", tuning=small_chunks)
    method = get_method("nuslerp")
    params, per_model = validate_params(method, layout, [{"weight": 0.3}] * 2)
    with LazyCheckpoint(models[1]) as a, LazyCheckpoint(models[2]) as b:
        for name in a.names:
            expected = method.merge(
                [a.get(name).float(), b.get(name).float()], model_params=per_model, params=params
            ).to(torch.bfloat16)
            assert torch.equal(merged[name], expected), name


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "dare_ties", "model_stock"])
def test_row_halves_on_two_threads_give_the_same_output(
    models: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    serial = merge(
        models,
        tmp_path / "serial",
        method,
        tuning=dataclasses.replace(DEFAULT_TUNING, split_workers=0),
    )
    split_calls = []
    real_split = Chunk.split

    def spy(chunk: Any, rows: int) -> Any:
        split_calls.append(rows)
        return real_split(chunk, rows)

    def one_helper(cls: Any, device: torch.device, tuning: EngineTuning) -> Any:
        return cls(1, tuning.split_min_elements)  # as on a multi-core CPU, whatever this machine

    monkeypatch.setattr(Chunk, "split", spy)
    monkeypatch.setattr(engine_compute.RowSplitter, "for_device", classmethod(one_helper))
    every_chunk = dataclasses.replace(DEFAULT_TUNING, split_min_elements=1)  # 2+ rows split
    halves = merge(models, tmp_path / "halves", method, tuning=every_chunk)
    # Not split: DARE (one mask stream per model).
    assert bool(split_calls) == (method != "dare_ties")
    assert serial.keys() == halves.keys()
    for name, tensor in serial.items():
        assert torch.equal(tensor, halves[name]), name


@pytest.mark.parametrize("method", ["ties", "linear", "task_arithmetic", "model_stock"])
def test_engine_output_matches_the_method_on_whole_tensors(
    models: list[Path], tmp_path: Path, method: str
) -> None:
    from hfmerge.methods import get_method, validate_params

    merged = merge(models, tmp_path / "out", method)
    merge_method = get_method(method)
    per_method: dict[str, dict[str, float]] = {
        "ties": {"weight": 0.5, "density": 0.5},
        "model_stock": {},
    }
    fields = per_method.get(method, {"weight": 0.5})
    params, per_model = validate_params(merge_method, {}, [fields] * 2)
    with (
        LazyCheckpoint(models[0]) as base,
        LazyCheckpoint(models[1]) as a,
        LazyCheckpoint(models[2]) as b,
    ):
        for name in base.names:
            expected = merge_method.merge(
                [a.get(name).float(), b.get(name).float()],
                base=base.get(name).float(),
                model_params=per_model,
                params=params,
            ).to(torch.bfloat16)
            assert torch.equal(merged[name], expected), name


@pytest.mark.slow
@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_elementwise_merges_run_in_pieces_with_the_same_output(
    models: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """Element-wise merges get their chunks in the storage dtype and merge them a few elements
    at a time: one element per piece gives the output of one piece per chunk, bit for bit."""
    one_piece = dataclasses.replace(DEFAULT_TUNING, piece_elements=1 << 30)
    whole = merge(models, tmp_path / "whole", method, tuning=one_piece)
    pieces: list[int] = []
    real = Chunk

    def spy(tensors: list[torch.Tensor], base: torch.Tensor | None, first: int, whole: bool) -> Any:
        assert all(t.dtype == torch.float32 for t in [*tensors, *([] if base is None else [base])])
        pieces.append(tensors[0].numel())
        return real(tensors, base, first, whole)

    monkeypatch.setattr(engine_compute, "Chunk", spy)
    one_element = dataclasses.replace(DEFAULT_TUNING, piece_elements=1)
    small = merge(models, tmp_path / "small", method, tuning=one_element)
    assert pieces
    assert set(pieces) == {1}
    assert whole.keys() == small.keys()
    for name, tensor in whole.items():
        assert torch.equal(tensor, small[name]), name


@pytest.mark.parametrize("shape", [(), (0, 5), (3, 0), (5,), (70, 3)])
def test_elementwise_pieces_of_any_shape_equal_the_method(shape: tuple[int, ...]) -> None:
    """Pieces of 4 elements, output parts of 12 (three pieces), a short last one of each."""
    from hfmerge.methods import get_method, validate_params

    tuning = dataclasses.replace(DEFAULT_TUNING, piece_elements=4, part_elements=12)
    method = get_method("linear")
    params, per_model = validate_params(method, {}, [{"weight": 0.3}, {"weight": 0.9}])
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, generator=generator).bfloat16() for _ in range(2)]
    merge = method.tensor_merge(
        shape, model_params=per_model, params=params, generator=None, device=torch.device("cpu")
    )
    first = 1000  # the chunk's place in its tensor
    parts = list(
        engine_compute.apply_in_pieces(
            merge, Chunk(inputs, None, first, True), torch.bfloat16, tuning
        )
    )
    expected = (
        method.merge([t.float() for t in inputs], base=None, model_params=per_model, params=params)
        .bfloat16()
        .reshape(-1)
    )
    starts = [start for start, _ in parts]
    sizes = [part.numel() for _, part in parts]
    assert starts == [first + sum(sizes[:i]) for i in range(len(parts))]  # consecutive, in order
    assert all(size == 12 for size in sizes[:-1])
    assert 0 <= sizes[-1] <= 12
    assert torch.equal(torch.cat([part for _, part in parts]), expected)


@pytest.mark.parametrize("shape", [(), (5,), (70, 3)])
@pytest.mark.parametrize(
    "dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16)]
)
def test_elementwise_pieces_pass_each_non_finite_part_on_unchanged(
    shape: tuple[int, ...], dtypes: tuple[torch.dtype, torch.dtype]
) -> None:
    """Parts whose inputs or output hold NaN or Inf reach `on_non_finite` (offset in the chunk,
    the part as written) before they are yielded; clean parts do not; the output is the same."""
    from hfmerge.methods import get_method, validate_params

    tuning = dataclasses.replace(DEFAULT_TUNING, piece_elements=4, part_elements=12)
    method = get_method("linear")
    params, per_model = validate_params(method, {}, [{"weight": 0.3}, {"weight": 0.9}])
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, generator=generator).to(dtype) for dtype in dtypes]
    total = inputs[0].numel()
    bad = total - 1  # in the last part
    inputs[1].reshape(-1)[bad] = float("nan")
    merge = method.tensor_merge(
        shape, model_params=per_model, params=params, generator=None, device=torch.device("cpu")
    )
    chunk = Chunk(inputs, None, 1000, True)
    plain = list(engine_compute.apply_in_pieces(merge, chunk, torch.bfloat16, tuning))
    seen: list[tuple[int, torch.Tensor]] = []
    yielded: list[int] = []

    def on_non_finite(offset: int, part: torch.Tensor) -> None:
        assert 1000 + offset not in yielded  # before the part is yielded
        seen.append((offset, part.clone()))

    checked = []
    for first, part in engine_compute.apply_in_pieces(
        merge, chunk, torch.bfloat16, tuning, on_non_finite
    ):
        yielded.append(first)
        checked.append((first, part.clone()))
    assert [f for f, _ in checked] == [f for f, _ in plain]
    for (_, got), (_, want) in zip(checked, plain, strict=True):  # bit for bit, NaN included
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    ((offset, part),) = seen  # only the part holding the NaN
    assert offset <= bad < offset + part.numel()
    assert torch.equal(part.view(torch.int16), dict(plain)[1000 + offset].view(torch.int16))
    assert part.isnan().sum() == 1


def test_rows_per_chunk_follow_the_budget() -> None:
    policy = ChunkPolicy(chunk_elements=1000, read_bytes=1, write_bytes=1)
    job = TensorJob("w", (50, 64), "BF16", "merge", "parameter")
    assert policy.rows_per_chunk(job, whole=False) == 15  # 1000 // 64
    assert policy.rows_per_chunk(job, whole=True) == 50
    assert policy.rows_per_chunk(job, whole=False, elementwise=True) == 15
    assert policy.rows_per_chunk(TensorJob("s", (), "F32", "merge", ""), whole=False) == 1
    elementwise = dataclasses.replace(policy, elementwise=True)
    assert elementwise.rows_per_chunk(job, whole=False, elementwise=True) == 15
    with pytest.raises(AssertionError, match="one kind"):  # its chunk has no room for temporaries
        elementwise.rows_per_chunk(job, whole=False)


def test_elementwise_policies_have_larger_chunks_in_the_same_budget(
    models: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linear merges get a policy for element-wise merges: no float32 temporaries per element,
    so 4x the chunk without a budget and a larger one within it; TIES does not."""
    monkeypatch.setattr(engine_budget, "current_rss", lambda: 0)
    monkeypatch.setattr(engine, "process_count", lambda **_: 1)  # one share of the budget
    seen: list[ChunkPolicy] = []
    real = engine_budget.chunk_policy

    def spy(plan: Any, budget: int | None, **options: Any) -> ChunkPolicy:
        seen.append(real(plan, budget, **options))
        return seen[-1]

    monkeypatch.setattr(engine, "chunk_policy", spy)
    merge(models, tmp_path / "linear", "linear")
    merge(models, tmp_path / "ties", "ties")
    assert [p.elementwise for p in seen] == [True, False]
    linear, ties = seen
    assert linear.chunk_elements == 4 * ties.chunk_elements
    assert linear.chunk_elements == DEFAULT_TUNING.elementwise_chunk_elements
    budget = DEFAULT_TUNING.reserve_bytes + 200_000
    merge(models, tmp_path / "linear-budget", "linear", max_memory=budget)
    merge(models, tmp_path / "ties-budget", "ties", max_memory=budget)
    # linear: 2 inputs, bf16 out: 8 + 2 bytes held + 16 + 4 queued; no 2 * 2 + 4 temporaries
    assert seen[2].chunk_elements == 200_000 // (8 + 2 + 16 + 4)
    assert seen[3].chunk_elements < seen[2].chunk_elements


def test_budget_sets_the_chunk_size_and_refuses_too_little(
    models: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_budget, "current_rss", lambda: 0)
    seen: list[tuple[Any, ChunkPolicy]] = []
    real = engine_budget.chunk_policy

    def spy(plan: Any, budget: int | None, **options: Any) -> ChunkPolicy:
        seen.append((plan, real(plan, budget, **options)))
        return seen[-1][1]

    monkeypatch.setattr(engine, "chunk_policy", spy)
    reserve = DEFAULT_TUNING.reserve_bytes
    merge(models, tmp_path / "a", "ties", max_memory=reserve + 200_000)
    plan, policy = seen[-1]
    assert policy.chunk_elements == 200_000 // engine_budget._bytes_per_element(
        plan, DEFAULT_TUNING
    )
    assert policy.read_bytes == DEFAULT_TUNING.read_ahead * policy.chunk_elements * 3 * 4
    with pytest.raises(HfMergeError, match="below what one chunk needs") as info:
        merge(models, tmp_path / "b", "ties", max_memory=reserve + 1000)
    assert "raise --max-memory" in info.value.message()
    assert not (tmp_path / "b").exists()
    # The pipeline's tuning reaches the budget: no reserve, one chunk read ahead, none behind.
    lean = dataclasses.replace(DEFAULT_TUNING, reserve_bytes=0, read_ahead=1, write_behind=0)
    merge(models, tmp_path / "c", "ties", max_memory=200_000, tuning=lean)
    # ties, 2 inputs and the base, bf16 out: 12 + 40 + 2 bytes held, 12 queued
    assert seen[-1][1].chunk_elements == 200_000 // 66
    assert seen[-1][1].write_bytes == 0
    merge(models, tmp_path / "d", "ties", tuning=dataclasses.replace(lean, target_chunk_elements=7))
    assert seen[-1][1].chunk_elements == 7


def test_whole_tensor_methods_need_the_largest_tensor_in_budget(
    models: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A method without a chunked form (every registered one has one) merges whole tensors."""
    from hfmerge.methods import registry

    monkeypatch.setattr(engine_budget, "current_rss", lambda: 0)
    budget = DEFAULT_TUNING.reserve_bytes + 50_000
    merge(models, tmp_path / "chunked", "model_stock", max_memory=budget)
    whole_only = dataclasses.replace(registry.METHODS["model_stock"], stream=None)
    monkeypatch.setitem(registry.METHODS, "model_stock", whole_only)
    with pytest.raises(HfMergeError, match="merges whole tensors"):
        merge(models, tmp_path / "out", "model_stock", max_memory=budget)


def test_memory_budget_text_is_checked() -> None:
    assert parse_memory_budget("1GB") == 10**9
    assert parse_memory_budget(None) is None
    with pytest.raises(OptionError, match="--max-memory 'lots': is not a memory budget") as info:
        parse_memory_budget("lots")
    assert (info.value.option, info.value.value) == ("--max-memory", "lots")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def engine_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("hfmerge-")]


def test_a_read_error_stops_both_threads_and_closes_files(
    models: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = LazyCheckpoint.get_rows

    def flaky(self: LazyCheckpoint, name: str, start: int, stop: int) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 20:
            raise OSError("disk gone")
        return real(self, name, start, stop)

    before = open_fds()
    monkeypatch.setattr(LazyCheckpoint, "get_rows", flaky)
    with pytest.raises(OSError, match="disk gone"):
        merge(models, tmp_path / "out", "ties")
    assert engine_threads() == []
    assert open_fds() == before
    assert not (tmp_path / "out").exists()


def test_a_write_error_reaches_the_caller(
    models: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hfmerge.tensors import ShardWriter

    def broken(self: ShardWriter, name: str, start: int, tensor: torch.Tensor) -> None:
        raise OSError("no space left")

    before = open_fds()
    monkeypatch.setattr(ShardWriter, "write_part", broken)
    with pytest.raises(OSError, match="no space left"):
        merge(models, tmp_path / "out", "linear")
    assert engine_threads() == []
    assert open_fds() == before


def test_prefetcher_stops_a_blocked_producer() -> None:
    def produce(acquire: Any) -> Any:
        for i in range(100):
            acquire(10)
            yield i, 10

    with Prefetcher(produce, read_bytes=20) as ahead:
        first = next(iter(ahead))
        assert first == (0, 10)  # the producer is now blocked on the byte gate
    assert engine_threads() == []


def test_write_behind_writes_everything_in_order_of_arrival() -> None:
    written: list[tuple[str, int]] = []
    with WriteBehind(lambda n, s, t: written.append((n, s)), write_bytes=8) as behind:
        for i in range(50):
            behind.put("t", i, torch.zeros(2))
    assert written == [("t", i) for i in range(50)]


def test_a_method_error_in_one_tensor_names_the_tensor(tmp_path: Path) -> None:
    # multislerp has no barycentre where the weighted directions cancel: a model, its negation
    # (equal weights) and a third model of weight 0 cancel in every tensor.
    paths = []
    for name, sign in (("a", 1.0), ("minus_a", -1.0), ("b", 1.0)):
        model = make_tiny_model("llama", seed=0 if name != "b" else 1)
        for param in model.parameters():
            param.data.mul_(sign)
        model.save_pretrained(tmp_path / name, safe_serialization=True)
        paths.append(tmp_path / name)
    weights = (1.0, 1.0, 0.0)
    recipe = parse_recipe(
        {
            "models": [{"model": str(p), "weight": w} for p, w in zip(paths, weights, strict=True)],
            "merge": {"method": "multislerp"},
            "output": {"path": str(tmp_path / "out")},
        }
    )
    with pytest.raises(MethodParameterError) as caught:
        run_recipe(recipe, RunOptions(force=True, progress=False))
    assert caught.value.tensor is not None
    assert f"in tensor {caught.value.tensor}: " in str(caught.value)
    assert "opposite models whose weights cancel" in str(caught.value)
