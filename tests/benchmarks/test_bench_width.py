"""benchmarks/bench_width.py: its arguments, and a smoke run that trains and measures two widths."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest

from hfmerge.zoo import ZooConfig, zoo_cache_dir
from tests.support import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "bench_width.py"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """The benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_width", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_default_widths_share_everything_but_the_width(bench: ModuleType) -> None:
    args = bench.parse_args([])
    assert args.widths == (16, 32, 64, 128, 256)
    assert args.configs[3] == ZooConfig()  # width 128 is the default zoo itself
    assert {(c.num_layers, c.num_heads, c.pretrain_steps) for c in args.configs} == {(4, 4, 300)}


def test_quick_and_steps_options(bench: ModuleType) -> None:
    args = bench.parse_args(["--quick", "--widths", "32,16,32", "--steps", "7"])
    assert args.widths == (16, 32)  # sorted, repeats dropped
    assert [c.hidden_size for c in args.configs] == [16, 32]
    assert [c.intermediate_size for c in args.configs] == [44, 88]
    assert {c.pretrain_steps for c in args.configs} == {7}
    assert args.samples == 16


@pytest.mark.parametrize(
    "argv", [["--widths", "30,64"], ["--widths", "64"], ["--widths", "a,b"], ["--pairs", "bert"]]
)
def test_bad_arguments_exit_with_usage_error(bench: ModuleType, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        bench.parse_args(argv)
    assert caught.value.code == 2


@pytest.mark.slow
def test_quick_run_prints_table_and_writes_plot_and_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HFMERGE_CACHE", str(tmp_path / "cache"))  # read below by zoo_cache_dir
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    plot, rows_json = tmp_path / "width.png", tmp_path / "width.json"
    argv = ["--quick", "--widths", "16,32", "--steps", "30", "--samples", "4", "--quiet"]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *argv, "--plot", str(plot), "--json", str(rows_json)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line.split()[:2] for line in lines if line.startswith("llama ")] == [
        ["llama", "16"],
        ["llama", "32"],
    ]
    assert "llama: width 16 -> 32" in lines

    rows = json.loads(rows_json.read_text())
    assert [row["width"] for row in rows] == [16, 32]
    assert rows[0]["params"] < rows[1]["params"]
    for row in rows:
        # Each width's pair was trained at that width, at the tiny config's depth and heads.
        config = replace(ZooConfig.tiny(), pretrain_steps=30).with_width(row["width"])
        for member in ("seed0", "seed1"):
            saved = json.loads((zoo_cache_dir(config) / member / "config.json").read_text())
            assert saved["hidden_size"] == row["width"]
            assert saved["intermediate_size"] == config.intermediate_size
            assert (saved["num_hidden_layers"], saved["num_attention_heads"]) == (2, 2)
        midline = (row["loss_a"] + row["loss_b"]) / 2
        for align in ("none", "weight", "weight+repair"):
            assert math.isfinite(row["barrier"][align])
            assert row["barrier"][align] >= 0
            # λ = 0.5 is on the grid, so the barrier is at least the midpoint's excess loss.
            assert row["barrier"][align] >= row["loss_mid"][align] - midline - 1e-6
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
