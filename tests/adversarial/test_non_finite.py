"""NaN and Inf weights never flow silently into a merged model.

A non-finite value in an input tensor (merged, or copied from the base), or one a method produces
from finite inputs, stops the run with `NonFiniteWeightsError` naming the model, the tensor and the
counts over the whole tensor, before the output is renamed into place: no output and no staging
folder are left. `--allow-non-finite` merges anyway and lists what it found on stderr. Integer
tensors (BERT's position ids) cannot hold NaN or Inf: they are copied unchecked.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from hfmerge import api
from hfmerge.cli.app import main
from hfmerge.engine import stream
from hfmerge.engine.finite import NonFiniteCount, check_chunk, quick_sum, sums_finite
from hfmerge.engine.plan import MergePlan
from hfmerge.engine.procs import ForkedShare, split_jobs
from hfmerge.engine.tuning import DEFAULT_TUNING, EngineTuning
from hfmerge.errors import NonFiniteWeightsError
from hfmerge.methods import registry
from hfmerge.methods.chunks import elementwise
from hfmerge.methods.linear import LINEAR, linear_merge
from hfmerge.methods.params import MethodParams, ModelParams
from hfmerge.pipeline.options import RunOptions
from tests.support.engine import make_models
from tests.support.staging import staging_leftovers

# Chunks of 8 rows of 64, pieces of 64 elements, parts of 128: a tensor spans many of each.
SMALL_CHUNKS = dataclasses.replace(
    DEFAULT_TUNING,
    target_chunk_elements=512,
    elementwise_chunk_elements=512,
    piece_elements=64,
    part_elements=128,
)
TENSOR = "model.layers.0.mlp.up_proj.weight"  # [96, 64], merged
BUFFER = "model.rotary_emb.inv_freq"  # [8], a float buffer: copied from the base, never merged
VALUES = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}


def expected(kind: str, count: int) -> tuple[int, int, int]:
    """(NaN, +Inf, -Inf) for `count` values of `kind`."""
    nan, posinf, neginf = (count if kind == k else 0 for k in VALUES)
    return nan, posinf, neginf


def counts(error: NonFiniteWeightsError) -> tuple[int, int, int]:
    return error.nan, error.posinf, error.neginf


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_models(tmp_path_factory.mktemp("non_finite"))


@pytest.fixture
def models(clean: list[Path], tmp_path: Path) -> list[Path]:
    """Fresh copies of the base (0) and its two fine-tunes (1, 2), to poison."""
    return [Path(shutil.copytree(m, tmp_path / "models" / m.name)) for m in clean]


@pytest.fixture
def forks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Element-wise merges run in `tuning.max_processes` processes whatever the core count; the
    list gets one entry per child forked."""

    def processes(*, elementwise: bool, device: torch.device, tuning: EngineTuning) -> int:
        return tuning.max_processes if elementwise else 1

    monkeypatch.setattr(stream, "process_count", processes)
    forked: list[int] = []
    enter = ForkedShare.__enter__

    def spy(self: ForkedShare[Any]) -> ForkedShare[Any]:
        forked.append(1)
        return enter(self)

    monkeypatch.setattr(ForkedShare, "__enter__", spy)
    return forked


def edit(model: Path, change: dict[str, Any]) -> None:
    """Rewrite `model`'s weights with `change[name](tensor)` applied (a new tensor name adds it)."""
    path = model / "model.safetensors"
    tensors = load_file(path)
    for name, fn in change.items():
        tensors[name] = fn(tensors.get(name))
    save_file(tensors, path, metadata={"format": "pt"})


