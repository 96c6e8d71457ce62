"""mergekit configs read as hfmerge recipes: the flat `models:` form, translated before validation.

Model cards often carry a mergekit config (`merge_method:`, `base_model:`, `parameters:`, `dtype:`).
`translate` turns one into the mapping of an hfmerge recipe, so it is validated and run by the one
`Recipe` model like any recipe. Each translated key path remembers the mergekit path it came from,
so every problem found after the translation is reported at the config's own key and line.

What mergekit does and hfmerge follows (behaviour read from mergekit, not its code):
- per-model parameters (`weight`, `density`, ...) given in the top-level `parameters:` apply to
  every model that does not set its own;
- `base_model` that is not in `models:` is still an input; for `linear` (and `karcher`) it is
  merged as one more model, for task-vector methods and `multislerp` (whose base is optional) it
  is the base;
- the written dtype is `out_dtype`, else `dtype` (hfmerge always computes in float32);
- switches hfmerge does not need (`int8_mask`, mergekit's command-line options) are dropped with
  a note, and `density`/`rescale` for `task_arithmetic`, which mergekit accepts and ignores;
- a parameter given as a list is a gradient over the layers, and a list of `filter:`/`value:`
  entries gives values by tensor name: hfmerge's recipes take the same spelling
  (`hfmerge.methods.settings`), so both pass through unchanged;
- `slices:` (block ranges stacked into a new model) become the recipe's `slices:`, each source's
  `parameters` beside it and a slice's `base_model` as its `base`;
- a LoRA reference `model+lora` is a model with that adapter applied, which the recipe spells
  the same way;
- `tokenizer_source` and the `tokenizer:` section become the recipe's `tokenizer:`.
- `chat_template` becomes the recipe's `tokenizer.chat_template`.
Not yet supported, each refused at its key: `modules`, `residual_weight`, and `base_model` with
`nuslerp`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfmerge.errors import RecipeError, RecipeProblem
from hfmerge.methods import METHODS
from hfmerge.methods.base import MergeMethod
from hfmerge.progress import say
from hfmerge.recipe.yaml_locations import Location, read_yaml

MARKERS = ("merge_method", "slices")  # a top-level key that only a mergekit config has
NOT_YET = "is not supported yet"
_KNOWN = (
    "models",
    "slices",
    "merge_method",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
)
_REFUSED = {
    "modules": "`modules:` " + NOT_YET + "; list whole models under `models:`",
}
# mergekit's run options (MergeOptions), sometimes pasted into configs; mergekit ignores them here.
_RUN_OPTIONS = frozenset(
    {
        "allow_crimes",
        "lazy_unpickle",
        "low_cpu_memory",
        "cuda",
        "device",
        "copy_tokenizer",
        "trust_remote_code",
        "random_seed",
        "out_shard_size",
        "clone_tensors",
        "safe_serialization",
        "write_model_card",
        "read_to_gpu",
        "multi_gpu",
        "num_threads",
        "transformers_cache",
    }
)
# Parameters mergekit accepts (or ignores) and hfmerge does not need: dropped with a note.
_DROPPED = {"int8_mask": "a mergekit memory switch for a mask hfmerge never stores"}
# Methods whose mergekit form with a `base_model` hfmerge lacks: refused, never merged otherwise.
_BASE_REFUSED = {
    "nuslerp": "`base_model` with nuslerp (SLERP of the task vectors) "
    + NOT_YET
    + "; remove it to interpolate the two models themselves",
}
_DROPPED_BY_METHOD = {
    "task_arithmetic": {
        "density": "mergekit's task_arithmetic ignores it (it prunes nothing)",
        "rescale": "mergekit's task_arithmetic ignores it (it prunes nothing)",
    }
}


def is_mergekit(data: Any) -> bool:
    """Whether a recipe's YAML mapping is a mergekit config."""
    if not isinstance(data, Mapping):
        return False
    # hfmerge's own recipes take `slices:` too, beside a `merge:` (or `route:`) section.
    own = "merge" in data or "route" in data
    return "merge_method" in data or ("slices" in data and not own)


