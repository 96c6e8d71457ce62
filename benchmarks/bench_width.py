"""Barrier against width: the zoo's seed pair trained at several widths, aligned three ways.

    OMP_NUM_THREADS=1 python benchmarks/bench_width.py [--quick] [--widths 16,32,64,128,256]
        [--steps 300] [--pairs llama] [--samples 64] [--plot width.png] [--json width.json]

Entezari et al. (ICLR 2022) conjecture that once permutation symmetry is taken into account, SGD
solutions are linearly connected, and find that the barrier between two of them shrinks as the
network widens. For each width the zoo's two seeds (zoo:seed0 / zoo:seed1, and with `--pairs gpt2`
the GPT-2 pair) are trained with `ZooConfig.with_width`: the same depth, heads, data, tokenizer,
steps and learning rates, FF at the same multiple of the width. Each pair's loss barrier is then
measured with no alignment, with weight matching and with weight matching plus REPAIR, scored on
the held-out built-in prose; REPAIR reads the seeds' training prose, never the scored text.
Members are cached like the zoo's own (`$HFMERGE_CACHE/zoo/<config hash>/`), so a rerun only
measures; width 128 of the default config is the default zoo itself.

`--quick` starts from the tiny zoo config (2 layers, 120 steps, small vocabulary) at widths
16, 32 and 64 with 16 scored windows: a smoke run of a minute or so, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hfmerge import api

# Internal on purpose: the plot is written the way the CLI writes its own.
from hfmerge.analysis.plotting import save_figure
from hfmerge.errors import OptionError
from hfmerge.tensors import read_checkpoint_index
from hfmerge.zoo import ZooConfig, zoo_model

PROBE_DATA = "builtin:prose-train"  # the seeds' training text; the scored text stays held out
ALIGNS = ("none", "weight", "weight+repair")
# family -> (zoo member A, zoo member B): same architecture and data, seeds 0 and 1
PAIRS: dict[str, tuple[str, str]] = {
    "llama": ("seed0", "seed1"),
    "gpt2": ("gpt2-seed0", "gpt2-seed1"),
}
FULL_WIDTHS = (16, 32, 64, 128, 256)
QUICK_WIDTHS = (16, 32, 64)


@dataclass(frozen=True)
class WidthRow:
    """One seed pair at one width: its size, endpoint losses and barrier per alignment mode."""

    family: str
    width: int
    params: int
    loss_a: float
    loss_b: float
    barrier: dict[str, float]  # alignment mode -> barrier (nats)
    loss_mid: dict[str, float]  # alignment mode -> loss of the averaged model
    seconds: float  # training (on a cache miss) and measuring


def parameter_count(model_dir: Path) -> int:
    """Elements over every tensor of the checkpoint, read from its headers."""
    return sum(info.numel for info in read_checkpoint_index(model_dir))


def measure(family: str, config: ZooConfig, samples: int, *, progress: bool) -> WidthRow:
    """Train (or find cached) the family's seed pair at `config`'s width; measure its barriers."""
    start = time.perf_counter()
    path_a, path_b = (zoo_model(name, config=config, progress=progress) for name in PAIRS[family])
    results = api.barrier(
        str(path_a),
        str(path_b),
        align=ALIGNS,
        probe_data=PROBE_DATA,
        samples=samples,
        progress=False,
    ).results
    return WidthRow(
        family=family,
        width=config.hidden_size,
        params=parameter_count(path_a),
        loss_a=results[0].loss_a,
        loss_b=results[0].loss_b,
        barrier={r.align: r.barrier for r in results},
        loss_mid={r.align: r.loss_mid for r in results},
        seconds=time.perf_counter() - start,
    )


def ratio(row: WidthRow, align: str) -> float:
    """The barrier under `align` as a fraction of the unaligned one."""
    vanilla = row.barrier["none"]
    return row.barrier[align] / vanilla if vanilla > 0 else math.nan


def print_header() -> None:
    """The table's column names."""
    print(
        f"{'pair':<6} {'width':>5} {'params':>9} {'loss A':>7} {'loss B':>7} {'none':>7} "
        f"{'weight':>7} {'w+REPAIR':>8} {'weight/none':>11} {'w+R/none':>8} {'s':>5}"
    )


def print_row(row: WidthRow) -> None:
    """One table line (barriers in nats; ratios against no alignment)."""
    b = row.barrier
    print(
        f"{row.family:<6} {row.width:>5} {row.params:>9,} {row.loss_a:>7.3f} {row.loss_b:>7.3f} "
        f"{b['none']:>7.3f} {b['weight']:>7.3f} {b['weight+repair']:>8.3f} "
        f"{ratio(row, 'weight'):>10.2f}x {ratio(row, 'weight+repair'):>7.2f}x {row.seconds:>5.0f}",
        flush=True,  # a row can take minutes: show it as soon as it is measured
    )


