"""The model card (README.md) of a merged model: Hub metadata, inputs, method, recipe, loading."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from hfmerge.methods import MergeMethod
from hfmerge.preflight import InspectedModel

# Head class suffix in config.architectures -> the transformers Auto class that loads it.
_AUTO_CLASSES = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
)


def auto_class_name(config: Mapping[str, Any]) -> str:
    """The `transformers` Auto class that loads a model with this config."""
    architectures = config.get("architectures") or [""]
    for suffix, auto in _AUTO_CLASSES:
        if str(architectures[0]).endswith(suffix):
            return auto
    return "AutoModel"


def load_snippet(config: Mapping[str, Any], location: str) -> str:
    """Python lines that load the model at `location` (a path or a Hub id)."""
    auto = auto_class_name(config)
    return (
        f"from transformers import {auto}, AutoTokenizer\n"
        f"model = {auto}.from_pretrained({location!r})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({location!r})"
    )


def render_card(
    *,
    title: str,
    method: MergeMethod,
    base: InspectedModel,
    inputs: Sequence[InspectedModel],
    params: Mapping[str, Any],
    input_params: Sequence[Mapping[str, Any]],
    recipe_text: str,
) -> str:
    """The whole README.md: YAML front matter for the Hub, then the body."""
    sections = [
        f"# {title}",
        f"This model is a merge made with hfmerge using **{method.name}** "
        f"([paper]({method.paper})): {method.summary}",
        "## Inputs\n\n" + _inputs_table(base, inputs, input_params),
        "## Method\n\n" + _method_section(method, params),
        "## Recipe\n\n```yaml\n" + recipe_text.rstrip() + "\n```",
        "## Use\n\n```python\n" + load_snippet(base.config, "PATH_OR_REPO_ID") + "\n```",
    ]
    return _front_matter(base, inputs) + "\n" + "\n\n".join(sections) + "\n"


def _front_matter(base: InspectedModel, inputs: Sequence[InspectedModel]) -> str:
    hub_ids = [m.source.hub_id for m in [base, *inputs] if m.source.hub_id]
    meta: dict[str, Any] = {}
    if hub_ids:
        meta["base_model"] = list(dict.fromkeys(hub_ids))
    meta.update(
        {
            "base_model_relation": "merge",
            "library_name": "transformers",
            "tags": ["merge", "hfmerge"],
        }
    )
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _inputs_table(
    base: InspectedModel,
    inputs: Sequence[InspectedModel],
    input_params: Sequence[Mapping[str, Any]],
) -> str:
    rows = ["| model | role | revision | parameters |", "|---|---|---|---|"]
    if not any(model is base for model in inputs):
        rows.append(_input_row(base, "base", {}))
    for model, model_params in zip(inputs, input_params, strict=True):
        rows.append(_input_row(model, "base, input" if model is base else "input", model_params))
    return "\n".join(rows)


def _input_row(model: InspectedModel, role: str, model_params: Mapping[str, Any]) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in model_params.items()) or "–"
    revision = model.source.revision or "local files"
    return f"| `{model.name}` | {role} | {revision} | {shown} |"


def _method_section(method: MergeMethod, params: Mapping[str, Any]) -> str:
    lines = [f"- method: `{method.name}` — {method.summary}", f"- paper: {method.paper}"]
    lines += [f"- `{key}`: {value}" for key, value in params.items()]
    return "\n".join(lines)
