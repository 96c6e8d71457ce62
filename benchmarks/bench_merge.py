"""hfmerge vs mergekit on 1.1B-parameter Llama-shaped bf16 models: wall time and peak RSS.

    .venv/bin/python benchmarks/bench_merge.py [--dir /tmp/hfmerge-bench-merge]
        [--methods linear,ties,slerp,model_stock] [--repeats 1] [--size-factor 2] [--skip-mergekit]
        [--max-memory 1GB]

Builds once (cached in --dir) a base and two fine-tunes (base + small random deltas, so task
vectors mean something) shaped like TinyLlama-1.1B: hidden 2048, 22 layers, 32 heads, 4 KV heads,
intermediate 5632, vocab 32000, bf16 safetensors with config.json. For each method (linear with
weights 0.5/0.5; TIES with density 0.5 and weights 0.5/0.5 over the base; also, with --methods,
SLERP from the base to one fine-tune at t=0.4 and Model Stock of both over the base) it runs,
alternating, each in a fresh process: `hfmerge run recipe.yaml`, `mergekit-yaml config.yml OUT` with
mergekit's defaults (CPU, --out-shard-size 5B, no --lazy-unpickle (safetensors are read lazily
anyway), --no-copy-tokenizer as there is none) and a raw floor that reads every input tensor and
writes the output shards with no arithmetic. Each tool writes into a fresh path (the old output is
removed before the timed run). It prints wall seconds and peak RSS of each (summed over a
command's processes: hfmerge merges linear in two), the ratios, and how far the two outputs are
apart (linear must agree to one bf16 rounding).
--size-factor 2 also builds a model with twice the layers and merges it with hfmerge, to show
that its peak RSS does not grow with the model. Child processes get OMP_NUM_THREADS = the core
count unless it is set.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from harness import LlamaShape, measure, measure_command, write_model

# Internal on purpose: the outputs are compared tensor by tensor, read lazily (they are GBs).
from hfmerge.tensors import LazyCheckpoint

BIN = Path(sys.executable).parent
TINYLLAMA = LlamaShape(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000)
Rows = dict[tuple[str, str], list[tuple[float, float]]]  # (method, tool) -> (wall s, RSS MiB)
MERGEKIT_FLAGS = ["--no-copy-tokenizer", "--no-write-model-card", "--quiet"]

# Internal on purpose: the floor is the engine's own reading and writing with no arithmetic.
FLOOR = """
import math, sys
from hfmerge.tensors.malloc import keep_chunk_buffers
from hfmerge.tensors import LazyCheckpoint, ShardWriter, plan_shards
keep_chunk_buffers()  # the engine's allocator settings, so the floor pays no extra page faults
out, *models = sys.argv[1:]
inputs = [LazyCheckpoint(m) for m in models]
first = inputs[0]
plan = plan_shards([first.info(n) for n in first.names], max_shard_bytes=5 * 10**9)
with ShardWriter(out, plan) as writer:
    for name in first.names:
        shape = first.info(name).shape
        rows, row = shape[0], math.prod(shape[1:])
        step = max(1, (1 << 20) // row)
        for start in range(0, rows, step):
            parts = [m.get_rows(name, start, min(rows, start + step)) for m in inputs]
            writer.write_part(name, start * row, parts[0])
"""


def build(root: Path, shape: LlamaShape) -> dict[str, Path]:
    """The base and two fine-tunes of `shape` under `root`, built unless already there."""
    paths = {name: root / f"L{shape.layers}" / name for name in ("base", "a", "b")}
    for seed, path in enumerate(paths.values()):
        if not (path / "config.json").exists():
            shutil.rmtree(path, ignore_errors=True)
            print(f"building {path} ...", file=sys.stderr, flush=True)
            write_model(path, shape, seed=seed or None)
    return paths


@dataclass(frozen=True)
class BenchMerge:
    """One benchmarked merge: the models it lists, whether it names the base, and its per-model
    and global parameters."""

    models: tuple[str, ...]  # of "base", "a", "b"
    base: bool
    model_params: dict[str, float] = field(default_factory=dict)
    params: dict[str, float] = field(default_factory=dict)

    def inputs(self, models: dict[str, Path]) -> list[Path]:
        """Every checkpoint the merge reads."""
        names = [*self.models, *(["base"] if self.base and "base" not in self.models else [])]
        return [models[name] for name in names]


MERGES = {
    "linear": BenchMerge(("a", "b"), base=False, model_params={"weight": 0.5}),
    "ties": BenchMerge(("a", "b"), base=True, model_params={"weight": 0.5, "density": 0.5}),
    "slerp": BenchMerge(("base", "a"), base=True, params={"t": 0.4}),
    "model_stock": BenchMerge(("a", "b"), base=True),
}


def _flow(values: dict[str, float]) -> str:
    """A flow-style YAML mapping: {weight: 0.5, density: 0.5}."""
    return "{" + ", ".join(f"{key}: {value}" for key, value in values.items()) + "}"


def hfmerge_recipe(method: str, models: dict[str, Path], out: Path) -> str:
    """The recipe for `method` (see `MERGES`): per-model parameters sit in each model's entry."""
    merge = MERGES[method]
    lines = ["models:"]
    for name in merge.models:
        lines.append(f"  - model: {models[name]}")
        lines += [f"    {key}: {value}" for key, value in merge.model_params.items()]
    if merge.base:
        lines.append(f"base: {models['base']}")
    lines.append(f"merge:\n  method: {method}")
    if merge.params:
        lines.append(f"  parameters: {_flow(merge.params)}")
    lines.append(f"output:\n  path: {out}\n  dtype: bfloat16")
    return "\n".join(lines) + "\n"


def mergekit_config(method: str, models: dict[str, Path]) -> str:
    """The same merge as `hfmerge_recipe`, in mergekit's YAML."""
    merge = MERGES[method]
    lines = ["models:"]
    for name in merge.models:
        lines.append(f"  - model: {models[name]}")
        if merge.model_params:
            lines.append(f"    parameters: {_flow(merge.model_params)}")
    if merge.base:
        lines.append(f"base_model: {models['base']}")
    if merge.params:
        lines.append(f"parameters: {_flow(merge.params)}")
    lines += [f"merge_method: {method}", "dtype: bfloat16"]
    return "\n".join(lines) + "\n"


def run_hfmerge(
    method: str, models: dict[str, Path], work: Path, max_memory: str | None
) -> tuple[float, float]:
    """(wall s, peak RSS MiB) of `hfmerge run` on `method`."""
    recipe = work / f"{method}.yaml"
    out = work / f"hf-{method}"
    recipe.write_text(hfmerge_recipe(method, models, out))
    # Every tool writes into a fresh path, its old output removed outside the timing.
    shutil.rmtree(out, ignore_errors=True)
    argv = [str(BIN / "hfmerge"), "run", str(recipe)]
    if max_memory:
        argv += ["--max-memory", max_memory]
    return measure_command(argv, env=child_env())


def run_mergekit(method: str, models: dict[str, Path], work: Path) -> tuple[float, float]:
    """(wall s, peak RSS MiB) of `mergekit-yaml` on `method`."""
    config = work / f"{method}.mergekit.yml"
    config.write_text(mergekit_config(method, models))
    out = work / f"mk-{method}"
    shutil.rmtree(out, ignore_errors=True)
    argv = [str(BIN / "mergekit-yaml"), str(config), str(out), *MERGEKIT_FLAGS]
    return measure_command(argv, env=child_env())


def run_floor(method: str, models: dict[str, Path], work: Path) -> tuple[float, float]:
    """(wall s, peak RSS MiB) of reading every input and writing the output, no arithmetic."""
    out = work / "floor"
    shutil.rmtree(out, ignore_errors=True)
    return measure(FLOOR, out, *MERGES[method].inputs(models))


def child_env() -> dict[str, str]:
    """The environment of the measured processes: same threads for both tools."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return env


def compare(one: Path, other: Path) -> tuple[float, float, float]:
    """(max |difference|, fraction of elements that differ, fraction that differ by more than
    one bf16 rounding (2^-8 relative)) over every tensor of two checkpoints."""
    worst, differ, beyond, total = 0.0, 0, 0, 0
    with LazyCheckpoint(one) as a, LazyCheckpoint(other) as b:
        for name in a.names:
            x, y = a.get(name).float(), b.get(name).float()
            gap = (x - y).abs()
            ulp = torch.maximum(x.abs(), y.abs()) * 2.0**-8
            worst = max(worst, float(gap.max()))
            differ += int((gap > 0).sum())
            beyond += int((gap > ulp).sum())
            total += x.numel()
    return worst, differ / total, beyond / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/hfmerge-bench-merge"))
    parser.add_argument("--methods", default="linear,ties")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--size-factor", type=int, default=1, help="also merge a model with N x the layers"
    )
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--max-memory", default=None, help="passed to hfmerge run")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = [method for method in methods if method not in MERGES]
    if unknown:
        parser.error(f"unknown method {', '.join(unknown)}: choose from {', '.join(MERGES)}")
    work = args.dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    models = build(args.dir, TINYLLAMA)
    rows = measure_all(methods, models, work, args)
    print_table(methods, rows, args)
    for method in methods:
        if not args.skip_mergekit:
            report_agreement(method, work)
    if args.size_factor > 1:
        report_scaling(methods, rows, args, work)


def measure_all(
    methods: list[str], models: dict[str, Path], work: Path, args: argparse.Namespace
) -> Rows:
    """Every (method, tool) measurement, the tools alternating within each repeat."""
    rows: Rows = {}
    tools = ["hfmerge", *([] if args.skip_mergekit else ["mergekit"]), "floor"]
    for method in methods:
        for _ in range(args.repeats):
            for tool in tools:
                print(f"{method}: {tool} ...", file=sys.stderr, flush=True)
                if tool == "hfmerge":
                    got = run_hfmerge(method, models, work, args.max_memory)
                elif tool == "mergekit":
                    got = run_mergekit(method, models, work)
                else:
                    got = run_floor(method, models, work)
                rows.setdefault((method, tool), []).append(got)
    return rows


def best(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """Least wall time and least peak RSS over the repeats."""
    return min(w for w, _ in runs), min(r for _, r in runs)


def print_table(methods: list[str], rows: Rows, args: argparse.Namespace) -> None:
    """The side-by-side table and the ratios."""
    params = TINYLLAMA.parameters
    print(
        f"two {params / 1e9:.2f}B-parameter Llama-shaped bf16 models ({params * 2 / 1e9:.2f} GB "
        f"each), {os.cpu_count()} cores, OMP_NUM_THREADS={child_env()['OMP_NUM_THREADS']}, "
        f"best of {args.repeats}"
    )
    commands = {
        "hfmerge": "hfmerge run RECIPE"
        + (f" --max-memory {args.max_memory}" if args.max_memory else ""),
        "mergekit": "mergekit-yaml CONFIG OUT " + " ".join(MERGEKIT_FLAGS) + " (CPU, 5B shards)",
        "floor": "read every input tensor, write the shards, no arithmetic",
    }
    width = max(len("method"), *map(len, methods))
    print(f"{'method':<{width}} {'tool':<9} {'wall s':>8} {'peak RSS MiB':>13}  command")
    for method in methods:
        for tool in ("hfmerge", "mergekit", "floor"):
            if (method, tool) in rows:
                wall, rss = best(rows[method, tool])
                print(f"{method:<{width}} {tool:<9} {wall:>8.1f} {rss:>13.0f}  {commands[tool]}")
    for method in methods:
        hf_wall, hf_rss = best(rows[method, "hfmerge"])
        floor_wall = best(rows[method, "floor"])[0]
        line = f"{method}: hfmerge/floor wall {hf_wall / floor_wall:.2f}x"
        if (method, "mergekit") in rows:
            mk_wall, mk_rss = best(rows[method, "mergekit"])
            line += (
                f"; hfmerge/mergekit wall {hf_wall / mk_wall:.2f}x, peak RSS {hf_rss / mk_rss:.2f}x"
            )
        print(line)


def report_agreement(method: str, work: Path) -> None:
    """How far hfmerge's output is from mergekit's; linear must agree to one bf16 rounding."""
    worst, differ, beyond = compare(work / f"hf-{method}", work / f"mk-{method}")
    verdict = ""
    if method == "linear":
        verdict = "  OK: within bf16 rounding" if beyond == 0 else "  MISMATCH beyond bf16 rounding"
    print(
        f"{method} outputs, hfmerge vs mergekit: max |diff| {worst:.3g}, {differ:.4%} of elements "
        f"differ, {beyond:.4%} by more than one bf16 rounding{verdict}"
    )
    if method == "linear" and beyond:
        raise SystemExit(1)


def report_scaling(methods: list[str], rows: Rows, args: argparse.Namespace, work: Path) -> None:
    """hfmerge on a model with `size_factor` times the layers: peak RSS should stay flat."""
    big = LlamaShape(**{**TINYLLAMA.__dict__, "layers": TINYLLAMA.layers * args.size_factor})
    models = build(args.dir, big)
    for method in methods:
        print(f"{method}: hfmerge on {args.size_factor}x ...", file=sys.stderr, flush=True)
        wall, rss = run_hfmerge(method, models, work, args.max_memory)
        small_wall, small_rss = best(rows[method, "hfmerge"])
        print(
            f"{method} {args.size_factor}x model ({big.layers} layers, {big.parameters / 1e9:.2f}B "
            f"parameters): hfmerge wall {wall:.1f} s ({wall / small_wall:.2f}x the 1x model), "
            f"peak RSS {rss:.0f} MiB (1x model: {small_rss:.0f} MiB)"
        )


if __name__ == "__main__":
    main()
