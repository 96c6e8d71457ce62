"""Weight matching at scale: a Llama-shaped pair of about 1.1B parameters, streamed from disk.

    .venv/bin/python benchmarks/bench_align_scale.py [--work-dir DIR] [--depths 0.25,0.5,1]
        [--max-memory 3GB] [--quick] [--probe-samples 32] [--cka-memory 4GB] [--activation]
        [--activation-memory 6GB] [--orthogonal] [--orthogonal-memory 4GB]

Builds once (cached in --work-dir, default `$HFMERGE_CACHE/bench-align-scale`) a bf16 checkpoint
of TinyLlama's shape (hidden 2048, 22 layers, FF 5632, 32 heads, 4 KV heads, vocab 32000), written
tensor by tensor, and a planted copy: the same weights under a random permutation of every group
(GQA heads, rotary-pinned Q/K dims and all), written by the streamed aligned-checkpoint writer.
`--depths` scales the layer count (0.25 -> 6 layers, 0.5 -> 11, 1 -> 22). For each depth it runs
`hfmerge align MODEL PLANTED --out OUT` (the API call behind it) in a fresh process and prints the
sweeps, the matching time per sweep and in all, the first sweep's time beside the estimate said
before it starts (`align/matching_time.py`; `-` where the first sweep is too short to estimate),
the process's wall time and peak RSS, and whether
the aligned copy equals the model bit for bit (the planted permutation recovered exactly). Peak
RSS should stay flat in depth and the time should grow linearly with it. `--quick` runs a tiny
shape in seconds (the smoke test's). Child processes get OMP_NUM_THREADS = the core count unless
it is set.

Then, on the deepest pair (a BPE tokenizer trained on the built-in text is saved beside both), with
`--probe-samples` windows of built-in text: `hfmerge cka MODEL PLANTED --max-memory 4GB` (wall,
peak RSS, the placement it chose, the lowest diagonal CKA: 1 for a permuted copy), and with
`--activation`, `hfmerge align --method activation --max-memory 6GB` (`--activation-memory`; the
models run one at a time with their features in temporary files when they do not fit together);
`--probe-samples 0` skips both. With `--orthogonal`, on the deepest pair: `hfmerge align
--method weight+orthogonal --max-memory 4GB` (`--orthogonal-memory`; streamed, the models folded
and rotated on read): wall, peak RSS, and whether the output is the model folded (norm gains
moved into their readers) to within one bf16 rounding step per tensor, which is what recovering a
planted permutation with a rotation and maps within heads leaves.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from harness import LlamaShape, measure, measure_command, write_model

# Internal on purpose: the planted copy is written by the aligned-checkpoint writer itself, and the
# outputs (GBs) are compared tensor by tensor, read lazily.
from hfmerge.align.apply import _write_aligned
from hfmerge.arch.permute import random_permutations
from hfmerge.arch.residual import FOLDED, BasisMap, read_in_basis
from hfmerge.sources.inspection import inspect_model
from hfmerge.sources.refs import ModelSource
from hfmerge.tensors import LazyCheckpoint

TINYLLAMA = LlamaShape(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000)
QUICK = LlamaShape(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=96, vocab=512)
PLANTED_SEED = 1

# Runs `api.align` (what `hfmerge align` runs) and writes to the JSON file argv[5] its sweeps, the
# seconds spent in weight matching and in its first sweep (by wrapping the function the aligner
# calls), and the first sweep's time as estimated before the work (what `hfmerge align` says).
ALIGN = """
import json, sys, time
import hfmerge.align.apply as apply
from hfmerge import api
from hfmerge.align.matching_problem import group_touches
from hfmerge.align.matching_time import first_sweep_estimate
model, planted, out, max_memory, report = sys.argv[1:]
done = {}
inner = apply.weight_matching
def timed(spec, a, b, **kwargs):
    names = [n for n in a if not spec.tensors[n].buffer]
    touches = {g: ts for g, ts in group_touches(spec, names).items() if ts}
    estimate = first_sweep_estimate(spec, touches, a)
    done["predicted_s"] = estimate.seconds if estimate is not None else None
    start = time.perf_counter()
    result = inner(spec, a, b, **kwargs)
    done.update(matching_s=time.perf_counter() - start, first_s=result.seconds[0])
    return result
apply.weight_matching = timed
result = api.align(model, planted, out, force=True, progress=False, max_memory=max_memory or None)
with open(report, "w") as handle:
    json.dump({"sweeps": result.iterations, **done}, handle)
"""


@dataclass(frozen=True)
class Row:
    """One depth's measurement."""

    depth: float
    layers: int
    parameters: int
    sweeps: int
    matching_s: float
    first_s: float  # the first sweep, which solves every group
    predicted_s: float | None  # the first sweep as estimated before the work (None: too short)
    wall_s: float
    peak_rss_mib: float
    exact: bool


def shape_at(base: LlamaShape, depth: float) -> LlamaShape:
    """`base` with `depth` times its layers (at least one)."""
    return replace(base, layers=max(1, round(base.layers * depth)))


