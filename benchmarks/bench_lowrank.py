"""Low-rank task vectors on the zoo's code and prose specialists (both fine-tuned from zoo:seed0).

Task arithmetic, TIES and TSV-Merge at full rank and with every matrix's task vector truncated to
rank r, side by side: held-out loss on code and on prose (text no zoo model trained on), and the
bytes of one fine-tune's low-rank task vectors at that rank (U·S and V of every matrix; norms
stay full) against the full task vector. TSV's own default rank (full / 2 for two tasks) is a row
of its own; its "full" row keeps every direction of each task.

    OMP_NUM_THREADS=1 python benchmarks/bench_lowrank.py [--quick] [--plot lowrank.png]
        [--ranks 1,2,4,8,16,32] [--samples 64] [--max-length 128]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

from hfmerge import api, parse_recipe

# Internal on purpose: the sizes of the factors come from the base's tensor shapes.
from hfmerge.methods.lowrank import factor_bytes
from hfmerge.tensors import LazyCheckpoint
from hfmerge.zoo import zoo_model

DOMAINS = ("code", "prose")
EXPERTS = [f"zoo:{d}" for d in DOMAINS]
METHODS = ("task_arithmetic", "ties", "tsv")
FULL = 0  # the rank label of an untruncated merge
TSV_DEFAULT = -1  # the rank label of TSV's own default rank (full / tasks)
EVERY_DIRECTION = 1 << 20  # TSV's `rank` at full rank: clamped to each matrix's smaller side
Loss = dict[tuple[str, int, str], float]  # (method, rank label, domain) -> nats/token


def recipe(method: str, rank: int, out: Path) -> dict[str, Any]:
    """The merge of both specialists by `method`, its task vectors truncated to `rank`."""
    cut = {} if rank in (FULL, TSV_DEFAULT) else {"rank": rank}
    if method == "tsv":
        parameters = {"rank": EVERY_DIRECTION} if rank == FULL else cut
        models: list[Any] = EXPERTS
    else:
        # Task arithmetic averages the task vectors; TIES keeps half of each (its defaults
        # normalise by the agreeing weights), as in bench_route.py.
        parameters = {"normalize": True, **cut}
        density = {"density": 0.5} if method == "ties" else {}
        models = [{"model": m, **density} for m in EXPERTS]
    return {
        "models": models,
        "base": "zoo:seed0",
        "merge": {"method": method, "parameters": parameters},
        "output": {"path": str(out / f"{method}-{rank}"), "dtype": "float32"},
    }


def variants(ranks: list[int]) -> list[tuple[str, int]]:
    """(method, rank label) of every merge, each method's full rank first."""
    out = [(method, rank) for method in METHODS for rank in [FULL, *ranks]]
    return [*out, ("tsv", TSV_DEFAULT)]


def task_vector_bytes(rank: int) -> tuple[int, int]:
    """(bytes of one fine-tune's task vectors truncated to `rank`, bytes at full size), float32:
    each matrix as U·S [m, r] and V [n, r] (or whole, where that is smaller), the rest whole."""
    low = full = 0
    with LazyCheckpoint(zoo_model("seed0")) as base:
        for name in base.names:
            shape = base.info(name).shape
            size = math.prod(shape) * 4
            full += size
            if len(shape) != 2 or rank == FULL:
                low += size
                continue
            kept = min(shape) // len(EXPERTS) if rank == TSV_DEFAULT else min(rank, *shape)
            low += min(size, factor_bytes((shape[0], shape[1]), kept))
    return low, full


def label(rank: int) -> str:
    return {FULL: "full", TSV_DEFAULT: "default"}.get(rank, str(rank))


def print_table(loss: Loss, reference: Loss, ranks: list[int], args: argparse.Namespace) -> None:
    print(
        f"zoo code/prose specialists over zoo:seed0, {args.samples} held-out windows x "
        f"{args.max_length} tokens per domain, CPU; loss in nats/token"
    )
    for (name, _, domain), value in sorted(reference.items()):
        print(f"  {name:<16} {domain:<6} {value:.4f}")
    print(f"{'method':<16} {'rank':>7} {'code':>8} {'prose':>8} {'task vector':>12} {'of full':>8}")
    for method, rank in variants(ranks):
        low, full = task_vector_bytes(rank)
        print(
            f"{method:<16} {label(rank):>7} {loss[method, rank, 'code']:>8.4f} "
            f"{loss[method, rank, 'prose']:>8.4f} {low / 2**20:>10.2f}Mi {low / full:>7.1%}"
        )


def plot(loss: Loss, ranks: list[int], out: Path) -> None:
    """Loss against rank per method and domain; each method's full rank as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.0, 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself to the figure; savefig renders with Agg
    colors = {"task_arithmetic": "tab:blue", "ties": "tab:red", "tsv": "tab:green"}
    for index, domain in enumerate(DOMAINS):
        axes = figure.add_subplot(1, len(DOMAINS), index + 1)
        for method in METHODS:
            color = colors[method]
            values = [loss[method, r, domain] for r in ranks]
            axes.plot(ranks, values, marker="o", markersize=3, color=color, label=method)
            axes.axhline(loss[method, FULL, domain], linestyle="--", color=color, alpha=0.6)
        axes.set_xscale("log", base=2)
        axes.set_xlabel("rank of each matrix's task vector (dashed: full)")
        axes.set_ylabel(f"held-out {domain} loss (nats/token)")
        axes.set_title(domain)
        axes.legend()
    figure.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2,4,8,16,32", help="comma-separated ranks")
    parser.add_argument("--samples", type=int, default=64, help="held-out windows per domain")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="ranks 1,4,16 and 16 windows")
    parser.add_argument("--plot", type=Path, help="write loss against rank here (PNG)")
    args = parser.parse_args()
    if args.quick:
        args.ranks, args.samples = "1,4,16", 16
    ranks = [int(r) for r in args.ranks.split(",")]
    quiet = api.RunOptions(progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        built = {
            (method, rank): str(
                api.run(parse_recipe(recipe(method, rank, Path(tmp))), quiet).out_dir
            )
            for method, rank in variants(ranks)
        }
        references = {"zoo:seed0": "zoo:seed0", **{e: e for e in EXPERTS}}
        report = api.evaluate(
            [*references, *built.values()],
            data=[f"builtin:{d}" for d in DOMAINS],
            max_length=args.max_length,
            samples=args.samples,
            progress=False,
        )
    loss = {
        (method, rank, d): report.result(path, f"builtin:{d}").loss
        for (method, rank), path in built.items()
        for d in DOMAINS
    }
    reference = {
        (name, FULL, d): report.result(name, f"builtin:{d}").loss
        for name in references
        for d in DOMAINS
    }
    print_table(loss, reference, ranks, args)
    if args.plot:
        plot(loss, ranks, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
