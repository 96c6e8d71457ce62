"""benchmarks/bench_align_scale.py's smoke run: the tiny shape, built, aligned and checked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_run_recovers_the_planted_copy(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(ROOT / "benchmarks" / "bench_align_scale.py")]
    argv += ["--quick", "--depths", "0.5,1", "--work-dir", str(tmp_path)]
    argv += ["--probe-samples", "8", "--activation", "--orthogonal"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [
        line.split() for line in done.stdout.splitlines() if line.startswith(("  0.5", "  1.0"))
    ]
    assert [row[1] for row in rows[-2:]] == ["2", "4"]  # layers at each depth, last table
    assert all(row[-1] == "yes" for row in rows)  # recovered exactly
    assert all(int(row[3]) >= 2 for row in rows)  # sweeps: the last one changed nothing
    assert "models together, lowest diagonal CKA 1.0000 over 5 layers" in done.stdout
    assert "--method activation" in done.stdout
    assert "the model folded, to one bf16 step: yes" in done.stdout
    assert "recovered exactly: yes" in done.stdout