def build(root: Path, shape: LlamaShape) -> tuple[Path, Path]:
    """The model of `shape` and its planted permuted copy under `root`, built unless there."""
    model = root / f"L{shape.layers}-h{shape.hidden}" / "model"
    planted = model.parent / "planted"
    if not (model / "config.json").exists():
        shutil.rmtree(model, ignore_errors=True)
        print(f"building {model} ...", file=sys.stderr, flush=True)
        write_model(model, shape, seed=None)
    if not (planted / "config.json").exists():
        print(f"building {planted} ...", file=sys.stderr, flush=True)
        inspected = inspect_model(ModelSource(ref=str(model), path=model))
        perms = random_permutations(inspected.spec, torch.Generator().manual_seed(PLANTED_SEED))
        _write_aligned(
            inspected,
            planted,
            BasisMap(perms),
            force=True,
            progress=False,
            max_shard_bytes=2 * 10**9,
            metadata={"planted_by": "bench_align_scale"},
            description="writing planted copy",
        )
    return model, planted


def same_weights(one: Path, other: Path) -> bool:
    """Whether two checkpoints hold the same tensors, bit for bit."""
    with LazyCheckpoint(one) as a, LazyCheckpoint(other) as b:
        if sorted(a.names) != sorted(b.names):
            return False
        return all(torch.equal(a.get(name), b.get(name)) for name in a.names)


def run_depth(root: Path, shape: LlamaShape, depth: float, max_memory: str) -> Row:
    """Align the planted copy of the model at `depth` in a fresh process, and check the output."""
    scaled = shape_at(shape, depth)
    model, planted = build(root, scaled)
    out, report = model.parent / "aligned", model.parent / "report.json"
    print(f"aligning at depth {depth} ({scaled.layers} layers) ...", file=sys.stderr, flush=True)
    wall, rss = measure(ALIGN, model, planted, out, max_memory, report)
    done = json.loads(report.read_text())
    exact = same_weights(out, model)
    shutil.rmtree(out)  # GBs; the checkpoints stay cached
    return Row(
        depth=depth,
        layers=scaled.layers,
        parameters=scaled.parameters,
        sweeps=int(done["sweeps"]),
        matching_s=float(done["matching_s"]),
        first_s=float(done["first_s"]),
        predicted_s=done["predicted_s"],
        wall_s=wall,
        peak_rss_mib=rss,
        exact=exact,
    )


def matches_folded(out: Path, model: Path) -> bool:
    """Whether each tensor in `out` is `model`'s read folded, to within one bf16 rounding step of
    the tensor's largest value (the orthogonal methods write B folded, in its stored dtype)."""
    spec = inspect_model(ModelSource(ref=str(model), path=model)).spec
    with LazyCheckpoint(out) as written, LazyCheckpoint(model) as source:
        for name in written.names:
            want = read_in_basis(name, lambda n: source.get(n).double(), spec, FOLDED)
            step = 2.0**-8 * float(want.abs().max())  # bf16 keeps 8 significant bits
            if float((written.get(name).double() - want).abs().max()) > step:
                return False
    return True


def orthogonal_row(root: Path, shape: LlamaShape, depth: float, *, memory: str) -> None:
    """`hfmerge align --method weight+orthogonal` within `memory` on the pair at `depth`,
    printed."""
    model, planted = build(root, shape_at(shape, depth))
    out = model.parent / "aligned-orthogonal"
    align = ["align", str(model), str(planted), "--out", str(out), "--method", "weight+orthogonal"]
    print(f"weight+orthogonal at depth {depth} within {memory} ...", file=sys.stderr, flush=True)
    wall, rss = measure_command(
        [sys.executable, "-m", "hfmerge", *align, "--max-memory", memory, "--force"]
    )
    recovered = matches_folded(out, model)
    shutil.rmtree(out)
    print(
        f"hfmerge align MODEL PLANTED --method weight+orthogonal --max-memory {memory}: "
        f"{wall:.1f} s, peak RSS {rss * 2**20 / 1e9:.2f} GB, "
        f"the model folded, to one bf16 step: {'yes' if recovered else 'NO'}"
    )


def save_tokenizer(*folders: Path, vocab: int) -> None:
    """A BPE tokenizer of at most `vocab` tokens trained on the built-in text, saved into each
    folder lacking one."""
    from hfmerge.lm.textdata import load_texts
    from hfmerge.zoo.tokenizer import build_tokenizer

    missing = [f for f in folders if not (f / "tokenizer.json").exists()]
    if missing:
        tokenizer = build_tokenizer(
            load_texts(None), vocab_size=min(vocab, 4096), model_max_length=2048
        )
        for folder in missing:
            tokenizer.save_pretrained(folder)


