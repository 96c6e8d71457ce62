"""Alignment benchmark: loss barriers of the zoo's seed pairs; weight-matching cost at BERT-base.

    python benchmarks/bench_align.py [--samples 64] [--pairs llama,llama-w64,gpt2] [--skip-bert]
        [--orders N]

Part 1 prints barrier and midpoint loss for none / activation / weight alignment, weight
alignment with REPAIR, and orthogonal residual alignment (weight+orthogonal, the same with
REPAIR, activation+orthogonal, learned), between the two seeds of each zoo family (built on first
use): Llama-style zoo:seed0 / zoo:seed1 and GPT-2-style zoo:gpt2-seed0 /
zoo:gpt2-seed1, same width, depth and data; and a second Llama-style pair trained apart, the
same seeds at width 64 (`ZooConfig.with_width`, as benchmarks/bench_width.py trains them), which
`learned`'s step count and learning rate were not tuned on.
Losses are scored on the held-out built-in prose; activation matching and REPAIR statistics read
the zoo's prose training text (`--probe-data builtin:prose-train`), never the scored text.
Part 2 times weight matching on two randomly initialised BERT-base-sized models (12 layers,
width 768, 12 heads, FF 3072) and reports the process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

PROBE_DATA = "builtin:prose-train"  # the seeds' training text; the scored text stays held out
# family -> (model A, model B, what it is)
PAIRS: dict[str, tuple[str, str, str]] = {
    "llama": ("zoo:seed0", "zoo:seed1", "Llama-style: RoPE, GQA, SwiGLU, RMSNorm"),
    "llama-w64": ("seed0", "seed1", "Llama-style at width 64, the zoo config's other width"),
    "gpt2": ("zoo:gpt2-seed0", "zoo:gpt2-seed1", "GPT-2-style: learned positions, GELU, LayerNorm"),
}
WIDTHS = {"llama-w64": 64}  # pairs trained at another width of the zoo config: their members
MODES = ("none", "activation", "weight", "weight+repair")
ORTHOGONAL = ("weight+orthogonal", "weight+orthogonal+repair", "activation+orthogonal", "learned")


def pair_refs(family: str) -> tuple[str, str]:
    """The pair's two model references; a pair at another width is trained (or found cached)."""
    model_a, model_b, _ = PAIRS[family]
    if family not in WIDTHS:
        return model_a, model_b
    from hfmerge.zoo import ZooConfig, zoo_model

    config = ZooConfig().with_width(WIDTHS[family])
    path_a, path_b = (zoo_model(m, config=config, progress=False) for m in (model_a, model_b))
    return str(path_a), str(path_b)


def barrier_table(pairs: list[str], samples: int) -> None:
    """Barrier and midpoint loss per alignment mode on each zoo seed pair."""
    from hfmerge import api

    print(f"{'pair':<32} {'align':<18} {'barrier':>8} {'midpoint':>9} {'vs none':>8} {'s':>5}")
    for family in pairs:
        model_a, model_b, what = PAIRS[family]
        ref_a, ref_b = pair_refs(family)
        if family in WIDTHS:
            model_a, model_b = (f"zoo:{m}@{WIDTHS[family]}" for m in (model_a, model_b))
        start = time.perf_counter()
        results = api.barrier(
            ref_a,
            ref_b,
            align=MODES + ORTHOGONAL,
            probe_data=PROBE_DATA,
            samples=samples,
            progress=False,
        ).results
        seconds = time.perf_counter() - start
        vanilla = results[0].barrier
        for result in results:
            print(
                f"{model_a + ' / ' + model_b:<32} {result.align:<18} {result.barrier:>8.3f} "
                f"{result.loss_mid:>9.3f} {result.barrier / vanilla:>7.2f}x {seconds:>5.0f}"
            )
        print(f"  ({what}; scored on builtin, probes from {PROBE_DATA}, {samples} windows)")


def order_spread(pairs: list[str], samples: int, orders: int) -> None:
    """Barrier per visit order of weight matching (its `seed`), for `weight` and
    `weight+orthogonal`: coordinate ascent ends in a different local optimum per order."""
    # Internal on purpose: `hfmerge barrier` always uses seed 0.
    from hfmerge.align.apply import align_basis
    from hfmerge.analysis.barrier import compare_barriers
    from hfmerge.api.references import resolve

    print(f"\n{'pair':<32} {'align':<18} barrier per visit order (seed 0..{orders - 1})")
    for family in pairs:
        model_a, model_b, _ = PAIRS[family]
        a, b = (resolve(ref, progress=False) for ref in pair_refs(family))
        for mode in ("weight", "weight+orthogonal"):
            barriers = []
            for seed in range(orders):
                basis = align_basis(mode, a, b, seed=seed)
                (curve,) = compare_barriers(
                    a,
                    b,
                    aligns=[mode],
                    steps=3,  # the barrier of these pairs sits at λ = 0.5
                    probe_data=PROBE_DATA,
                    samples=samples,
                    progress=False,
                    solved={mode: basis},
                )
                barriers.append(curve.barrier)
            shown = " ".join(f"{v:.3f}" for v in barriers)
            print(
                f"{model_a + ' / ' + model_b:<32} {mode:<18} {shown}  (range {min(barriers):.3f}-"
                f"{max(barriers):.3f})"
            )


def bert_base_timing() -> None:
    """Wall time and peak RSS of weight matching on a random BERT-base-sized pair."""
    from transformers import BertConfig, BertModel

    # Internal on purpose: it times weight matching alone, on state dicts already in memory.
    from hfmerge.align import weight_matching
    from hfmerge.arch import spec_for

    config = BertConfig()  # 12 layers, hidden 768, 12 heads, FF 3072
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(BertModel(config).state_dict())
    spec = spec_for(config.to_dict(), list(models[0]))
    start = time.perf_counter()
    result = weight_matching(spec, models[0], models[1], seed=0, progress=True)
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"weight matching, BERT-base pair: {wall:.1f} s, {result.iterations} sweeps, "
        f"peak RSS {rss:.0f} MiB (process total)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--pairs", default=",".join(PAIRS), help="comma list of zoo families")
    parser.add_argument("--skip-bert", action="store_true")
    parser.add_argument(
        "--orders", type=int, default=0, help="also the barrier over N visit orders (seeds)"
    )
    args = parser.parse_args()
    pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    unknown = sorted(set(pairs) - set(PAIRS))
    if unknown:
        parser.error(f"unknown pair {unknown}; choose from {sorted(PAIRS)}")
    barrier_table(pairs, args.samples)
    if args.orders > 0:
        order_spread(pairs, args.samples, args.orders)
    if not args.skip_bert:
        bert_base_timing()


if __name__ == "__main__":
    main()