@dataclass
class Translation:
    """A mergekit config as an hfmerge recipe mapping, with where each part came from."""

    data: dict[str, Any] = field(default_factory=dict)
    origins: dict[Location, Location] = field(default_factory=dict)  # recipe path -> config path
    problems: list[tuple[Location, str]] = field(default_factory=list)  # at config paths
    notes: list[str] = field(default_factory=list)
    # Recipe sections whose keys are parameters, and where the config keeps them (a parameter
    # that is missing altogether is reported there).
    parameter_sections: dict[Location, Location] = field(default_factory=dict)

    def origin(self, loc: Location) -> Location:
        """The config path that the recipe path `loc` came from (its longest known prefix)."""
        if loc not in self.origins and loc[:-1] in self.parameter_sections:
            return (*self.parameter_sections[loc[:-1]], *loc[-1:])
        for depth in range(len(loc), -1, -1):
            if loc[:depth] in self.origins:
                return (*self.origins[loc[:depth]], *loc[depth:])
        return loc

    def say_notes(self) -> None:
        """Print each note on stderr, one line each."""
        for note in self.notes:
            say(note, prefix="note: ")

    def put(self, path: Location, value: Any, origin: Location) -> None:
        """Set `path` in `data` to `value`, remembering that it came from `origin`."""
        target: Any = self.data
        for part in path[:-1]:
            target = target.setdefault(part, {}) if isinstance(part, str) else target[part]
        target[path[-1]] = value
        self.origins[path] = origin


def translate(config: Mapping[str, Any]) -> Translation:
    """The hfmerge recipe mapping that runs the mergekit `config`, with its refusals and notes."""
    out = Translation(
        origins={(): ()}, parameter_sections={("merge", "parameters"): ("parameters",)}
    )
    _top_level(config, out)
    method = _method(config, out)
    base = config.get("base_model")
    if base is not None and method is not None and method.name in _BASE_REFUSED:
        out.problems.append((("base_model",), _BASE_REFUSED[method.name]))
        base = None
    globals_ = _global_parameters(config.get("parameters"), method, out)
    _models(config, base, method, out)
    _slices(config, method, out)
    if base is not None:
        out.put(("base",), base, ("base_model",))
    if "merge_method" in config:
        out.put(("merge",), {"method": config["merge_method"]}, ("merge_method",))
        out.origins[("merge", "method")] = ("merge_method",)
    else:
        out.problems.append(((), "`merge_method:` is missing (every mergekit config names one)"))
    if globals_:
        out.put(("merge", "parameters"), globals_, ("parameters",))
        for name in globals_:
            out.origins[("merge", "parameters", name)] = ("parameters", name)
    _dtype(config, out)
    _tokenizer(config, out)
    return out


def _top_level(config: Mapping[str, Any], out: Translation) -> None:
    for key in config:
        if key in _REFUSED:
            out.problems.append(((key,), _REFUSED[key]))
        elif key in _RUN_OPTIONS:
            out.notes.append(f"{key}: a mergekit run option hfmerge does not need; ignored")
        elif key not in _KNOWN:
            valid = ", ".join(_KNOWN)
            out.problems.append(((key,), f"unknown mergekit key {key!r} (valid keys: {valid})"))


def _method(config: Mapping[str, Any], out: Translation) -> MergeMethod | None:
    # A name hfmerge lacks is reported by the recipe checks, with every method hfmerge has.
    name = config.get("merge_method")
    return METHODS.get(name) if isinstance(name, str) else None


def _global_parameters(params: Any, method: MergeMethod | None, out: Translation) -> dict[str, Any]:
    """`parameters:` as the recipe's `merge.parameters`: the method's parameters, and per-model
    ones as the default of every model that does not set its own (for a tensor, too, where the
    model's own filter list has no entry that matches it)."""
    if not isinstance(params, Mapping):
        if params is not None:
            out.problems.append((("parameters",), "must be a mapping of parameter names"))
        return {}
    return {
        name: value
        for name, value in params.items()
        if _accepted(name, value, ("parameters", name), method, out)
    }


