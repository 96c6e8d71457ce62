"""`hfmerge extract-lora` on the zoo's code specialist: held-out loss and logits against rank.

Extracts adapters from zoo:code (fine-tuned from zoo:seed0) at several ranks and at full rank
(with `--modules-to-save`, so changed embeddings and norms travel whole), loads each with PEFT onto
zoo:seed0, and prints, per rank: the adapter's size, its largest logit difference from zoo:code on
held-out code, and the held-out code loss of BASE+ADAPTER (scored by `hfmerge eval`, which applies
the adapter on load). The loss should fall towards zoo:code's as the rank rises.

    OMP_NUM_THREADS=1 python benchmarks/bench_extract.py [--ranks 1,4,16,64] [--samples 64]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from hfmerge import api
from hfmerge.zoo import zoo_model

DATA = "builtin:code"  # held out: no zoo model trained on it
FULL_RANK = 1 << 20  # clamped to each matrix's smaller side: every direction kept


def max_logit_difference(base: Path, adapter: Path, fine_tune: Path, max_length: int) -> float:
    """Largest |logit| difference between PEFT's base+adapter and the fine-tune on code."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfmerge.lm.textdata import load_texts

    tokenizer = AutoTokenizer.from_pretrained(fine_tune)
    text = load_texts(DATA)[0]
    ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length).input_ids
    tuned = AutoModelForCausalLM.from_pretrained(fine_tune)  # in eval mode, as loaded
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    with torch.no_grad():
        return float((adapted(ids).logits - tuned(ids).logits).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,4,16,64", help="comma-separated ranks (full added)")
    parser.add_argument("--samples", type=int, default=64, help="held-out windows scored")
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()] + [FULL_RANK]
    base, fine_tune = zoo_model("seed0"), zoo_model("code")
    score = {"samples": args.samples, "max_length": args.max_length, "progress": False}
    reference = api.evaluate([str(base), str(fine_tune)], data=DATA, **score)
    print(f"{'rank':>6} {'adapter MiB':>12} {'max |logit diff|':>17} {'code loss':>10}")
    with tempfile.TemporaryDirectory() as scratch:
        for rank in ranks:
            out = Path(scratch) / f"rank-{rank}"
            full = rank == FULL_RANK
            api.extract_lora(
                str(fine_tune), str(base), out, rank=rank, modules_to_save=full, progress=False
            )
            size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
            diff = max_logit_difference(base, out, fine_tune, args.max_length)
            adapted = f"{base}+{out}"
            loss = api.evaluate(adapted, data=DATA, **score).result(adapted, DATA).loss
            print(f"{'full' if full else rank:>6} {size:>12.2f} {diff:>17.2e} {loss:>10.4f}")
    for ref, name in ((base, "zoo:seed0 (base)"), (fine_tune, "zoo:code (fine-tune)")):
        print(f"{name:<22} code loss {reference.result(str(ref), DATA).loss:.4f}")


if __name__ == "__main__":
    main()
