"""hfmerge.tensors on real files: header indexing, lazy reads, streamed shards, atomic output."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from hfmerge.errors import ModelSourceError, OutputError, ShardWriteError
from hfmerge.tensors import (
    LazyCheckpoint,
    OutputTensor,
    ShardWriter,
    atomic_output_dir,
    copy_side_files,
    dtype_name,
    element_size,
    parse_size,
    plan_shards,
    read_checkpoint_index,
)
from tests.support.weights import read_weights

TINY_LLAMA: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}


def mixed_tensors() -> dict[str, torch.Tensor]:
    """One tensor per dtype, with odd sizes so that careless offsets or alignment would show."""
    gen = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
        "f16": torch.randn(7, generator=gen).to(torch.float16),
        "f32": torch.randn(4, 3, generator=gen),
        "f64": torch.randn(2, 2, generator=gen, dtype=torch.float64),
        "i64": torch.randint(-(2**40), 2**40, (5,), generator=gen),
        "i32": torch.randint(-1000, 1000, (3,), generator=gen, dtype=torch.int32),
        "i8": torch.randint(-128, 127, (9,), generator=gen, dtype=torch.int8),
        "u8": torch.randint(0, 255, (2, 3), generator=gen, dtype=torch.uint8),
        "bool": torch.rand(11, generator=gen) > 0.5,
        "f8": torch.randn(6, generator=gen).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN-safe) with equal dtype and shape."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A tiny random Llama and its sharded `save_pretrained` checkpoint (several shards + index)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    model.eval()
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory, max_shard_size="20KB")
    return model, directory


# ---- header-only indexing -------------------------------------------------------------------


def test_header_matches_safe_open_on_save_file(tmp_path: Path) -> None:
    tensors = mixed_tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    index = read_checkpoint_index(tmp_path)
    assert index.shards == ("model.safetensors",)
    assert set(index.names) == set(tensors)
    raw = (tmp_path / "model.safetensors").read_bytes()
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        for name, tensor in tensors.items():
            info = index.info(name)
            assert info.dtype == handle.get_slice(name).get_dtype() == dtype_name(tensor.dtype)
            assert list(info.shape) == handle.get_slice(name).get_shape()
            assert info.nbytes == tensor.numel() * tensor.element_size()
            stored = raw[info.offset : info.offset + info.nbytes]
            assert stored == tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    assert index.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_header_matches_safe_open_on_sharded_save_pretrained(tiny_llama: tuple[Any, Path]) -> None:
    model, directory = tiny_llama
    document = json.loads((directory / "model.safetensors.index.json").read_text())
    index = read_checkpoint_index(directory)
    assert len(index.shards) > 2
    assert set(index.shards) == set(document["weight_map"].values())
    assert set(index.names) == set(document["weight_map"]) == set(model.state_dict())
    assert index.total_bytes == document["metadata"]["total_size"]
    for shard in index.shards:
        with safe_open(str(directory / shard), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118
                info = index.info(name)
                assert info.shard == shard == document["weight_map"][name]
                assert info.dtype == handle.get_slice(name).get_dtype()
                assert list(info.shape) == handle.get_slice(name).get_shape()


def test_index_reads_headers_only(tmp_path: Path) -> None:
    # A 1 TiB sparse file: reading its data (or mapping it into a tensor) would fail outright.
    header = {"huge": {"dtype": "F32", "shape": [2**38], "data_offsets": [0, 2**40]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    os.truncate(path, 8 + len(raw) + 2**40)
    index = read_checkpoint_index(tmp_path)
    assert index.info("huge").nbytes == 2**40
    assert index.info("huge").shape == (2**38,)


# ---- lazy reading ---------------------------------------------------------------------------


def test_lazy_reads_every_dtype_exactly(tmp_path: Path) -> None:
    tensors = mixed_tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with LazyCheckpoint(tmp_path) as checkpoint:
        assert set(checkpoint.names) == set(tensors)
        for name, tensor in tensors.items():
            assert same_bits(checkpoint.get(name), tensor), name
            assert checkpoint.info(name).dtype == dtype_name(tensor.dtype)


def test_lazy_reads_sharded_checkpoint_with_few_open_files(tiny_llama: tuple[Any, Path]) -> None:
    model, directory = tiny_llama
    state = model.state_dict()
    with LazyCheckpoint(directory, max_open=2) as checkpoint:
        for name in reversed(checkpoint.names):  # backwards, to cycle through every shard
            assert same_bits(checkpoint.get(name), state[name]), name
            assert len(checkpoint._fds) <= 2
    assert len(checkpoint._fds) == 0
    with pytest.raises(KeyError, match="is not in checkpoint"):
        checkpoint.info("not.in.checkpoint")


# ---- refusing bad sources -------------------------------------------------------------------


def trapped_pickle(marker: Path) -> bytes:
    """A pickle whose loading creates `marker`: proof that someone unpickled it."""

    class Trap:
        def __reduce__(self) -> tuple[Any, tuple[str, str]]:
            return (open, (str(marker), "w"))

    return pickle.dumps(Trap())


def test_pickle_only_directory_is_refused_without_unpickling(tmp_path: Path) -> None:
    control = tmp_path / "control"
    pickle.loads(trapped_pickle(control)).close()  # the trap works: this must never happen below
    assert control.exists()
    marker = tmp_path / "unpickled"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "pytorch_model.bin").write_bytes(trapped_pickle(marker))
    (model_dir / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError) as caught:
        read_checkpoint_index(model_dir)
    message = caught.value.message()
    assert "pickle" in message
    assert "pytorch_model.bin" in message
    assert "safe_serialization=True" in message
    with pytest.raises(ModelSourceError):
        LazyCheckpoint(model_dir)
    assert not marker.exists()


def framed(header: object, data: bytes = b"") -> bytes:
    """A safetensors-like file: 8-byte length, then `header` (JSON unless bytes), then `data`."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def sharded(shard_tensors: dict[str, list[str]], weight_map: dict[str, str]) -> dict[str, bytes]:
    """Files of a sharded checkpoint whose index says `weight_map`."""
    files = {f: save({n: torch.zeros(2) for n in names}) for f, names in shard_tensors.items()}
    files["model.safetensors.index.json"] = json.dumps({"weight_map": weight_map}).encode()
    return files


