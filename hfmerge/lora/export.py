"""The files beside an extracted adapter's weights: `adapter_config.json` (PEFT's), and a model
card with the base in its front matter and the table of per-tensor ranks and kept energy."""

from __future__ import annotations

from collections import Counter
from typing import Any

from hfmerge.lora.extract import Extraction, module_of
from hfmerge.lora.factor import RankChoice

_KIND_NOTES = {"lora": "LoRA", "saved": "saved whole", "skipped": "left out"}


def adapter_config(extraction: Extraction, *, base_model: str, conv1d: bool) -> dict[str, Any]:
    """PEFT's `adapter_config.json` for `extraction`: alpha = r for every module (scale 1),
    the most common rank as `r` and the others in `rank_pattern` / `alpha_pattern`."""
    ranks = {module_of(t.name): t.rank for t in extraction.lora}
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    others = {module: rank for module, rank in ranks.items() if rank != r}
    leaves = sorted({module.rpartition(".")[2] for module in ranks})
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "target_modules": leaves,
        "modules_to_save": list(extraction.modules_to_save) or None,
        "fan_in_fan_out": conv1d,
        "bias": "lora_only" if extraction.lora_biases else "none",
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def rank_table(extraction: Extraction) -> str:
    """A Markdown table of every changed tensor: a LoRA pair (its rank), saved whole
    (`modules_to_save`) or left out (changed, but not a linear weight), and the share of its
    delta's energy the adapter keeps."""
    lines = ["| tensor | shape | as | rank | energy kept |", "|---|---|---|---:|---:|"]
    for row in extraction.tensors:
        if row.kind == "unchanged":
            continue
        shape = "×".join(str(d) for d in row.shape) or "scalar"
        rank = str(row.rank) if row.kind == "lora" else "-"
        kept = f"{100 * row.energy:.2f}%"
        lines.append(f"| {row.name} | {shape} | {_KIND_NOTES[row.kind]} | {rank} | {kept} |")
    return "\n".join(lines)


def describe_choice(choice: RankChoice) -> str:
    """How the ranks were chosen, in words."""
    if choice.energy is not None:
        return f"the smallest rank keeping {100 * choice.energy:g}% of each delta's energy"
    return f"rank {choice.rank} (or the full rank of a smaller matrix)"


def render_adapter_card(
    extraction: Extraction,
    *,
    title: str,
    base_model: str,
    model: str,
    choice: RankChoice,
) -> str:
    """README.md of an extracted adapter: front matter, how to load it, and the rank table."""
    import yaml

    front = {
        "base_model": base_model,
        "base_model_relation": "adapter",
        "library_name": "peft",
        "tags": ["hfmerge", "lora", "extracted-lora"],
    }
    matter = yaml.safe_dump(front, sort_keys=False, allow_unicode=True)
    snippet = (
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n\n"
        f"base = AutoModelForCausalLM.from_pretrained({base_model!r})\n"
        f"model = PeftModel.from_pretrained(base, {title!r})"
    )
    return (
        f"---\n{matter}---\n\n# {title}\n\n"
        f"A LoRA adapter extracted by hfmerge (`hfmerge extract-lora`) from `{model}`, a "
        f"fine-tune of `{base_model}`: each linear weight's difference from the base, factored "
        f"by SVD at {describe_choice(choice)}. The energy kept is the share of the difference's "
        "squared Frobenius norm that the adapter reproduces.\n\n"
        f"```python\n{snippet}\n```\n\n## Ranks\n\n{rank_table(extraction)}\n"
    )