def spread(rows: int, cols: int, count: int) -> list[tuple[int, int]]:
    """`count` positions from the first row to the last: in different chunks."""
    return [(i * (rows - 1) // max(1, count - 1), (7 * i) % cols) for i in range(count)]


def poison(model: Path, tensor: str, value: float, count: int = 3) -> list[tuple[int, int]]:
    """Set `count` values of `tensor` to `value`; their positions."""
    where: list[tuple[int, int]] = []

    def change(t: torch.Tensor) -> torch.Tensor:
        where.extend(spread(t.shape[0], t.shape[1], count))
        for row, col in where:
            t[row, col] = value
        return t

    edit(model, {tensor: change})
    return where


def to_bf16(models: Sequence[Path]) -> None:
    for model in models:
        edit(
            model, {name: lambda t: t.bfloat16() for name in load_file(model / "model.safetensors")}
        )


def recipe(
    folder: Path, models: Sequence[Path], method: str, *, dtype: str = "bfloat16", out: str = "out"
) -> Path:
    base, *others = models
    fields = "weight: 0.5, density: 0.5" if method == "ties" else "weight: 0.5"
    lines = ["models:", *(f"  - {{model: {m}, {fields}}}" for m in others)]
    lines += [f"base: {base}", f"merge: {{method: {method}}}"]
    lines += [f"output: {{path: {folder / out}, dtype: {dtype}}}", ""]
    path = folder / "r.yaml"
    path.write_text("\n".join(lines))
    return path


def run(path: Path, **options: Any) -> None:
    api.run(path, RunOptions(progress=False, **options))


def merged(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted((path.parent / "out").glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_nothing_written(folder: Path) -> None:
    assert not (folder / "out").exists()
    assert staging_leftovers(folder) == []  # the staging folder is gone too


def dry_run(path: Path) -> MergePlan:
    plan = api.run(path, RunOptions(progress=False, dry_run=True)).plan
    assert isinstance(plan, MergePlan)
    return plan


def tensor_in_share(path: Path, share: int) -> str:
    """A [96, 64] merged tensor that two processes deal to `share` (1: the child's)."""
    jobs = split_jobs(dry_run(path).jobs, 2)[share]
    return next(j.name for j in jobs if j.action == "merge" and j.shape == (96, 64))


CASES = [
    ("linear", 1, "float32"),
    ("linear", 1, "bfloat16"),  # converted in pieces through one shared buffer
    ("ties", 1, "float32"),  # a statistics pass first: each chunk is read twice, counted once
    ("ties", 1, "bfloat16"),
]


@pytest.mark.parametrize("kind", list(VALUES))
@pytest.mark.parametrize(("method", "processes", "storage"), CASES)
def test_a_non_finite_input_is_an_error_naming_model_tensor_and_count(
    models: list[Path],
    tmp_path: Path,
    forks: list[int],
    kind: str,
    method: str,
    processes: int,
    storage: str,
) -> None:
    if storage == "bfloat16":
        to_bf16(models)
    poison(models[1], TENSOR, VALUES[kind])
    path = recipe(tmp_path, models, method)
    tuning = dataclasses.replace(SMALL_CHUNKS, max_processes=processes)
    with pytest.raises(NonFiniteWeightsError) as info:
        run(path, tuning=tuning)
    error = info.value
    assert (error.model, error.tensor) == (str(models[1]), TENSOR)
    assert counts(error) == expected(kind, 3)  # three chunks: the whole tensor's count
    assert "counted over the whole tensor" in error.message()
    assert "--allow-non-finite" in error.fix
    assert_nothing_written(tmp_path)
    assert not forks


@pytest.mark.parametrize("kind", list(VALUES))
@pytest.mark.parametrize("share", [0, 1], ids=["parent", "child"])
def test_two_merging_processes_raise_the_same_error(
    models: list[Path], tmp_path: Path, forks: list[int], kind: str, share: int
) -> None:
    path = recipe(tmp_path, models, "linear")
    tensor = tensor_in_share(path, share)
    poison(models[2], tensor, VALUES[kind], count=4)
    with pytest.raises(NonFiniteWeightsError) as info:
        run(path, tuning=dataclasses.replace(SMALL_CHUNKS, max_processes=2))
    error = info.value  # from the child: pickled by its fields, rebuilt as itself
    assert (error.model, error.tensor, counts(error)) == (str(models[2]), tensor, expected(kind, 4))
    assert "Fix: check the model's weights" in error.message()
    assert forks == [1]
    assert_nothing_written(tmp_path)


def test_a_non_finite_base_tensor_is_named_for_a_method_that_reads_the_base(
    models: list[Path], tmp_path: Path
) -> None:
    poison(models[0], TENSOR, math.nan, count=2)
    with pytest.raises(NonFiniteWeightsError) as info:
        run(recipe(tmp_path, models, "task_arithmetic"), tuning=SMALL_CHUNKS)
    assert (info.value.model, info.value.tensor) == (str(models[0]), TENSOR)
    assert counts(info.value) == (2, 0, 0)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("kind", list(VALUES))
def test_the_cli_exits_1_with_the_error_and_writes_nothing(
    models: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    poison(models[1], TENSOR, VALUES[kind])
    assert main(["run", str(recipe(tmp_path, models, "linear"))]) == 1
    err = capsys.readouterr().err
    assert f"Model {models[1]}: tensor {TENSOR} holds 3 non-finite values" in err
    nan, posinf, neginf = expected(kind, 3)
    assert f"({nan} NaN, {posinf} +Inf, {neginf} -Inf, counted over the whole tensor)" in err
    assert "--allow-non-finite" in err
    assert_nothing_written(tmp_path)


def add_buffer(models: Sequence[Path], value: float | None = None) -> None:
    """Give every model the float buffer `BUFFER`; the base's first element is `value`."""
    for i, model in enumerate(models):
        buffer = torch.arange(1.0, 9.0)
        if i == 0 and value is not None:
            buffer[0] = value
        edit(model, {BUFFER: lambda _, b=buffer: b})


def test_a_non_finite_float_buffer_copied_from_the_base_is_an_error(
    models: list[Path], tmp_path: Path
) -> None:
    """Copied unchanged, it would reach the output as it is: the base is named."""
    add_buffer(models, math.inf)
    path = recipe(tmp_path, models, "linear")
    assert {j.name: j.action for j in dry_run(path).jobs}[BUFFER] == "copy"
    with pytest.raises(NonFiniteWeightsError) as info:
        run(path)
    assert (info.value.model, info.value.tensor, counts(info.value)) == (
        str(models[0]),
        BUFFER,
        (0, 1, 0),
    )
    assert_nothing_written(tmp_path)


def test_with_allow_non_finite_the_run_succeeds_and_warns(
    models: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    where = poison(models[1], TENSOR, math.nan)
    add_buffer(models, -math.inf)
    path = recipe(tmp_path, models, "linear")
    assert main(["run", str(path), "--allow-non-finite"]) == 0
    err = capsys.readouterr().err
    assert "warning: non-finite weights in 2 tensors" in err
    assert f"{models[1]}, tensor {TENSOR}: 3 NaN, 0 +Inf, 0 -Inf" in err
    assert f"the merged output, tensor {TENSOR}: 3 NaN, 0 +Inf, 0 -Inf" in err
    assert f"{models[0]}, tensor {BUFFER}: 0 NaN, 0 +Inf, 1 -Inf" in err
    out = merged(path)
    assert [tuple(p) for p in out[TENSOR].isnan().nonzero().tolist()] == where
    assert out[BUFFER][0] == -math.inf  # copied as it is
    assert out["model.layers.1.mlp.up_proj.weight"].isfinite().all()


def zero_over_zero(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None,
    model_params: Sequence[ModelParams],
    params: MethodParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The linear merge plus 0 * d / d for the inputs' difference d: 0/0 = NaN where they agree."""
    merged = linear_merge(
        tensors, base=base, model_params=model_params, params=params, generator=generator
    )
    difference = tensors[0] - tensors[1]
    return merged + 0 * difference / difference


@pytest.mark.parametrize(
    ("chunked", "processes"),
    [(True, 1), (True, 2), (False, 1)],
    ids=["elementwise", "elementwise-2-processes", "whole-tensor"],
)
def test_a_method_that_makes_nan_from_finite_inputs_is_caught(
    models: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    forks: list[int],
    chunked: bool,
    processes: int,
) -> None:
    method = dataclasses.replace(
        LINEAR, fn=zero_over_zero, stream=elementwise(zero_over_zero) if chunked else None
    )
    monkeypatch.setitem(registry.METHODS, "linear", method)
    path = recipe(tmp_path, models, "linear")
    tensor = tensor_in_share(path, 1) if processes == 2 else TENSOR
    same = spread(96, 64, 5)  # the fine-tunes agree there, every input value finite

    def agree(t: torch.Tensor) -> torch.Tensor:
        other = load_file(models[1] / "model.safetensors")[tensor]
        for row, col in same:
            t[row, col] = other[row, col]
        return t

    edit(models[2], {tensor: agree})
    with pytest.raises(NonFiniteWeightsError) as info:
        run(path, tuning=dataclasses.replace(SMALL_CHUNKS, max_processes=processes))
    error = info.value
    assert (error.model, error.tensor, counts(error)) == (None, tensor, (5, 0, 0))
    assert error.message().startswith(
        f"The linear merge produced 5 non-finite values (5 NaN, 0 +Inf, 0 -Inf, counted over "
        f"the whole tensor) in tensor {tensor} from finite inputs"
    )
    assert len(forks) == (processes - 1)
    assert_nothing_written(tmp_path)


def test_a_merge_that_overflows_float16_is_caught(models: list[Path], tmp_path: Path) -> None:
    """A real case: finite float32 inputs whose average passes float16's 65504 become +Inf when
    the output is cast."""
    for model in models[1:]:
        edit(model, {TENSOR: lambda t: t.index_fill_(0, torch.tensor([10, 70]), 1e5)})
    with pytest.raises(NonFiniteWeightsError) as info:
        run(recipe(tmp_path, models, "linear", dtype="float16"), tuning=SMALL_CHUNKS)
    assert (info.value.model, info.value.tensor, counts(info.value)) == (None, TENSOR, (0, 128, 0))
    assert_nothing_written(tmp_path)


def test_large_finite_values_whose_sums_overflow_are_merged(
    models: list[Path], tmp_path: Path
) -> None:
    """The quick check sums values: a sum that overflows to Inf is counted and found clean."""
    rows = torch.tensor([3, 50])
    for model in models[1:]:
        edit(model, {TENSOR: lambda t: t.index_fill_(0, rows, 3e38)})
    assert not sums_finite([quick_sum(torch.full((2,), 3e38))])  # the sum does overflow
    path = recipe(tmp_path, models, "linear", dtype="float32")
    run(path, tuning=SMALL_CHUNKS)
    out = merged(path)[TENSOR]
    assert out.isfinite().all()
    assert torch.equal(out[rows], torch.full((2, 64), 3e38))


def test_counts_tell_nan_from_each_infinity() -> None:
    values = torch.tensor([1.0, math.nan, math.inf, -math.inf, -math.inf, 0.0])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert check_chunk(values.to(dtype)) == NonFiniteCount(nan=1, posinf=1, neginf=2)
    assert check_chunk(torch.arange(6)) == NonFiniteCount()  # integers hold no NaN or Inf
    # float16 sums in float32: 70,000 ones pass float16's 65504, yet no count is needed
    assert sums_finite([quick_sum(torch.full((70_000,), 1.0, dtype=torch.float16))])


def hiding(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor | None,
    model_params: Sequence[ModelParams],
    params: MethodParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The linear merge with NaN and Inf replaced by 0: the output hides a non-finite input."""
    merged = linear_merge(
        tensors, base=base, model_params=model_params, params=params, generator=generator
    )
    return merged.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
@pytest.mark.parametrize("chunked", [True, False], ids=["elementwise", "whole-tensor"])
def test_inputs_are_checked_even_when_the_output_hides_their_nan(
    models: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    chunked: bool,
    storage: str,
) -> None:
    method = dataclasses.replace(LINEAR, fn=hiding, stream=elementwise(hiding) if chunked else None)
    monkeypatch.setitem(registry.METHODS, "linear", method)
    if storage == "bfloat16":
        to_bf16(models)
    poison(models[2], TENSOR, math.nan, count=2)
    path = recipe(tmp_path, models, "linear")
    with pytest.raises(NonFiniteWeightsError) as info:
        run(path, tuning=dataclasses.replace(SMALL_CHUNKS, max_processes=1))
    assert (info.value.model, info.value.tensor, counts(info.value)) == (
        str(models[2]),
        TENSOR,
        (2, 0, 0),
    )
    assert_nothing_written(tmp_path)


def test_with_two_inputs_not_finite_the_first_is_named_and_the_other_listed(
    models: list[Path], tmp_path: Path
) -> None:
    poison(models[1], TENSOR, math.inf, count=2)
    poison(models[2], TENSOR, math.nan, count=5)
    with pytest.raises(NonFiniteWeightsError) as info:
        run(recipe(tmp_path, models, "ties"), tuning=SMALL_CHUNKS)
    error = info.value
    assert (error.model, counts(error), error.others) == (
        str(models[1]),
        (0, 2, 0),
        [str(models[2])],
    )
    assert f"whole tensor); so does that tensor in {models[2]}; nothing was" in error.message()