def _accepted(
    name: str, value: Any, where: Location, method: MergeMethod | None, out: Translation
) -> bool:
    """False (with a problem or a note) for a value this step refuses or a switch it drops."""
    dropped = {**_DROPPED, **_DROPPED_BY_METHOD.get(method.name if method else "", {})}
    if name in dropped:
        out.notes.append(f"{'.'.join(map(str, where))}: {dropped[name]}; ignored")
        return False
    return True


def _models(
    config: Mapping[str, Any],
    base: Any,
    method: MergeMethod | None,
    out: Translation,
) -> None:
    models = config.get("models")
    if not isinstance(models, list):
        if models is None and "slices" not in config:
            out.problems.append((("models",), "required key is missing"))
        elif models is not None:
            out.problems.append((("models",), "must be a list of `- model: NAME` entries"))
        return
    entries: list[Any] = []
    out.put(("models",), entries, ("models",))
    for index, item in enumerate(models):
        entries.append(_model_entry(item, index, method, out))
    named = {e.get("model") for e in entries if isinstance(e, Mapping)}
    if isinstance(base, str) and base not in named and _base_listed(method, len(entries)):
        entries.append({"model": base})
        out.origins[("models", len(entries) - 1)] = ("base_model",)


def _base_listed(method: MergeMethod | None, count: int) -> bool:
    """Whether a base missing from `models` is listed there too. mergekit merges it as one more
    input: for `linear` that changes the result; a task-vector method takes it as the base
    wherever it is listed (so does a method whose base is optional, e.g. multislerp), and a
    recipe lists at least two models."""
    merges_base = method is not None and not method.needs_base and not method.optional_base
    return merges_base or count < 2


def _model_entry(
    item: Any,
    index: int,
    method: MergeMethod | None,
    out: Translation,
) -> Any:
    where: Location = ("models", index)
    out.origins[where] = where
    out.parameter_sections[where] = (*where, "parameters")
    if not isinstance(item, Mapping):
        return item  # a plain name, or a value the schema reports
    entry: dict[str, Any] = {}
    for key, value in item.items():
        _entry_key(entry, (*where, key), value, method, out)
    return entry


def _slices(config: Mapping[str, Any], method: MergeMethod | None, out: Translation) -> None:
    """`slices:` as the recipe's `slices:`: each source's `parameters` beside it, a slice's
    `base_model` as its `base`."""
    slices = config.get("slices")
    if slices is None:
        return
    if not isinstance(slices, list):
        out.problems.append((("slices",), "must be a list of `- sources: [...]` entries"))
        return
    translated: list[Any] = []
    out.put(("slices",), translated, ("slices",))
    for index, one in enumerate(slices):
        translated.append(_slice(one, ("slices", index), method, out))


def _slice(one: Any, where: Location, method: MergeMethod | None, out: Translation) -> Any:
    out.origins[where] = where
    if not isinstance(one, Mapping):
        return one  # the schema reports it
    result: dict[str, Any] = {}
    for key, value in one.items():
        if key == "sources" and isinstance(value, list):
            result["sources"] = [
                _source(item, (*where, "sources", number), method, out)
                for number, item in enumerate(value)
            ]
            out.origins[(*where, "sources")] = (*where, "sources")
        elif key == "base_model":
            result["base"] = value
            out.origins[(*where, "base")] = (*where, key)
        elif key == "parameters" and isinstance(value, Mapping):
            result["parameters"] = {
                name: setting
                for name, setting in value.items()
                if _accepted(name, setting, (*where, key, name), method, out)
            }
            out.origins[(*where, key)] = (*where, key)
        elif key == "residual_weight":
            out.problems.append(((*where, key), f"`residual_weight` {NOT_YET}; remove it"))
        else:
            result[key] = value  # the schema reports a wrong type or an unknown key
            out.origins[(*where, key)] = (*where, key)
    return result


def _source(item: Any, where: Location, method: MergeMethod | None, out: Translation) -> Any:
    out.origins[where] = where
    out.parameter_sections[where] = (*where, "parameters")
    if not isinstance(item, Mapping):
        return item
    entry: dict[str, Any] = {}
    for key, value in item.items():
        _entry_key(entry, (*where, key), value, method, out, extra=("layer_range",))
    return entry


