"""Hostile weight files: lying dtypes, unknown dtypes, symlink loops, files that shrink, fuzz.

Each must end in an error naming the model (and the file or tensor), before any output exists,
and never in a traceback, a crash (SIGBUS) or a silently wrong output.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from hfmerge.cli.app import main
from hfmerge.errors import HfMergeError, IncompatibleModelsError, ModelSourceError
from hfmerge.tensors import parse_shard_header, read_checkpoint_index
from tests.support.engine import make_models
from tests.support.staging import staging_leftovers


def read_header(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_header(path: Path, header: dict[str, Any], data: bytes) -> None:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def edit_header(model_dir: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = model_dir / "model.safetensors"
    header, data = read_header(path)
    edit(header)
    write_header(path, header, data)


def first_weight(header: dict[str, Any]) -> str:
    return next(name for name in sorted(header) if name.endswith("proj.weight"))


def recipe(path: Path, base: Path, models: list[Path], out: Path) -> Path:
    lines = ["models:", *(f"  - {{model: {m}, weight: 0.5}}" for m in models)]
    lines += [f"base: {base}", "merge: {method: linear}", f"output: {{path: {out}}}", ""]
    path.write_text("\n".join(lines))
    return path


@pytest.mark.parametrize("integer", ["I32", "U32"])
def test_an_integer_tensor_against_a_float_one_is_refused_before_merging(
    integer: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, a, b = make_models(tmp_path)

    def lie(header: dict[str, Any]) -> None:
        name = first_weight(header)
        assert header[name]["dtype"] == "F32"  # same byte size: only the kind changes
        header[name]["dtype"] = integer

    edit_header(b, lie)
    path = recipe(tmp_path / "r.yaml", a, [a, b], tmp_path / "out")
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"F32 vs {integer}" in err
    assert "same kind of number" in err
    assert not (tmp_path / "out").exists()
    assert main(["validate", str(path)]) == 1  # validate sees it from headers too
    assert "same kind of number" in capsys.readouterr().err


def test_half_precision_against_float32_still_merges(tmp_path: Path) -> None:
    _, a, b = make_models(tmp_path)
    tensors = {name: t.to(torch.bfloat16) for name, t in _load(b).items()}
    save_file(tensors, str(b / "model.safetensors"), metadata={"format": "pt"})
    path = recipe(tmp_path / "r.yaml", a, [a, b], tmp_path / "out")
    assert main(["run", str(path)]) == 0


def _load(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.parametrize("dtype", ["Q4", "F4", "bf16", "", "F8_E8M0"])
def test_an_unknown_dtype_names_the_model_file_and_tensor(dtype: str, tmp_path: Path) -> None:
    _, a, _ = make_models(tmp_path)
    name = first_weight(read_header(a / "model.safetensors")[0])

    def unknown(header: dict[str, Any]) -> None:
        header[name]["dtype"] = dtype

    edit_header(a, unknown)
    with pytest.raises(ModelSourceError) as caught:
        read_checkpoint_index(a, label="org/a")
    message = str(caught.value)
    assert "org/a" in message
    assert "model.safetensors" in message
    if dtype:
        assert name in message
        assert repr(dtype) in message


def test_an_unknown_dtype_through_the_cli_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, a, b = make_models(tmp_path)
    edit_header(b, lambda header: header[first_weight(header)].update(dtype="Q4"))
    assert main(["validate", str(recipe(tmp_path / "r.yaml", a, [a, b], tmp_path / "o"))]) == 1
    err = capsys.readouterr().err
    assert "'Q4'" in err
    assert str(b) in err
    assert "Traceback" not in err


@pytest.mark.parametrize("link", ["loop", "dangling"])
def test_a_broken_weights_symlink_is_named_not_taken_for_no_weights(
    link: str, tmp_path: Path
) -> None:
    _, a, _ = make_models(tmp_path)
    weights = a / "model.safetensors"
    weights.unlink()
    weights.symlink_to(weights if link == "loop" else tmp_path / "gone.safetensors")
    with pytest.raises(ModelSourceError) as caught:
        read_checkpoint_index(a)
    message = str(caught.value)
    assert "cannot read model.safetensors" in message
    assert "no model weights" not in message


TRUNCATE_MID_MERGE = """
import os, sys
from pathlib import Path
from hfmerge.cli.app import main
from hfmerge.tensors.checkpoint import LazyCheckpoint

victim = Path(sys.argv[2]) / "model.safetensors"
real = LazyCheckpoint.get_rows
calls = 0