def probe_rows(
    root: Path,
    shape: LlamaShape,
    depth: float,
    *,
    samples: int,
    memory: str,
    activation: str | None,
) -> None:
    """CKA within `memory` (and activation matching within `activation`) on the pair at `depth`,
    printed."""
    model, planted = build(root, shape_at(shape, depth))
    save_tokenizer(model, planted, vocab=shape.vocab)
    report = model.parent / "cka.json"
    small = ["--samples", str(samples), "--max-length", "128", "--batch-size", "8"]
    print(f"cka at depth {depth} within {memory} ...", file=sys.stderr, flush=True)
    cka = ["cka", str(model), str(planted), *small, "--max-memory", memory, "--json", str(report)]
    wall, rss = measure_command([sys.executable, "-m", "hfmerge", *cka])
    done = json.loads(report.read_text())
    print(
        f"hfmerge cka MODEL PLANTED --max-memory {memory}, {samples} windows: {wall:.1f} s, peak "
        f"RSS {rss * 2**20 / 1e9:.2f} GB, models {done['settings']['placement']}, lowest "
        f"diagonal CKA {min(done['diagonal']):.4f} over {len(done['diagonal'])} layers"
    )
    if activation is None:
        return
    out = model.parent / "aligned-activation"
    align = ["align", str(model), str(planted), "--out", str(out), "--method", "activation"]
    align += ["--max-memory", activation]
    wall, rss = measure_command([sys.executable, "-m", "hfmerge", *align, "--force"])
    exact = same_weights(out, model)
    shutil.rmtree(out)
    print(
        f"hfmerge align MODEL PLANTED --method activation --max-memory {activation}: "
        f"{wall:.1f} s, peak RSS {rss * 2**20 / 1e9:.2f} GB, "
        f"recovered exactly: {'yes' if exact else 'NO'}"
    )


def print_table(rows: list[Row], max_memory: str) -> None:
    """One line per depth, then time and memory relative to the shallowest depth."""
    budget = f", --max-memory {max_memory}" if max_memory else ""
    print(
        f"hfmerge align MODEL PLANTED --out OUT (weight matching{budget}), {os.cpu_count()} cores, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', os.cpu_count())}"
    )
    print(
        f"{'depth':>5} {'layers':>6} {'params':>9} {'sweeps':>6} {'s/sweep':>8} {'sweep 1':>8} "
        f"{'estimate':>8} {'match s':>8} {'total s':>8} {'peak RSS GB':>11}  recovered exactly"
    )
    for r in rows:
        estimate = "-" if r.predicted_s is None else f"{r.predicted_s:.1f}"
        print(
            f"{r.depth:>5} {r.layers:>6} {r.parameters / 1e6:>8.1f}M {r.sweeps:>6} "
            f"{r.matching_s / r.sweeps:>8.1f} {r.first_s:>8.1f} {estimate:>8} "
            f"{r.matching_s:>8.1f} {r.wall_s:>8.1f} "
            f"{r.peak_rss_mib * 2**20 / 1e9:>11.2f}  {'yes' if r.exact else 'NO'}"
        )
    first = rows[0]
    for r in rows[1:]:
        print(
            f"depth {r.depth} vs {first.depth}: parameters {r.parameters / first.parameters:.2f}x, "
            f"s/sweep {(r.matching_s / r.sweeps) / (first.matching_s / first.sweeps):.2f}x, "
            f"peak RSS {r.peak_rss_mib / first.peak_rss_mib:.2f}x"
        )


def default_work_dir() -> Path:
    """`$HFMERGE_CACHE` (default `~/.cache/hfmerge`) / `bench-align-scale`."""
    cache = os.environ.get("HFMERGE_CACHE") or str(Path.home() / ".cache" / "hfmerge")
    return Path(cache) / "bench-align-scale"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--depths", default="0.25,0.5,1")
    parser.add_argument("--max-memory", default="3GB", help="passed to the aligner ('' for none)")
    parser.add_argument("--quick", action="store_true", help="a tiny shape, in seconds")
    parser.add_argument("--probe-samples", type=int, default=32, help="0: no cka row")
    parser.add_argument("--cka-memory", default="4GB", help="cka's --max-memory")
    parser.add_argument("--activation", action="store_true", help="add activation matching")
    parser.add_argument("--activation-memory", default="6GB", help="its --max-memory")
    parser.add_argument("--orthogonal", action="store_true", help="add weight+orthogonal")
    parser.add_argument("--orthogonal-memory", default="4GB", help="its --max-memory")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    shape = QUICK if args.quick else TINYLLAMA
    root = args.work_dir or default_work_dir()
    depths = [float(d) for d in args.depths.split(",")]
    rows = []
    for depth in depths:
        rows.append(run_depth(root, shape, depth, args.max_memory))
        print_table(rows, args.max_memory)  # after each depth: a long run reports as it goes
    if not all(r.exact for r in rows):
        raise SystemExit("the planted permutation was not recovered exactly")
    if args.probe_samples:
        probe_rows(
            root,
            shape,
            max(depths),
            samples=args.probe_samples,
            memory=args.cka_memory,
            activation=args.activation_memory if args.activation else None,
        )
    if args.orthogonal:
        orthogonal_row(root, shape, max(depths), memory=args.orthogonal_memory)


if __name__ == "__main__":
    main()