def _entry_key(
    entry: dict[str, Any],
    where: Location,
    value: Any,
    method: MergeMethod | None,
    out: Translation,
    *,
    extra: tuple[str, ...] = (),
) -> None:
    """Translate one key of a model entry (or of a slice's source, which also takes the keys in
    `extra`) into `entry`, or report it."""
    key = where[-1]
    if key in extra:
        entry[str(key)] = value
        out.origins[where] = where
    elif key in ("model", "revision"):  # `revision`: the pin a run writes into the saved config
        entry[key] = value  # `BASE+ADAPTER` as it is: the recipe's spelling too (`ModelEntry`)
        out.origins[where] = where
    elif key == "parameters" and isinstance(value, Mapping):
        for name, setting in value.items():
            origin = (*where, name)
            if _accepted(name, setting, origin, method, out):
                entry[name] = setting
                out.origins[(*where[:-1], name)] = origin
    elif key == "parameters":
        out.problems.append((where, "must be a mapping of parameter names"))
    else:
        valid = ", ".join(sorted(("model", "parameters", "revision", *extra)))
        out.problems.append((where, f"unknown key {key!r} in a model entry (valid: {valid})"))


def _tokenizer(config: Mapping[str, Any], out: Translation) -> None:
    """`tokenizer_source: X` and the `tokenizer:` section (whose `source` defaults to `union`,
    as in mergekit) as the recipe's `tokenizer:`."""
    source, section = config.get("tokenizer_source"), config.get("tokenizer")
    if source is not None and section is not None:
        out.problems.append(
            (("tokenizer_source",), "give `tokenizer_source` or a `tokenizer:` section, not both")
        )
        return
    if source is not None:
        out.put(("tokenizer",), {"source": source}, ("tokenizer_source",))
        out.origins[("tokenizer", "source")] = ("tokenizer_source",)
    elif isinstance(section, Mapping):
        out.put(("tokenizer",), {"source": "union", **section}, ("tokenizer",))
    elif section is not None:
        out.put(("tokenizer",), section, ("tokenizer",))  # the schema reports its type
    template = config.get("chat_template")
    if template is not None:
        if not isinstance(out.data.get("tokenizer", {}), dict):
            return
        out.put(("tokenizer", "chat_template"), template, ("chat_template",))
        out.origins.setdefault(("tokenizer",), ("chat_template",))


def _dtype(config: Mapping[str, Any], out: Translation) -> None:
    """The written dtype: mergekit merges in `dtype` and writes `out_dtype`, else `dtype`;
    hfmerge merges in float32 and writes `output.dtype`."""
    compute = _dtype_name(config.get("dtype"))
    if compute not in (None, "float32"):
        out.notes.append(
            f"dtype: hfmerge merges in float32, where mergekit merges in {compute}, so the "
            "results can differ in the last bits"
        )
    key = "out_dtype" if config.get("out_dtype") is not None else "dtype"
    written = _dtype_name(config.get(key))
    if written is not None:
        out.put(("output",), {"dtype": written}, (key,))
        out.origins[("output", "dtype")] = (key,)


def _dtype_name(value: Any) -> Any:
    """The dtype name without the `torch.` prefix mergekit allows."""
    return value.removeprefix("torch.") if isinstance(value, str) else value


def recipe_yaml(config_text: str, *, source: str) -> str:
    """The hfmerge recipe equivalent to the mergekit config `config_text`, as commented YAML.

    Raises:
        RecipeError: the text is not a mergekit config (or not YAML).
    """
    import yaml

    config, _ = read_yaml(config_text, source=source)
    if not is_mergekit(config):
        problem = RecipeProblem(
            "", "is not a mergekit config (no top-level `merge_method:`); it runs as it is"
        )
        raise RecipeError(source, [problem])
    translation = translate(config)
    name = Path(source).name
    header = [
        f"# Converted by `hfmerge convert` from the mergekit config {name}.",
        f"# Run it with: hfmerge run {Path(name).stem}.hfmerge.yml (this text saved there);",
        f"# `hfmerge run {name}` runs the same merge.",
        *(f"# Note: {note}." for note in translation.notes),
    ]
    body = yaml.safe_dump(translation.data, sort_keys=False, allow_unicode=True)
    return "\n".join(header) + "\n" + body
