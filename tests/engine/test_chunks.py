"""Chunked merging equals whole-tensor merging; the radix selection is exact against kthvalue."""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from hfmerge.methods import get_method, validate_params
from hfmerge.methods.chunks import Chunk
from hfmerge.methods.select import Cut, CutMask, magnitude_keys, select_cuts
from hfmerge.methods.sparsify import topk_mask


def tensors(seed: int, shape: tuple[int, ...], *, quantized: bool) -> list[torch.Tensor]:
    """A base and three fine-tunes; `quantized` makes many equal deltas (ties at the cut)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    out = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(3)]
    if quantized:
        out = [torch.round(t * 8) / 8 for t in out]
        base = torch.round(base * 8) / 8
    out[2][: shape[0] // 3] = base[: shape[0] // 3]  # a block of zero deltas: ties at zero
    return [base, *out]


def chunked(
    name: str,
    xs: list[torch.Tensor],
    base: torch.Tensor | None,
    params: Any,
    models: Any,
    rows: int,
    *,
    split: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run a method's `TensorMerge` over row chunks of `rows` rows, like the engine; `split`
    applies each chunk as two row halves at once (`apply_split` on a real thread pool)."""
    method = get_method(name)
    shape = tuple(xs[0].shape)
    merge = method.tensor_merge(
        shape, model_params=models, params=params, generator=generator, device=torch.device("cpu")
    )
    per_row = math.prod(shape[1:])

    def chunks() -> Iterator[Chunk]:
        for s in range(0, shape[0], rows):
            part = base[s : s + rows] if base is not None else None
            yield Chunk([x[s : s + rows] for x in xs], part, s * per_row, rows >= shape[0])

    for index in range(merge.passes):
        for chunk in chunks():
            merge.observe(index, chunk)
        merge.end_pass(index)
    if not split:
        return torch.cat([merge.apply(chunk) for chunk in chunks()])
    assert merge.splittable
    with ThreadPoolExecutor(1) as pool:
        return torch.cat(
            [
                torch.cat(merge.apply_split(*chunk.split(len(chunk.tensors[0]) // 2), pool.submit))
                for chunk in chunks()
            ]
        )


CASES = [
    ("linear", {}, [{"weight": 0.3}, {"weight": 0.5}, {"weight": -0.1}]),
    ("task_arithmetic", {"lambda": 0.7}, [{"weight": 0.3}] * 3),
    (
        "ties",
        {},
        [
            {"weight": 0.3, "density": 0.4},
            {"weight": 0.5, "density": 0.5},
            {"weight": 1.0, "density": 0.0},
        ],
    ),
    ("ties", {"normalize": False}, [{"weight": 1.0, "density": 0.9}] * 3),
    ("breadcrumbs", {}, [{"weight": 0.3, "density": 0.4, "gamma": 0.1}] * 3),
    ("breadcrumbs_ties", {}, [{"weight": 0.5, "density": 0.7, "gamma": 0.05}] * 3),
    ("model_stock", {"filter_wise": True}, [{}] * 3),  # a ratio per row: rows merge alone
]


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("rows", [1, 4, 37])
@pytest.mark.parametrize(("name", "params", "models"), CASES)
def test_chunked_equals_whole_bit_for_bit(
    name: str, params: dict[str, Any], models: list[dict[str, Any]], rows: int, quantized: bool
) -> None:
    method = get_method(name)
    base, *xs = tensors(rows, (37, 19), quantized=quantized)
    global_params, per_model = validate_params(method, params, models)
    used_base = base if method.needs_base else None
    whole = method.merge(xs, base=used_base, model_params=per_model, params=global_params)
    got = chunked(name, xs, used_base, global_params, per_model, rows)
    assert torch.equal(got, whole)


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("rows", [2, 5, 37])
@pytest.mark.parametrize(("name", "params", "models"), CASES)
def test_halves_in_two_threads_equal_whole_bit_for_bit(
    name: str, params: dict[str, Any], models: list[dict[str, Any]], rows: int, quantized: bool
) -> None:
    """The engine's two-thread apply: the tail half gets the tie quota the head half leaves."""
    method = get_method(name)
    base, *xs = tensors(rows, (37, 19), quantized=quantized)
    global_params, per_model = validate_params(method, params, models)
    used_base = base if method.needs_base else None
    whole = method.merge(xs, base=used_base, model_params=per_model, params=global_params)
    got = chunked(name, xs, used_base, global_params, per_model, rows, split=True)
    assert torch.equal(got, whole)


def test_cut_mask_after_hands_on_the_remaining_ties() -> None:
    keys = torch.tensor([5, 3, 5, 5, 1, 5], dtype=torch.int32)
    mask = CutMask(Cut(5, ties=3))  # keep everything above 5, then the first three 5s
    later = mask.after(keys[:3])  # the head holds two of the 5s
    assert later.ties_left == 1
    assert not later.stateless
    assert mask.ties_left == 3  # the original is untouched
    whole = CutMask(Cut(5, ties=3))(keys)
    assert torch.equal(torch.cat([mask(keys[:3]), later(keys[3:])]), whole)
    assert CutMask(Cut(5, ties=4, all_ties=True)).stateless


@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties"])
def test_rescale_differs_only_by_float32_summation(name: str) -> None:
    """With rescale the L1 sums are added per chunk in float64: within 1e-6 of the whole."""
    method = get_method(name)
    base, *xs = tensors(3, (64, 33), quantized=False)
    models = [{"weight": 0.5, "density": 0.3}] * 3
    global_params, per_model = validate_params(method, {"rescale": True}, models)
    whole = method.merge(xs, base=base, model_params=per_model, params=global_params)
    got = chunked(name, xs, base, global_params, per_model, 5)
    torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-7)


GRAM_CASES = [
    ("model_stock", (37, 19), {}, 3),
    ("model_stock", (64,), {"filter_wise": True}, 3),
    ("model_stock", (8, 3, 5), {}, 3),
    ("model_stock", (8, 3, 5), {"filter_wise": True}, 2),
    ("slerp", (37, 19), {"t": 0.3}, 1),
    ("slerp", (64,), {"t": 0.8}, 1),
    ("nuslerp", (37, 19), {}, 2),
    ("nuslerp", (64,), {}, 2),
    ("nuslerp", (8, 3, 5), {"nuslerp_flatten": False}, 2),  # an angle per last-dim slice
]


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize(("name", "shape", "params", "count"), GRAM_CASES)
def test_gram_methods_in_chunks_get_the_whole_tensors_coefficients(
    name: str, shape: tuple[int, ...], params: dict[str, Any], count: int, split: bool
) -> None:
    """Per-tensor angles come from Gram matrices summed over the chunks in float64: the merge
    equals the whole tensor's within float32 rounding (for Model Stock with a model equal to the
    base too, whose cosine with the others is 0)."""
    method = get_method(name)
    base, *xs = tensors(len(shape), shape, quantized=False)
    xs = xs[:count]
    if count > 2:
        xs[1] = base.clone()
    global_params, per_model = validate_params(method, params, [{}] * count)
    used_base = base if method.needs_base else None
    whole = method.merge(xs, base=used_base, model_params=per_model, params=global_params)
    got = chunked(name, xs, used_base, global_params, per_model, 3, split=split)
    torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-7)
    assert not torch.equal(whole, base)


@pytest.mark.parametrize("seed", range(6))
def test_radix_cut_is_kthvalue_and_masks_concatenate(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 5000, (1,), generator=g))
    values = torch.randn(n, generator=g) * 10.0 ** float(torch.randint(-8, 3, (1,), generator=g))
    if seed % 2:
        values = torch.round(values * 4) / 4  # heavy ties
    values[: n // 4] = 0
    scores = values.abs()
    keys = magnitude_keys(values)
    ks = [1, n // 2, n - 1, int(torch.randint(1, n, (1,), generator=g))]
    for k, cut in zip(ks, select_cuts(keys, ks), strict=True):
        threshold = torch.kthvalue(scores, n - k + 1).values  # the k-th largest
        assert cut.key == int(magnitude_keys(threshold.reshape(1))[0])
        assert cut.ties == k - int((scores > threshold).sum())
        mask = CutMask(cut)
        step = int(torch.randint(1, n + 1, (1,), generator=g))
        parts = torch.cat([mask(keys[i : i + step]) for i in range(0, n, step)])
        assert torch.equal(parts, topk_mask(scores.double(), k))  # the kthvalue path


def test_radix_cut_edges() -> None:
    keys = magnitude_keys(torch.tensor([0.0, -0.0, 1.0, -2.0]))
    none, everything = select_cuts(keys, [0, 4])
    assert not CutMask(none)(keys).any()
    assert CutMask(everything)(keys).all()
    assert CutMask(select_cuts(keys, [1])[0])(keys).tolist() == [False, False, False, True]
    assert CutMask(select_cuts(keys, [3])[0])(keys).tolist() == [True, False, True, True]


RANDOM_CASES = [
    (
        "dare_ties",
        [
            {"weight": 0.5, "density": 0.3},
            {"weight": 0.5, "density": 1.0},
            {"weight": 0.7, "density": 0.6},
        ],
    ),
    (
        "dare_linear",
        [
            {"weight": 0.5, "density": 0.3},
            {"weight": 0.5, "density": 0.0},
            {"weight": 0.7, "density": 0.6},
        ],
    ),
    (
        "della",
        [
            {"weight": 0.5, "density": 0.3, "epsilon": 0.1},
            {"weight": 0.5, "density": 1.0},
            {"weight": 0.7, "density": 0.6, "epsilon": 0.2},
        ],
    ),
    (
        "della_linear",
        [
            {"weight": 0.5, "density": 0.4},
            {"weight": 0.5, "density": 0.0},
            {"weight": 0.7, "density": 0.6},
        ],
    ),
]


@pytest.mark.parametrize("rows", [1, 4, 37])
@pytest.mark.parametrize(("name", "models"), RANDOM_CASES)
@pytest.mark.parametrize("rescale", [False, True])
def test_random_chunks_replay_the_whole_tensor_masks(
    name: str, models: list[dict[str, Any]], rescale: bool, rows: int
) -> None:
    """The same seed gives the same masks chunk by chunk, model by model (some draw nothing)."""
    method = get_method(name)
    base, *xs = tensors(rows, (37, 19), quantized=False)
    global_params, per_model = validate_params(method, {"rescale": rescale}, models)
    whole = method.merge(
        xs,
        base=base,
        model_params=per_model,
        params=global_params,
        generator=torch.Generator().manual_seed(11),
    )
    got = chunked(
        name, xs, base, global_params, per_model, rows, generator=torch.Generator().manual_seed(11)
    )
    if rescale:  # L1 sums in float64 per chunk: the factor's last bits may differ
        torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(got, whole)
    other = chunked(
        name, xs, base, global_params, per_model, rows, generator=torch.Generator().manual_seed(12)
    )
    assert not torch.equal(other, whole)  # negative control: another seed, other masks


def test_della_merges_a_one_dimensional_tensor_whole() -> None:
    """A 1-D tensor is one row, which DELLA's probabilities rank as a whole."""
    method = get_method("della")
    global_params, per_model = validate_params(method, {}, [{"density": 0.5}] * 2)
    one_d = method.tensor_merge(
        (64,),
        model_params=per_model,
        params=global_params,
        generator=torch.Generator(),
        device=torch.device("cpu"),
    )
    two_d = method.tensor_merge(
        (8, 8),
        model_params=per_model,
        params=global_params,
        generator=torch.Generator(),
        device=torch.device("cpu"),
    )
    assert one_d.whole_only
    assert not two_d.whole_only


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (5, 13)])
def test_masks_pack_into_bits_and_back(shape: tuple[int, ...]) -> None:
    from hfmerge.methods.random_stream import pack_mask, unpack_mask

    mask = torch.bernoulli(torch.full(shape, 0.5), generator=torch.Generator().manual_seed(1))
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8
    assert packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask(packed, mask), mask)