def shrinking(self, name, start, stop):
    global calls
    if Path(self.index.model_dir).resolve() == victim.parent.resolve():
        calls += 1
        if calls == 2:  # after the merge has begun reading it, another process cuts the file
            os.truncate(victim, victim.stat().st_size // 2)
    return real(self, name, start, stop)

LazyCheckpoint.get_rows = shrinking
sys.exit(main(["run", sys.argv[1]]))
"""


@pytest.mark.slow  # a second interpreter runs the merge
def test_an_input_that_shrinks_mid_merge_is_an_error_naming_it(tmp_path: Path) -> None:
    _, a, b = make_models(tmp_path)
    path = recipe(tmp_path / "r.yaml", a, [a, b], tmp_path / "out")
    done = subprocess.run(
        [sys.executable, "-c", TRUNCATE_MID_MERGE, str(path), str(b)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 1, (done.returncode, done.stderr)  # not -7 (SIGBUS)
    assert "model.safetensors" in done.stderr
    assert str(b) in done.stderr
    assert "ends" in done.stderr
    assert "early" in done.stderr
    assert not (tmp_path / "out").exists()
    assert staging_leftovers(tmp_path) == []


def _corrupt_header(raw: bytes, rng: random.Random) -> bytes:
    """A random edit of the header bytes, its length field, or the JSON's values."""
    (length,) = struct.unpack("<Q", raw[:8])
    header = bytearray(raw[8 : 8 + length])
    data = raw[8 + length :]
    action = rng.randrange(6)
    if action == 0:  # the length field lies
        return struct.pack("<Q", rng.choice([0, 1, length - 1, length + 8, 2**63, 2**40])) + raw[8:]
    if action == 1:  # flip some bytes of the JSON
        for _ in range(rng.randint(1, 6)):
            header[rng.randrange(len(header))] = rng.randrange(256)
        return raw[:8] + bytes(header) + data
    if action == 2:  # truncate the file anywhere
        return raw[: rng.randrange(len(raw))]
    document = json.loads(header)
    name = rng.choice([n for n in document if n != "__metadata__"])
    entry = document[name]
    field = rng.choice(["dtype", "shape", "data_offsets"])
    entry[field] = rng.choice(
        [None, "F32", "I8", "Q4", -1, [], [-1], [0, 10**12], [3, 2], "x", {"a": 1}, [1.5], True]
    )
    if action == 4:
        document[rng.choice(["", "__metadata__", "a" * 300])] = rng.choice([{}, [], 1, "s"])
    encoded = json.dumps(document).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def test_fuzzed_headers_give_an_index_or_a_model_error(tmp_path: Path) -> None:
    tensors = {
        "w": torch.randn(4, 3),
        "b": torch.zeros(3, dtype=torch.bfloat16),
        "ids": torch.arange(5),
    }
    save_file(tensors, str(tmp_path / "valid.safetensors"))
    raw = (tmp_path / "valid.safetensors").read_bytes()
    rng = random.Random(7)
    errors = 0
    for case in range(400):
        error = _read_error(tmp_path, _corrupt_header(raw, rng))
        if error is not None:
            assert "fuzz" in str(error) or "m" in str(error), case
            errors += 1
    assert errors > 200


def _read_error(tmp_path: Path, corrupted: bytes) -> HfMergeError | None:
    """The error that reading `corrupted` raises (its header parsed directly when the stated
    length fits, else the file read from a model folder); None when it reads."""
    size = len(corrupted)
    try:
        length = struct.unpack("<Q", corrupted[:8])[0] if size >= 8 else 0
        parse_shard_header(
            corrupted[8 : 8 + min(length, size)], file_size=size, shard="m", label="fuzz"
        ) if size >= 8 and 8 + length <= size else _read_through_files(tmp_path, corrupted)
    except HfMergeError as exc:
        return exc
    return None


def _read_through_files(tmp_path: Path, raw: bytes) -> None:
    folder = tmp_path / "fuzz"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(raw)
    read_checkpoint_index(folder, label="fuzz")


def test_a_merge_of_a_model_with_incompatible_dtypes_lists_every_one(tmp_path: Path) -> None:
    from hfmerge.sources.inspection import compatibility_problems, inspect_model
    from hfmerge.sources.refs import pin_model

    _, a, b = make_models(tmp_path)
    names: list[str] = []

    def two(header: dict[str, Any]) -> None:
        for name in sorted(n for n in header if n.endswith("proj.weight"))[:2]:
            header[name]["dtype"] = "I32"
            names.append(name)

    edit_header(b, two)
    models = [inspect_model(pin_model(str(path))) for path in (a, b)]
    (problem,) = compatibility_problems(models)
    assert isinstance(problem, IncompatibleModelsError)
    for name in names:
        assert f"tensor {name} is F32 vs I32" in str(problem)
    os.sync()
