"""Streaming merge vs loading whole models: wall time and peak memory, side by side in one run.

Builds two Llama-shaped bf16 checkpoints (random base + small deltas), then merges them with
`hfmerge run` and with the naive approach (load both state dicts, average, save), each in its own
process so peak RSS is measured per approach. Prints a table and the ratios.

    python benchmarks/bench_engine.py [--hidden 1024] [--layers 12] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from harness import measure

from hfmerge.tensors import ShardWriter, TensorSpec, plan_shards


def llama_shapes(hidden: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Llama checkpoint (MHA, FF = 2.75x hidden)."""
    ff = int(hidden * 2.75)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (ff, hidden)
        shapes[p + "mlp.up_proj.weight"] = (ff, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, ff)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_model(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    *,
    seed: int,
    hidden: int,
    layers: int,
    vocab: int,
) -> None:
    """A checkpoint written tensor by tensor (base weights from seed 0, plus seed's deltas)."""
    specs = [TensorSpec(name=n, dtype="BF16", shape=s) for n, s in shapes.items()]
    plan = plan_shards(specs, max_shard_bytes=2 * 10**9)
    path.mkdir(parents=True)
    with ShardWriter(path, plan) as writer:
        for index, (name, shape) in enumerate(shapes.items()):
            base = torch.randn(shape, generator=torch.Generator().manual_seed(index)) * 0.02
            delta = torch.randn(
                shape, generator=torch.Generator().manual_seed(10**6 * seed + index)
            )
            writer.write(name, (base + 0.002 * delta).to(torch.bfloat16))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(hidden * 2.75),
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }
    (path / "config.json").write_text(json.dumps(config))


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
from hfmerge.recipe import parse_recipe
from hfmerge.pipeline import run_recipe
a, b, out = sys.argv[1:4]
recipe = parse_recipe({"models": [a, b], "merge": {"method": "linear"}, "output": {"path": out}})
run_recipe(recipe, out_dir=out, force=True, progress=False)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    shapes = llama_shapes(args.hidden, args.layers, args.vocab)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for seed, name in ((1, "a"), (2, "b")):
            write_model(
                root / name,
                shapes,
                seed=seed,
                hidden=args.hidden,
                layers=args.layers,
                vocab=args.vocab,
            )
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
