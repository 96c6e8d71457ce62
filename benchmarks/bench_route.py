"""Routing vs merging on the zoo's code and prose specialists (both fine-tuned from zoo:seed0).

Per held-out domain: the loss of each expert, of a linear and a TIES merge, and of a routed model
per router (centroid, logistic, perplexity); each router's accuracy (held-out windows sent to the
expert of their domain); and the router's cost per input next to one expert forward pass.
Calibration uses the zoo's training text (`builtin:code-train`, `builtin:prose-train`); evaluation
uses held-out text no zoo model trained on.

    OMP_NUM_THREADS=1 python benchmarks/bench_route.py [--samples 128] [--max-length 128]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hfmerge import RoutedModel, api, parse_recipe

# Internal on purpose: the router's cost per window is timed against one expert's forward pass on
# the very same token windows, which needs the probe-window helpers and a bare expert model.
from hfmerge.lm.batches import model_inputs, pad_id_of
from hfmerge.lm.load import load_lm
from hfmerge.lm.textdata import load_texts, token_windows

DOMAINS = ("code", "prose")
ROUTERS = ("centroid", "logistic", "perplexity")
EXPERTS = [f"zoo:{d}" for d in DOMAINS]


def recipes(out: Path, samples: int, max_length: int) -> dict[str, dict[str, Any]]:
    """Name -> recipe: two merges and one routed model per router."""
    merged: dict[str, dict[str, Any]] = {
        "linear merge": {"models": EXPERTS, "merge": {"method": "linear"}},
        "TIES merge": {
            "models": [{"model": m, "density": 0.5} for m in EXPERTS],
            "base": "zoo:seed0",
            "merge": {"method": "ties", "parameters": {"normalize": True}},
        },
    }
    for method in ROUTERS:
        merged[f"routed ({method})"] = {
            "models": EXPERTS,
            "base": "zoo:seed0",
            "probe": {"samples": samples, "max_length": max_length},
            "route": {
                "method": method,
                "experts": [{"data": f"builtin:{d}-train"} for d in DOMAINS],
            },
        }
    for name, recipe in merged.items():
        recipe["output"] = {"path": str(out / name.replace(" ", "_").strip("()"))}
    return merged


def windows_of(tokenizer: Any, domain: str, samples: int, max_length: int) -> list[torch.Tensor]:
    return token_windows(
        tokenizer, load_texts(f"builtin:{domain}"), max_length=max_length, samples=samples
    )


def per_window_seconds(
    step: Callable[[dict[str, torch.Tensor]], object],
    windows: list[torch.Tensor],
    pad_id: int,
    batch_size: int = 8,
) -> float:
    batches = [
        model_inputs(windows[i : i + batch_size], pad_id=pad_id)
        for i in range(0, len(windows), batch_size)
    ]
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            step(batch)
    return (time.perf_counter() - start) / len(windows)


def routing_stats(path: Path, samples: int, max_length: int) -> tuple[float, float, float]:
    """(accuracy on held-out windows, router seconds per window, expert seconds per window)."""
    model = RoutedModel.from_pretrained(path, device_map="cpu")
    pad = pad_id_of(model.tokenizer)
    right = total = 0
    all_windows = []
    for label, domain in enumerate(DOMAINS):
        windows = windows_of(model.tokenizer, domain, samples, max_length)
        all_windows += windows
        for i in range(0, len(windows), 16):
            batch = model_inputs(windows[i : i + 16], pad_id=pad)
            routes = model.route_ids(batch["input_ids"], batch["attention_mask"])
            right += int((routes == label).sum())
            total += len(routes)
    router_s = per_window_seconds(
        lambda b: model.route_ids(b["input_ids"], b["attention_mask"]), all_windows, pad
    )
    expert = load_lm(Path(model.pool.models["code"].path), label="code")
    expert_s = per_window_seconds(lambda b: expert(**b), all_windows, pad)
    return right / total, router_s, expert_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128, help="windows per domain")
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        quiet = api.RunOptions(progress=False)
        built = {
            name: api.run(parse_recipe(r), quiet).out_dir
            for name, r in recipes(Path(tmp), args.samples, args.max_length).items()
        }
        models: dict[str, str] = {
            **{e: e for e in EXPERTS},
            **{n: str(p) for n, p in built.items()},
        }
        report = api.evaluate(
            list(models.values()),
            data=[f"builtin:{d}" for d in DOMAINS],
            max_length=args.max_length,
            samples=args.samples,
            batch_size=8,
            progress=False,
        )
        loss = {
            (name, d): report.result(ref, f"builtin:{d}").loss
            for name, ref in models.items()
            for d in DOMAINS
        }
        stats = {
            name: routing_stats(Path(models[name]), args.samples, args.max_length)
            for name in models
            if name.startswith("routed")
        }
    print_table(loss, stats, args)


def print_table(
    loss: dict[tuple[str, str], float],
    stats: dict[str, tuple[float, float, float]],
    args: argparse.Namespace,
) -> None:
    print(
        f"zoo code/prose specialists, {args.samples} held-out windows x {args.max_length} "
        "tokens per domain, CPU; loss in nats/token"
    )
    print(f"{'model':<22} {'code':>8} {'prose':>8} {'routing acc':>12} {'router/expert':>14}")
    best = {d: min(loss[e, d] for e in EXPERTS) for d in DOMAINS}
    names = list(dict.fromkeys(name for name, _ in loss))
    for name in names:
        acc, router_s, expert_s = stats.get(name, (float("nan"),) * 3)
        extra = (
            f"{acc:>12.1%} {router_s / expert_s:>13.2f}x" if name in stats else f"{'':>12} {'':>14}"
        )
        print(f"{name:<22} {loss[name, 'code']:>8.4f} {loss[name, 'prose']:>8.4f} {extra}")
    merges = [n for n in names if "merge" in n]
    for name in stats:
        gaps = ", ".join(f"{d} {loss[name, d] / best[d] - 1:+.1%}" for d in DOMAINS)
        below = all(loss[name, d] < loss[m, d] for m in merges for d in DOMAINS)
        print(
            f"{name}: vs the better expert {gaps}; below both merges on both domains: "
            f"{'yes' if below else 'no'}"
        )


if __name__ == "__main__":
    main()
