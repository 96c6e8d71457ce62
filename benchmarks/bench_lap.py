"""Linear assignment at FF width: scipy's dense solver against the candidates, on the same costs.

For each width n (Llama-2-7B's FF group has 11008 units, Llama-3-8B's and Mistral-7B's 14336) two
float64 similarities, built as weight matching builds an FF group's, `A @ B.T` of [n, hidden]
unit weights:
  planted      B is A with its units permuted plus noise (a permuted copy or a close fine-tune:
               a strong diagonal once un-permuted);
  independent  A and B independent Gaussian (two unrelated models: weak structure).
Each solver runs in a fresh process with one thread (the matrix loaded from a temporary .npy):
seconds of the first call (cold: first allocations, after the imports) and of a second call
(warm; the first only at n >= 11008), the peak memory the call adds over the loaded matrix, and
the objective gap to scipy relative to scipy's objective (0 for an exact solver). Solvers:
  scipy        scipy.optimize.linear_sum_assignment (LAPJV), the reference;
  scipy-f32    the same on the costs rounded to float32: does float32 change the optimum?
  hfmerge      hfmerge.align.lap.solve_lap: the sparse solver with a dual certificate (dense
               fallback) from SPARSE_MIN_UNITS units on;
  lapx-*       lapx's lapjv / lapjvh / lapjvr (`pip install -c constraints.txt -e ".[bench]"`),
               float64 kernels;
  lapjv        src-d's lapjv, if installed (Linux with AVX2 only).
A solver that is not installed is left out of the table.

    OMP_NUM_THREADS=1 python benchmarks/bench_lap.py [--sizes 2048,5632,11008,14336]
        [--kinds planted,independent] [--solvers hfmerge,lapx-lapjvh]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# Runs one solver on the matrix at argv[1] and prints a JSON line: seconds and peak memory of each
# call, and the column of each row. VmHWM is reset before each call (clear_refs 5), so the peak is
# the call's own on top of the loaded matrix.
CHILD = """
import json, sys, time
import numpy as np
path, solver, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])

def rss(field):
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith(field)) / 1024

def solve(matrix):
    if solver in ("scipy", "scipy-f32"):
        costs = matrix.astype(np.float32).astype(np.float64) if solver == "scipy-f32" else matrix
        return linear_sum_assignment(costs, maximize=True)[1]
    if solver == "hfmerge":
        return solve_lap(torch.from_numpy(matrix)).numpy()
    if solver == "lapjv":
        import lapjv
        return lapjv.lapjv(-matrix)[0]
    import lap
    name = solver.removeprefix("lapx-")
    if name == "lapjv":
        return lap.lapjv(-matrix)[1]
    rows, cols = getattr(lap, name)(-matrix, precision="float64", return_cost=False)
    return cols[np.argsort(rows)]

from scipy.optimize import linear_sum_assignment
if solver == "hfmerge":  # imports are not the solver's time
    import torch
    torch.set_num_threads(1)
    from hfmerge.align.lap import solve_lap
elif solver.startswith("lapx"):
    import lap
    getattr(lap, solver.removeprefix("lapx-"))
matrix = np.load(path)
times, peaks = [], []
for _ in range(calls):
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    base = rss("VmRSS:")
    start = time.perf_counter()
    cols = solve(matrix)
    times.append(time.perf_counter() - start)
    peaks.append(rss("VmHWM:") - base)
print(json.dumps({"times": times, "peaks": peaks, "cols": np.asarray(cols).tolist()}))
"""

OPTIONAL = {"lapx-lapjv": "lap", "lapx-lapjvh": "lap", "lapx-lapjvr": "lap", "lapjv": "lapjv"}


def similarity(n: int, kind: str, hidden: int, seed: int) -> np.ndarray:
    """`A @ B.T` ([n, hidden] @ [hidden, n]) for a planted permutation or independent models."""
    generator = np.random.default_rng(seed)
    a = generator.standard_normal((n, hidden))
    if kind == "planted":
        b = a[generator.permutation(n)] + 0.5 * generator.standard_normal((n, hidden))
    else:
        b = generator.standard_normal((n, hidden))
    return a @ b.T  # [n, hidden] @ [hidden, n] -> [n, n]


def run_solver(path: Path, solver: str, calls: int) -> dict[str, list[float]]:
    """One solver's JSON line, from a fresh single-threaded process."""
    root = str(Path(__file__).resolve().parents[1])
    path_entries = [root, *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path_entries)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), solver, str(calls)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{solver} failed:\n{done.stderr[-3000:]}")
    result: dict[str, list[float]] = json.loads(done.stdout.splitlines()[-1])
    return result


def solvers(n: int, wanted: set[str] | None) -> list[str]:
    """The solvers to run at width n: scipy first (the reference), optional ones if installed."""
    names = ["scipy", "hfmerge"]
    if n <= 5632:  # float32 costs: the answer does not need the widest (and slowest) sizes
        names.append("scipy-f32")
    for name, module in OPTIONAL.items():
        if name == "lapx-lapjv" and n > 5632:  # a third of scipy's speed at 11008 units
            continue
        if importlib.util.find_spec(module) is not None:
            names.append(name)
    return [name for name in names if wanted is None or name == "scipy" or name in wanted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2048,5632,11008,14336")
    parser.add_argument("--hidden", type=int, default=1024, help="unit weight width")
    parser.add_argument("--kinds", default="planted,independent")
    parser.add_argument("--solvers", help="comma-separated subset (scipy always runs)")
    args = parser.parse_args()
    wanted = set(args.solvers.split(",")) if args.solvers else None
    sizes = [int(n) for n in args.sizes.split(",")]
    print(f"hidden {args.hidden}; a dense float64 n x n similarity: ", end="")
    print(", ".join(f"{n}: {n * n * 8 / 1e9:.2f} GB" for n in sizes))
    print(
        f"{'n':>6} {'kind':<12} {'solver':<12} {'cold s':>8} {'warm s':>8} {'x scipy':>8}", end=""
    )
    print(f" {'peak MB':>8} {'gap (rel)':>10} {'same perm':>9}")
    with tempfile.TemporaryDirectory() as work:
        for n in sizes:
            for kind in args.kinds.split(","):
                path = Path(work) / f"{kind}{n}.npy"
                matrix = similarity(n, kind, args.hidden, seed=n)
                np.save(path, matrix)
                calls = 1 if n >= 11008 else 2
                reference: list[int] = []
                best, scipy_seconds = 0.0, 0.0
                for solver in solvers(n, wanted):
                    result = run_solver(path, solver, calls)
                    cols = np.asarray(result["cols"], dtype=np.int64)
                    value = float(matrix[np.arange(n), cols].sum())
                    times = result["times"]
                    if solver == "scipy":
                        reference, best, scipy_seconds = cols.tolist(), value, times[-1]
                    warm = f"{times[1]:.2f}" if len(times) > 1 else "-"
                    ratio = scipy_seconds / times[-1]  # warm against warm where there is one
                    gap = (best - value) / abs(best)
                    same = "yes" if cols.tolist() == reference else "no"
                    print(f"{n:>6} {kind:<12} {solver:<12} {times[0]:>8.2f} {warm:>8}", end="")
                    print(f" {ratio:>8.2f} {result['peaks'][-1]:>8.0f} {gap:>10.1e} {same:>9}")
                path.unlink()


if __name__ == "__main__":
    main()
