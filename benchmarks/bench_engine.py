"""Streaming merge vs loading whole models: wall time and peak memory, side by side in one run.

Builds two Llama-shaped bf16 checkpoints (random base + small deltas), then merges them with
`hfmerge run` and with the naive approach (load both state dicts, average, save), each in its own
process so peak RSS is measured per approach. Prints a table and the ratios.

    python benchmarks/bench_engine.py [--hidden 1024] [--layers 12] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from harness import LlamaShape, measure, write_model

NAIVE = """
import sys, torch
from safetensors.torch import load_file, save_file
a, b, out = sys.argv[1:4]
sa = load_file(a + "/model.safetensors"); sb = load_file(b + "/model.safetensors")
merged = {k: ((sa[k].float() + sb[k].float()) / 2).to(torch.bfloat16) for k in sa}
save_file(merged, out + "/model.safetensors")
"""

HFMERGE = """
import sys
from hfmerge import api, parse_recipe
a, b, out = sys.argv[1:4]
recipe = parse_recipe({"models": [a, b], "merge": {"method": "linear"}, "output": {"path": out}})
api.run(recipe, api.RunOptions(force=True, progress=False))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    heads = args.hidden // 64
    shape = LlamaShape(
        hidden=args.hidden,
        layers=args.layers,
        heads=heads,
        kv_heads=heads,
        intermediate=int(args.hidden * 2.75),
        vocab=args.vocab,
    )
    params = shape.parameters
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for seed, name in ((1, "a"), (2, "b")):
            write_model(root / name, shape, seed=seed)
        rows: dict[str, list[tuple[float, float]]] = {"hfmerge": [], "naive": []}
        for name in ("o1", "o2"):
            (root / name).mkdir()
        for _ in range(args.repeats):  # alternate so machine noise hits both alike
            rows["hfmerge"].append(measure(HFMERGE, root / "a", root / "b", root / "o1"))
            rows["naive"].append(measure(NAIVE, root / "a", root / "b", root / "o2"))
    print(
        f"linear merge of two {params / 1e6:.0f}M-parameter bf16 Llama checkpoints "
        f"({params * 2 / 1e9:.2f} GB each), best of {args.repeats}"
    )
    print(f"{'approach':<10} {'wall s':>8} {'peak RSS MiB':>13}")
    best = {k: (min(w for w, _ in v), min(r for _, r in v)) for k, v in rows.items()}
    for name, (wall, rss) in best.items():
        print(f"{name:<10} {wall:>8.2f} {rss:>13.0f}")
    print(
        f"ratio hfmerge/naive: wall {best['hfmerge'][0] / best['naive'][0]:.2f}x, "
        f"peak RSS {best['hfmerge'][1] / best['naive'][1]:.2f}x"
    )


if __name__ == "__main__":
    main()
