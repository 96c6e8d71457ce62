"""Routing vs merging on the zoo's code and prose specialists (both fine-tuned from zoo:seed0).

Per held-out domain: the loss of each expert, of a linear and a TIES merge, and of a routed model
per router (centroid, logistic, perplexity); each router's accuracy (held-out windows sent to the
expert of their domain); and the router's cost per input next to one expert forward pass.
Calibration uses the zoo's training text (`builtin:code-train`, `builtin:prose-train`); evaluation
uses held-out text no zoo model trained on.

    OMP_NUM_THREADS=1 python benchmarks/bench_route.py [--samples 128] [--max-length 128]

With `--adapter-memory`, instead: the memory a routed model holds once every expert has run, over
N LoRA adapters of zoo:seed0 (extracted at rank 8 from the code and prose specialists, repeated
to make N) against over N merged copies of the same experts.

    OMP_NUM_THREADS=1 python benchmarks/bench_route.py --adapter-memory [--experts 2 4 8]
"""

from __future__ import annotations

import argparse
import shutil
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


def held_bytes(path: Path) -> int:
    """Bytes a routed model holds once every expert has run: the parameters of the models in its
    pool, and its adapters' factors."""
    model = RoutedModel.from_pretrained(path, device_map="cpu")
    for name in model.experts:
        model.pool.get(model.pool_names.get(name, name))  # what running the expert loads
    params = sum(
        p.numel() * p.element_size()
        for name in model.pool.loaded
        for p in model.pool.get(name).parameters()
    )
    return params + sum(adapter.numel * 4 for adapter in model.adapters.values())  # float32


def run_recipe(recipe: dict[str, Any]) -> Path:
    """The output folder of a recipe run quietly."""
    out = api.run(parse_recipe(recipe), api.RunOptions(progress=False)).out_dir
    assert out is not None  # not a dry run
    return out


def adapter_memory(counts: list[int]) -> None:
    """The table: routed over N adapters vs over N merged copies, bytes held."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapters, merged = {}, {}
        for domain in DOMAINS:
            adapters[domain] = root / f"{domain}-lora"
            api.extract_lora(f"zoo:{domain}", "zoo:seed0", adapters[domain], rank=8, progress=False)
            alone = {"model": f"zoo:seed0+{adapters[domain]}", "weight": 1.0}
            recipe = {
                "models": [alone, {"model": "zoo:seed0", "weight": 0.0}],
                "merge": {"method": "linear"},
                "output": {"path": str(root / f"{domain}-merged")},
            }
            merged[domain] = run_recipe(recipe)
        rows = []
        for count in counts:
            domains = [DOMAINS[i % len(DOMAINS)] for i in range(count)]
            held = {}
            for kind, folders in (("adapters", adapters), ("merged", merged)):
                experts = []
                for i, domain in enumerate(domains):  # a folder per expert: N distinct experts
                    copy = root / f"n{count}-{kind}" / f"{domain}{i}"
                    shutil.copytree(folders[domain], copy)
                    experts.append(f"zoo:seed0+{copy}" if kind == "adapters" else str(copy))
                recipe = {
                    "models": experts,
                    "base": "zoo:seed0",
                    "probe": {"samples": 16, "max_length": 64},
                    "route": {
                        "method": "centroid",
                        "experts": [{"data": f"builtin:{d}-train"} for d in domains],
                    },
                    "output": {"path": str(root / f"n{count}-{kind}-routed")},
                }
                held[kind] = held_bytes(run_recipe(recipe))
            rows.append((count, held["adapters"], held["merged"]))
    print("routed model over N experts of zoo:seed0 (float32), every expert run once; MB held")
    print(f"{'N':>3} {'N adapters (r=8)':>17} {'N merged copies':>16} {'ratio':>7}")
    for count, over_adapters, over_copies in rows:
        print(
            f"{count:>3} {over_adapters / 1e6:>17.2f} {over_copies / 1e6:>16.2f} "
            f"{over_copies / over_adapters:>6.1f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128, help="windows per domain")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--adapter-memory", action="store_true", help="the adapter memory table")
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args()
    if args.adapter_memory:
        adapter_memory(args.experts)
        return
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