def f32x4(end: int) -> bytes:
    """A file whose header promises 4 float32 (16 bytes) at [0, end) and that has 8 data bytes."""
    return framed({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, end]}}, bytes(8))


SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
BAD_SOURCES: list[tuple[dict[str, bytes], str]] = [
    ({"config.json": b"{}"}, "no model weights"),
    ({"weights.safetensors": save({"a": torch.zeros(1)})}, "neither model.safetensors"),
    ({"model.safetensors": b"\x00\x01garbage"}, "not a valid safetensors"),
    ({"model.safetensors": struct.pack("<Q", 2**60) + b"{}"}, "header length"),
    ({"model.safetensors": framed(b"{not json")}, "not valid JSON"),
    ({"model.safetensors": f32x4(16)}, "ends 8 bytes early"),
    ({"model.safetensors": f32x4(8)}, "does not match dtype and shape"),
    ({"model.safetensors": framed({"w": {"dtype": "F32"}})}, "invalid shape"),
    (sharded({SHARD1: ["a"]}, {"a": SHARD1, "b": SHARD2}), f"{SHARD2}, which is missing"),
    (sharded({SHARD1: ["a"], SHARD2: ["b"]}, {"a": SHARD1, "b": SHARD1}), "lacks it"),
    (sharded({SHARD1: ["a"], SHARD2: ["a", "b"]}, {"a": SHARD1, "b": SHARD2}), "in both"),
    (sharded({SHARD1: ["a"]}, {"a": "../" + SHARD1}), "no valid weight_map"),
]


@pytest.mark.parametrize(("files", "expected"), BAD_SOURCES)
def test_bad_sources_give_clear_errors(
    tmp_path: Path, files: dict[str, bytes], expected: str
) -> None:
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    with pytest.raises(ModelSourceError, match=expected) as caught:
        read_checkpoint_index(tmp_path)
    assert caught.value.fix


