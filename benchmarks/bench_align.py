"""Alignment benchmark: loss barriers of the zoo's seed pair, and weight-matching cost at BERT-base.

    python benchmarks/bench_align.py [--samples 64] [--skip-bert]

Part 1 prints barrier and midpoint loss for none / activation / weight alignment between
zoo:seed0 and zoo:seed1 (built on first use). Part 2 times weight matching on two randomly
initialised BERT-base-sized models (12 layers, width 768, 12 heads, FF 3072) and reports the
process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch


def barrier_table(samples: int) -> None:
    """Barrier and midpoint loss per alignment mode on the zoo's two seeds."""
    from hfmerge.barrier import compare_barriers

    start = time.perf_counter()
    results = compare_barriers(
        "zoo:seed0", "zoo:seed1", aligns=("none", "activation", "weight"), samples=samples
    )
    print(
        f"zoo:seed0 vs zoo:seed1 (Llama-style, builtin prose probe, {samples} windows), "
        f"{time.perf_counter() - start:.0f} s"
    )
    print(f"{'align':<11} {'barrier':>8} {'midpoint':>9} {'vs none':>8}")
    vanilla = results[0].barrier
    for result in results:
        print(
            f"{result.align:<11} {result.barrier:>8.3f} {result.loss_mid:>9.3f} "
            f"{result.barrier / vanilla:>7.2f}x"
        )


def bert_base_timing() -> None:
    """Wall time and peak RSS of weight matching on a random BERT-base-sized pair."""
    from transformers import BertConfig, BertModel

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
    parser.add_argument("--skip-bert", action="store_true")
    args = parser.parse_args()
    barrier_table(args.samples)
    if not args.skip_bert:
        bert_base_timing()


if __name__ == "__main__":
    main()
