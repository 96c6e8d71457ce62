"""The model card (README.md) of a merged model: Hub metadata, inputs, method, recipe, loading.

Hub inputs are linked at the commits they were pinned to, so the card says exactly what was merged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from hfmerge.arch.heads import auto_class_name
from hfmerge.methods import MergeMethod
from hfmerge.sources.inspection import InspectedModel
from hfmerge.sources.refs import ModelSource

# Auto class -> the Hub's pipeline tag for it.
_PIPELINE_TAGS = {
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForMaskedLM": "fill-mask",
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForQuestionAnswering": "question-answering",
    "AutoModelForImageClassification": "image-classification",
    "AutoModelForSeq2SeqLM": "text2text-generation",
    "AutoModelForImageTextToText": "image-text-to-text",
}
REPO_PLACEHOLDER = "PATH_OR_REPO_ID"  # in the card's loading snippet when no repo id is known
DEFAULT_ENDPOINT = "https://huggingface.co"
NO_TOKENIZER_NOTE = (
    "# No tokenizer: the base model had none. Copy the tokenizer files of the model it was "
    "trained with\n# (tokenizer.json, tokenizer_config.json, ...) beside the weights to load one."
)


def load_snippet(config: Mapping[str, Any], location: str, *, tokenizer: bool = True) -> str:
    """Python lines that load the model at `location` (a path or a Hub id).

    With `tokenizer=False` (an output whose base had no tokenizer files) the lines load the
    model alone and say how to add a tokenizer, instead of a load that would fail.
    """
    auto = auto_class_name(config)
    if not tokenizer:
        return (
            f"from transformers import {auto}\n"
            f"model = {auto}.from_pretrained({location!r})\n"
            f"{NO_TOKENIZER_NOTE}"
        )
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
    repo_id: str | None = None,
    endpoint: str = DEFAULT_ENDPOINT,
    extra_sections: Sequence[str] = (),
    tokenizer: bool = True,
) -> str:
    """The whole README.md: YAML front matter for the Hub, then the body.

    `repo_id` (where the model will be pushed) goes into the loading snippet; `endpoint` is the
    Hub that Hub inputs are linked on; `extra_sections` (markdown, e.g. the alignment report) go
    after the method; `tokenizer` says whether the output has one (`load_snippet`).
    """
    location = repo_id or REPO_PLACEHOLDER
    sections = [
        f"# {title}",
        f"This model is a merge made with hfmerge using **{method.name}** "
        f"([paper]({method.paper})): {method.summary}",
        "## Inputs\n\n" + _inputs_table(base, inputs, input_params, endpoint=endpoint),
        "## Method\n\n" + _method_section(method, params),
        *extra_sections,
        "## Recipe\n\nEvery Hub model is pinned to the commit that was merged, so running this "
        "recipe again reproduces the same inputs.\n\n```yaml\n" + recipe_text.rstrip() + "\n```",
        "## Use\n\n```python\n"
        + load_snippet(base.config, location, tokenizer=tokenizer)
        + "\n```",
    ]
    return _front_matter(base, inputs) + "\n" + "\n\n".join(sections) + "\n"


def with_repo_id(card: str, repo_id: str) -> str:
    """The card with its loading snippet naming `repo_id` (for a push decided after the run)."""
    return card.replace(repr(REPO_PLACEHOLDER), repr(repo_id))


def _front_matter(base: InspectedModel, inputs: Sequence[InspectedModel]) -> str:
    models = list({id(m): m for m in [base, *inputs]}.values())
    pipeline_tag = _PIPELINE_TAGS.get(auto_class_name(base.config))
    return _hub_metadata(
        [m.source for m in models],
        tags=["merge", "hfmerge"],
        library="transformers",
        pipeline_tag=pipeline_tag,
    )


def _hub_metadata(
    sources: Sequence[ModelSource],
    *,
    tags: list[str],
    library: str | None,
    pipeline_tag: str | None,
) -> str:
    """YAML front matter: Hub inputs as `base_model`, relation, tags, a license every input
    shares, and the pipeline tag."""
    hub_ids = [s.hub_id for s in sources if s.hub_id]
    meta: dict[str, Any] = {}
    if hub_ids:
        meta["base_model"] = list(dict.fromkeys(hub_ids))
    meta["base_model_relation"] = "merge"
    if library:
        meta["library_name"] = library
    meta["tags"] = tags
    licenses = {s.license for s in sources}
    if len(licenses) == 1 and None not in licenses:  # inherited only when every input agrees
        meta["license"] = licenses.pop()
    if pipeline_tag:
        meta["pipeline_tag"] = pipeline_tag
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def routed_snippet(location: str) -> str:
    """Python lines that load a routed repo at `location` (a path or a Hub id)."""
    return (
        "from hfmerge import RoutedModel\n"
        f"model = RoutedModel.from_pretrained({location!r})\n"
        'print(model.route(["def add(a, b):", "The quick brown fox"]))\n'
        'ids = model.tokenizer("def add(a, b):", return_tensors="pt").input_ids\n'
        "print(model.tokenizer.decode(model.generate(ids, max_new_tokens=20)[0]))"
    )


def render_routed_card(
    *,
    title: str,
    experts: Sequence[ModelSource],
    names: Sequence[str],
    recipe_text: str,
    snippet: str,
    sections: Sequence[str] = (),
    endpoint: str = DEFAULT_ENDPOINT,
) -> str:
    """README.md of a routed repo: metadata, the experts, routing report, recipe, loading."""
    rows = ["| expert | model | revision |", "|---|---|---|"]
    for name, source in zip(names, experts, strict=True):
        model, revision = _source_cells(source, endpoint=endpoint, local="local files (bundled)")
        rows.append(f"| `{name}` | {model} | {revision} |")
    body = [
        f"# {title}",
        "A routed model made with hfmerge: each input sequence is sent to the one expert whose "
        "calibration text it resembles most, so every expert keeps what it learned (no "
        "averaging). It needs no remote code; load it with `hfmerge.RoutedModel`.",
        "## Experts\n\n" + "\n".join(rows),
        *sections,
        "## Recipe\n\n```yaml\n" + recipe_text.rstrip() + "\n```",
        "## Use\n\n```python\n" + snippet + "\n```",
    ]
    meta = _hub_metadata(
        experts, tags=["merge", "hfmerge", "routing"], library=None, pipeline_tag="text-generation"
    )
    return meta + "\n" + "\n\n".join(body) + "\n"


def _inputs_table(
    base: InspectedModel,
    inputs: Sequence[InspectedModel],
    input_params: Sequence[Mapping[str, Any]],
    *,
    endpoint: str,
) -> str:
    rows = ["| model | role | revision | parameters |", "|---|---|---|---|"]
    if not any(model is base for model in inputs):
        rows.append(_input_row(base, "base", {}, endpoint=endpoint))
    for model, model_params in zip(inputs, input_params, strict=True):
        role = "base, input" if model is base else "input"
        rows.append(_input_row(model, role, model_params, endpoint=endpoint))
    return "\n".join(rows)


def _input_row(
    model: InspectedModel, role: str, model_params: Mapping[str, Any], *, endpoint: str
) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in model_params.items()) or "–"
    name, revision = _source_cells(model.source, endpoint=endpoint, local="local files")
    return f"| {name} | {role} | {revision} | {shown} |"


def _source_cells(source: ModelSource, *, endpoint: str, local: str) -> tuple[str, str]:
    """Table cells (model, revision): Hub models linked at their pinned commit; a model with a
    LoRA adapter as both, `BASE + ADAPTER`."""
    if source.adapter is not None:
        base = _source_cells(source.without_adapter, endpoint=endpoint, local=local)
        adapter = _source_cells(source.adapter, endpoint=endpoint, local=local)
        return f"{base[0]} + {adapter[0]}", f"{base[1]} + {adapter[1]}"
    if source.hub_id and source.revision:
        link = f"{endpoint.rstrip('/')}/{source.hub_id}/tree/{source.revision}"
        return f"[`{source.hub_id}`]({link})", f"[`{source.revision}`]({link})"
    return f"`{source.label}`", local


def _method_section(method: MergeMethod, params: Mapping[str, Any]) -> str:
    lines = [f"- method: `{method.name}` — {method.summary}", f"- paper: {method.paper}"]
    lines += [f"- `{key}`: {value}" for key, value in params.items()]
    return "\n".join(lines)