def test_missing_or_non_directory_source(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="does not exist"):
        read_checkpoint_index(tmp_path / "nope", label="org/nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelSourceError, match=r"Model org/file: .* is not a directory"):
        read_checkpoint_index(tmp_path / "file", label="org/file")


# ---- planning and writing -------------------------------------------------------------------


def outputs_of(tensors: dict[str, torch.Tensor]) -> list[OutputTensor]:
    return [OutputTensor(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()]


def write_shuffled(out: Path, tensors: dict[str, torch.Tensor], cap: int, seed: int = 0) -> Any:
    plan = plan_shards(outputs_of(tensors), max_shard_bytes=cap)
    order = list(tensors)
    random.Random(seed).shuffle(order)
    with ShardWriter(out, plan, metadata={"merged_by": "test"}) as writer:
        for name in order:
            writer.write(name, tensors[name])
    return plan


def test_writer_round_trip_in_shuffled_order(tmp_path: Path) -> None:
    tensors = mixed_tensors()
    plan = write_shuffled(tmp_path, tensors, cap=40)
    assert len(plan.shards) > 2
    back = read_weights(tmp_path)
    assert set(back) == set(tensors)
    assert all(same_bits(back[name], tensor) for name, tensor in tensors.items())
    document = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    expected_map = {t.name: s.filename for s in plan.shards for t in s.tensors}
    assert document["weight_map"] == expected_map
    assert document["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    for shard in plan.shards:
        path = tmp_path / shard.filename
        (length,) = struct.unpack("<Q", path.read_bytes()[:8])
        assert length % 8 == 0
        assert path.stat().st_size == 8 + length + shard.nbytes  # no gaps, nothing trailing
        with safe_open(str(path), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt", "merged_by": "test"}
    assert read_checkpoint_index(tmp_path).total_bytes == plan.total_bytes


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is Linux-only")
def test_large_writes_start_their_writeback_and_keep_their_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append((offset, length, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    tensors = {"big": torch.randn(512, 1024), "small": torch.randn(8)}  # 2 MiB and 32 bytes
    plan = write_shuffled(tmp_path, tensors, cap=parse_size("1GB"))
    _, big = plan.locate("big")
    header_length = 8 + struct.unpack("<Q", (tmp_path / "model.safetensors").read_bytes()[:8])[0]
    # Only the large write queues its writeback, on exactly its own byte range.
    assert calls == [(header_length + big.begin, big.end - big.begin, os.POSIX_FADV_DONTNEED)]
    back = read_weights(tmp_path)
    assert all(same_bits(back[name], tensor) for name, tensor in tensors.items())


def test_single_shard_is_model_safetensors_without_index(tmp_path: Path) -> None:
    tensors = mixed_tensors()
    plan = write_shuffled(tmp_path, tensors, cap=parse_size("2GB"))
    assert plan.filenames == ("model.safetensors",)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    back = read_weights(tmp_path)
    assert all(same_bits(back[name], tensor) for name, tensor in tensors.items())


def test_tensor_larger_than_cap_gets_its_own_shard(tmp_path: Path) -> None:
    tensors = {
        "a": torch.ones(2),
        "b": torch.ones(2),
        "big": torch.arange(100, dtype=torch.float32),
        "c": torch.ones(2),
    }
    plan = write_shuffled(tmp_path, tensors, cap=20)
    assert [s.names for s in plan.shards] == [("a", "b"), ("big",), ("c",)]
    assert plan.filenames[1] == "model-00002-of-00003.safetensors"
    assert same_bits(read_weights(tmp_path)["big"], tensors["big"])
    first_big = plan_shards(
        outputs_of({"big": tensors["big"], "a": tensors["a"]}), max_shard_bytes=20
    )
    assert [s.names for s in first_big.shards] == [("big",), ("a",)]


def test_plan_aligns_every_tensor_to_its_element_size() -> None:
    specs = [OutputTensor("odd_bf16", "BF16", (3,)), OutputTensor("f32", "F32", (2,))]
    specs += [OutputTensor("flag", "BOOL", (1,)), OutputTensor("i64", "I64", (1,))]
    (shard,) = plan_shards(specs, max_shard_bytes=10**6).shards
    assert [t.name for t in shard.tensors] == ["i64", "f32", "odd_bf16", "flag"]
    assert all(t.begin % element_size(t.dtype) == 0 for t in shard.tensors)


def test_written_model_loads_in_transformers_with_same_logits(
    tiny_llama: tuple[Any, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    model, source = tiny_llama
    state = model.state_dict()
    final = tmp_path / "out"
    with atomic_output_dir(final, force=False) as out:
        write_shuffled(out, state, cap=30_000)
        assert "config.json" in copy_side_files(source, out)
    assert (final / "model.safetensors.index.json").exists()
    result: Any = AutoModelForCausalLM.from_pretrained(final, output_loading_info=True)
    loaded, info = result
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    ids = torch.randint(
        0, TINY_LLAMA["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    ("name", "tensor", "expected"),
    [
        ("unknown", torch.zeros(2, 3), "not in the shard plan"),
        ("w", torch.zeros(3, 2), "shape"),
        ("w", torch.zeros(2, 3, dtype=torch.float16), "dtype F16, planned F32"),
        ("w", torch.zeros(2, 3, dtype=torch.complex128), "no safetensors equivalent"),
    ],
)
def test_writer_refuses_tensors_off_the_plan(
    tmp_path: Path, name: str, tensor: torch.Tensor, expected: str
) -> None:
    plan = plan_shards([OutputTensor("w", "F32", (2, 3))], max_shard_bytes=100)
    writer = ShardWriter(tmp_path, plan)
    with pytest.raises(ShardWriteError, match=expected):
        writer.write(name, tensor)
    writer.abort()


def _write_a_twice(writer: ShardWriter) -> None:
    """Write `a`, see the second write of `a` refused, and close the writer without `b`."""
    with writer:
        writer.write("a", torch.zeros(2))
        with pytest.raises(ShardWriteError, match="already written"):
            writer.write("a", torch.zeros(2))


def test_writer_refuses_duplicates_and_missing_tensors(tmp_path: Path) -> None:
    specs = [OutputTensor("a", "F32", (2,)), OutputTensor("b", "F32", (2,))]
    plan = plan_shards(specs, max_shard_bytes=100)
    missing = "1 planned tensors were never written: 'b'"
    with pytest.raises(ShardWriteError, match=missing):
        _write_a_twice(ShardWriter(tmp_path, plan))
    # An error in the body wins over the incompleteness check (the output is discarded anyway).
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(tmp_path / "again", plan):
        raise RuntimeError("boom")


def test_writer_counts_what_another_process_wrote(tmp_path: Path) -> None:
    """A forked share's names complete the plan; a name off the plan is refused."""
    specs = [OutputTensor("a", "F32", (2,)), OutputTensor("b", "F32", (2,))]
    plan = plan_shards(specs, max_shard_bytes=100)
    with ShardWriter(tmp_path, plan) as writer:
        writer.write("a", torch.zeros(2))
        with pytest.raises(ShardWriteError, match="'c' is not in the shard plan"):
            writer.record_written(["b", "c"])
        assert writer.written == {"a"}  # nothing counted from a refused list
        writer.record_written(iter(["b"]))
    assert writer.written == {"a", "b"}


def test_writer_fails_fast_on_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_shards([OutputTensor("a", "F32", (1000,))], max_shard_bytes=10**6)
    usage = shutil.disk_usage(tmp_path)._replace(free=3000)  # 4000 bytes needed
    monkeypatch.setattr("hfmerge.tensors.writer.shutil.disk_usage", lambda _: usage)
    with pytest.raises(OutputError, match="GB are free"), ShardWriter(tmp_path / "out", plan):
        pass
    assert list((tmp_path / "out").iterdir()) == []
    monkeypatch.undo()
    (tmp_path / "out" / "model.safetensors").write_text("left over")
    with pytest.raises(OutputError, match="File exists"), ShardWriter(tmp_path / "out", plan):
        pass


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("2GB", 2 * 10**9),
        ("500MB", 500 * 10**6),
        ("1.5GiB", 3 * 2**29),
        ("10 kb", 10_000),
        ("4KiB", 4096),
        ("1024", 1024),
        (123, 123),
    ],
)
def test_parse_size(size: int | str, expected: int) -> None:
    assert parse_size(size) == expected


@pytest.mark.parametrize("junk", ["", "GB", "2XB", "-1GB", "1e9", "0", 0, True, "2 GB GB"])
def test_parse_size_rejects_junk(junk: Any) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(junk)


def test_lazy_reads_own_their_memory_and_report_truncation(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with LazyCheckpoint(tmp_path) as checkpoint:
        first = checkpoint.get("a")
        first.add_(1)  # a private buffer: editing it touches neither the file nor a second read
        assert torch.equal(checkpoint.get("a"), tensors["a"])
    with LazyCheckpoint(tmp_path) as checkpoint:
        with open(tmp_path / "model.safetensors", "r+b") as file:  # cut short after indexing
            file.truncate(file.seek(0, os.SEEK_END) - 8)
        with pytest.raises(ModelSourceError, match="ends 8 bytes early"):
            checkpoint.get("b")


def test_a_cut_file_reads_the_same_at_its_header_as_at_its_data(tmp_path: Path) -> None:
    """A file cut mid-merge may meet a header re-read or a data read first; both say so alike."""
    save_file({"a": torch.ones(4), "b": torch.ones(5)}, str(tmp_path / "model.safetensors"))
    with open(tmp_path / "model.safetensors", "r+b") as file:
        file.truncate(file.seek(0, os.SEEK_END) - 8)
    with pytest.raises(ModelSourceError, match="ends 8 bytes early") as caught:
        read_checkpoint_index(tmp_path)
    assert "model.safetensors" in str(caught.value)