def print_trend(rows: list[WidthRow]) -> None:
    """Per pair: each mode's barrier and its ratio to no alignment, narrowest against widest."""
    for family in dict.fromkeys(r.family for r in rows):
        own = [r for r in rows if r.family == family]
        narrow, wide = own[0], own[-1]
        print(f"{family}: width {narrow.width} -> {wide.width}")
        for align in ALIGNS:
            change = (
                wide.barrier[align] / narrow.barrier[align] if narrow.barrier[align] else math.nan
            )
            line = (
                f"  {align:<14} barrier {narrow.barrier[align]:.3f} -> "
                f"{wide.barrier[align]:.3f} ({change:.2f}x)"
            )
            if align != "none":
                line += f"; vs none {ratio(narrow, align):.2f}x -> {ratio(wide, align):.2f}x"
            print(line)


def plot(rows: list[WidthRow], out: Path, *, title: str) -> Path:
    """Barrier against width (log2 axis): one line per alignment mode, one style per pair."""
    figure = Figure(figsize=(7.0, 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself to the figure; savefig then renders with Agg
    axes = figure.add_subplot()
    colors = dict(zip(ALIGNS, ("tab:red", "tab:blue", "tab:green"), strict=True))
    families = list(dict.fromkeys(r.family for r in rows))
    for family, style in zip(families, ("-", "--"), strict=False):
        own = [r for r in rows if r.family == family]
        for align in ALIGNS:
            axes.plot(
                [r.width for r in own],
                [r.barrier[align] for r in own],
                marker="o",
                linestyle=style,
                color=colors[align],
                label=f"{family}: {align}" if len(families) > 1 else f"align={align}",
            )
    axes.set_xscale("log", base=2)
    widths = sorted({r.width for r in rows})
    axes.set_xticks(widths, labels=[str(w) for w in widths])
    axes.set_xlabel("width (hidden size)")
    axes.set_ylabel("loss barrier (nats)")
    axes.set_ylim(bottom=0.0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    axes.set_title(title, fontsize="medium")
    return save_figure(figure, out)


def widths_arg(text: str) -> tuple[int, ...]:
    """`32,64,128` -> (32, 64, 128), sorted and without repeats."""
    try:
        widths = sorted({int(w) for w in text.split(",") if w.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of integers: {text!r}") from None
    if len(widths) < 2:
        raise argparse.ArgumentTypeError("give at least two widths")
    return tuple(widths)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny config, widths 16,32,64")
    parser.add_argument("--widths", type=widths_arg, help="comma list (default 16,32,64,128,256)")
    parser.add_argument("--steps", type=int, help="pretraining steps (default: the config's)")
    parser.add_argument("--pairs", default="llama", help=f"comma list of {sorted(PAIRS)}")
    parser.add_argument("--samples", type=int, help="scored windows (default 64; quick 16)")
    parser.add_argument("--plot", type=Path, help="write barrier against width here (PNG)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--quiet", action="store_true", help="no training progress on stderr")
    args = parser.parse_args(argv)
    args.pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    unknown = sorted(set(args.pairs) - set(PAIRS))
    if unknown:
        parser.error(f"unknown pair {unknown}; choose from {sorted(PAIRS)}")
    base = ZooConfig.tiny() if args.quick else ZooConfig()
    if args.steps is not None:
        base = replace(base, pretrain_steps=args.steps)
    args.widths = args.widths or (QUICK_WIDTHS if args.quick else FULL_WIDTHS)
    try:
        args.configs = [base.with_width(w) for w in args.widths]
    except OptionError as error:
        parser.error(str(error))
    args.samples = args.samples or (16 if args.quick else 64)
    return args


def main(argv: list[str] | None = None) -> None:
    """Measure every width, print the table and the trend, write the plot and JSON if asked."""
    args = parse_args(argv)
    base = args.configs[0]
    print(
        f"depth {base.num_layers}, heads {base.num_heads} (KV {base.num_kv_heads}), "
        f"{base.pretrain_steps} steps x batch {base.batch_size} x {base.context} tokens; "
        f"scored on builtin ({args.samples} windows), REPAIR probes from {PROBE_DATA}"
    )
    print_header()
    rows = []
    for family in args.pairs:
        for config in args.configs:
            rows.append(measure(family, config, args.samples, progress=not args.quiet))
            print_row(rows[-1])
    print_trend(rows)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    if args.plot:
        title = f"Loss barrier against width ({base.pretrain_steps} steps, depth {base.num_layers})"
        print(f"plot: {plot(rows, args.plot, title=title)}")


if __name__ == "__main__":
    main()
