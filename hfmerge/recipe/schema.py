"""The recipe: a YAML file naming models and what to do with them, validated with pydantic v2.

`load_recipe` reports every problem at once (schema, unknown keys, method names and
parameters), each with its YAML line, before anything is read or written.

Relative paths in a recipe (a model in `models` or `base`, `output.path`, `probe.data` and the
experts' `data`) are read from the current working directory, not from the recipe file's folder
(`hfmerge.sources.refs.local_path` for models); an error for one that does not exist shows the
absolute path tried, and the recipe-folder spelling when that one exists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from hfmerge.errors import RecipeError, RecipeProblem, did_you_mean
from hfmerge.recipe.adapter_refs import split_adapter
from hfmerge.recipe.align_methods import AlignMethod
from hfmerge.recipe.yaml_locations import Location, locate, read_yaml


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(BaseModel):
    """One input model; keys other than `model`, `revision` and `lora` are per-model method
    parameters.

    `model` is a reference: a local directory (a relative one is read from the current working
    directory), `zoo:NAME`, or a Hub id `org/name[@revision]`. `lora` is a PEFT LoRA adapter
    (a local folder or a Hub id `org/name[@revision]`) applied to the model as it is read;
    `model: BASE+ADAPTER` is the same entry.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    model: str = Field(min_length=1)
    revision: str | None = None
    lora: str | None = Field(None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _split_adapter(cls, value: Any) -> Any:
        if not isinstance(value, dict) or not isinstance(value.get("model"), str):
            return value
        model, adapter = split_adapter(value["model"])
        if adapter is None:
            return value
        if value.get("lora") is not None:
            raise ValueError(
                f"`model: {value['model']}` names an adapter and so does `lora:`; give it once"
            )
        return {**value, "model": model, "lora": adapter}

    @property
    def method_params(self) -> dict[str, Any]:
        """Per-model method parameters (weight, density, ...) given beside the model."""
        return dict(self.model_extra or {})

    @property
    def ref(self) -> str:
        """The reference as users write it: `org/name@revision`, a path, or `zoo:name`, then
        `+ADAPTER` for a model with an adapter."""
        ref = f"{self.model}@{self.revision}" if self.revision else self.model
        return f"{ref}+{self.lora}" if self.lora else ref

    @property
    def spellings(self) -> tuple[str, str]:
        """The names that refer to this entry (in `base:`): without and with its revision."""
        model = f"{self.model}+{self.lora}" if self.lora else self.model
        return model, self.ref

    def same_model(self, other: ModelEntry) -> bool:
        """Whether `other` names the same model and adapter (its revision aside)."""
        return (self.model, self.lora) == (other.model, other.lora)


class SliceSource(ModelEntry):
    """One model's half-open range of blocks `[start, stop)` in a slice; other keys beside it are
    its method parameters for this slice."""

    layer_range: tuple[int, int]


class SliceSpec(_Strict):
    """One run of output blocks: the method over its sources' block ranges, block by block.

    Every source spans the same number of blocks. `base` (one of the sources' models) is the
    slice's base for task-vector methods; `parameters` override the merge's for this slice.
    """

    sources: list[SliceSource] = Field(min_length=1)
    base: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)


class TokenSource(_Strict):
    """A token's row taken from a model's row of a (possibly other) token, or zeros."""

    kind: Literal["model_token", "zero"]
    model: str | None = None  # model_token: the donor model
    token: str | None = None  # model_token: the donor's token (or give token_id)
    token_id: int | None = Field(None, ge=0)


class TokenSpec(_Strict):
    """Where one output token's embedding row comes from, when a model lacks the token."""

    source: str | TokenSource | None = None  # a model (its row of this token), or a TokenSource
    force: bool = False  # every model takes the source's row, even those that have the token


class TokenizerSpec(_Strict):
    """The output tokenizer, and how embedding rows follow it (mergekit's `tokenizer:`)."""

    # `union`, `base`, or one of the models; None: the base's, with its padded size kept
    source: str | None = None
    tokens: dict[str, TokenSpec] = Field(default_factory=dict)
    pad_to_multiple_of: int | None = Field(None, gt=0)
    # A named template (chatml, llama3, mistral, alpaca, exaone), `auto`, Jinja text or a file.
    chat_template: str | None = Field(None, min_length=1)

    @property
    def changes_vocabulary(self) -> bool:
        """Whether the section asks for more than the base's vocabulary (a chat template alone
        does not)."""
        return self.source is not None or bool(self.tokens) or self.pad_to_multiple_of is not None


class ProbeSpec(_Strict):
    """Text used for activations (alignment, CKA, routing)."""

    data: str = "builtin"
    samples: int = Field(256, gt=0)
    max_length: int = Field(128, gt=1)
    device_map: str | dict[str, int | str] = "auto"


class AlignSpec(_Strict):
    """Permutation alignment of every model into `base`'s basis before merging."""

    method: AlignMethod = "none"
    seed: int = 0  # weight matching visits the groups in a seeded random order
    report_barrier: bool = False  # measure the loss barrier before and after, for the card
    # REPAIR the merged model: rescale its channels to the inputs' blended statistics on the
    # probe text (linear merges only: the blend uses the merge weights).
    repair: bool = False


class CheckSpec(_Strict):
    """The CKA gate: refuse to merge below `cka_min`."""

    cka_min: float | None = Field(None, ge=-1.0, le=1.0)


class MergeSpec(_Strict):
    """Which merge method to run, with its global parameters."""

    method: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0  # seeds the random methods (DARE, DELLA); the same seed gives the same output


class ExpertSpec(_Strict):
    """Calibration text for one routed expert."""

    data: str


class RouteSpec(_Strict):
    """Per-input routing instead of merging."""

    method: Literal["centroid", "logistic", "perplexity"] = "centroid"
    experts: list[ExpertSpec] = Field(default_factory=list)
    layer: int | None = Field(None, ge=1)  # backbone block whose output is pooled; ~2/3 depth
    temperature: float | None = Field(None, gt=0)  # softmax temperature of the router scores
    min_confidence: float | None = Field(None, ge=0, le=1)  # below it: default_expert
    default_expert: int | None = Field(None, ge=0)  # index into `models`
    bundle: bool | None = None  # copy experts into the repo; default: when any is not on the Hub
    seed: int = 0


class OutputSpec(_Strict):
    """Where and how the result is written."""

    path: str | None = None
    dtype: Literal["bfloat16", "float16", "float32"] | None = None
    max_shard_size: str | int = "2GB"
    push: str | None = None
    private: bool = False


class Recipe(_Strict):
    """A whole recipe. Build it with `load_recipe` (file) or `parse_recipe` (mapping)."""

    models: list[ModelEntry] = Field(default_factory=list)
    # Output blocks stacked from the models' block ranges (frankenmerges, depth up-scaling);
    # instead of `models`, which then lists the slices' models.
    slices: list[SliceSpec] | None = None
    base: str | None = None
    probe: ProbeSpec = Field(default_factory=ProbeSpec)
    align: AlignSpec = Field(default_factory=AlignSpec)
    check: CheckSpec = Field(default_factory=CheckSpec)
    merge: MergeSpec | None = None
    route: RouteSpec | None = None
    # The output vocabulary; without it, inputs whose vocabularies differ in size merge onto the
    # base's tokenizer.
    tokenizer: TokenizerSpec | None = None
    output: OutputSpec = Field(default_factory=OutputSpec)

    @field_validator("models", mode="before")
    @classmethod
    def _strings_to_entries(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"model": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _models_of_slices(self) -> Recipe:
        """A `slices:` recipe lists its models once each (in order of first use), so pinning,
        inspection and the card see every model it reads."""
        if self.slices and not self.models:
            unique = {
                source.ref: ModelEntry(
                    model=source.model, revision=source.revision, lora=source.lora
                )
                for one in self.slices
                for source in one.sources
            }
            object.__setattr__(self, "models", list(unique.values()))  # frozen: set once, here
        return self

    def base_entry(self) -> ModelEntry:
        """The model named by `base` (or the first model when there is no `base`)."""
        if self.base is None:
            return self.models[0]
        for entry in self.models:
            if self.base in entry.spellings:
                return entry
        return ModelEntry.model_validate({"model": self.base})


def load_recipe(path: str | Path) -> Recipe:
    """Read, parse and validate a recipe file.

    Raises:
        RecipeError: with every problem found, each located in the YAML file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        problem = RecipeProblem("", f"cannot read the file ({exc.strerror or exc})")
        raise RecipeError(str(path), [problem]) from exc
    except UnicodeDecodeError as exc:
        problem = RecipeProblem(
            "",
            f"is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "save the recipe as UTF-8",
        )
        raise RecipeError(str(path), [problem]) from None
    return parse_recipe_text(text, source=str(path))


def parse_recipe_text(text: str, *, source: str = "<recipe>") -> Recipe:
    """Parse YAML text into a validated `Recipe`, reporting every problem with its line.

    A mergekit config (top-level `merge_method:` or `slices:`) is translated first
    (`hfmerge.recipe.mergekit`); its problems point at the config's own keys.
    """
    from hfmerge.recipe.mergekit import is_mergekit, translate  # late: the method registry

    data, positions = read_yaml(text, source=source)
    if not is_mergekit(data):
        return parse_recipe(data, source=source, positions=positions)
    translation = translate(data)
    translation.say_notes()
    return parse_recipe(
        translation.data,
        source=source,
        positions=positions,
        found=translation.problems,
        relocate=translation.origin,
    )


def parse_recipe(
    data: Any,
    *,
    source: str = "<recipe>",
    positions: dict[Location, tuple[int, int]] | None = None,
    found: Sequence[tuple[Location, str]] = (),
    relocate: Callable[[Location], Location] | None = None,
) -> Recipe:
    """Validate a recipe mapping; every schema and semantic problem is reported in one error.

    `found` are problems already found (at the file's own paths) and `relocate` maps a path of
    `data` to the path in the file it came from, for a mapping translated from another format.
    """
    from hfmerge.recipe.checks import semantic_problems  # late: it imports the method registry

    if not isinstance(data, dict):
        raise RecipeError(source, [RecipeProblem("", "a recipe must be a YAML mapping of keys")])
    problems: list[tuple[Location, str]] = []
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems += [_describe_pydantic(err) for err in exc.errors()]
    problems += semantic_problems(data)
    if relocate is not None:
        problems = [(relocate(loc), msg) for loc, msg in problems]
    problems = [*found, *problems]
    if problems:
        located = [locate(loc, msg, positions or {}) for loc, msg in _unique(problems)]
        raise RecipeError(source, located)
    assert recipe is not None
    return recipe


def _describe_pydantic(err: Any) -> tuple[Location, str]:
    loc: Location = tuple(err["loc"])
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])
        return loc, f"unknown key {key!r}{_key_hint(key, _allowed_keys(loc[:-1]))}"
    if err["type"] == "missing":
        return loc, "required key is missing"
    return loc, str(err["msg"])


def _allowed_keys(loc: Location) -> list[str]:
    """Field names of the recipe section at `loc` (for did-you-mean hints)."""
    model: type[BaseModel] = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        nested = _model_in(field.annotation) if field else None
        if nested is None:
            return []
        model = nested
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _key_hint(name: str, choices: list[str]) -> str:
    hint = did_you_mean(name, choices)
    return f" ({hint})" if hint else f" (valid keys: {', '.join(choices)})"


def _unique(items: list[tuple[Location, str]]) -> list[tuple[Location, str]]:
    seen: set[tuple[Location, str]] = set()
    return [i for i in items if not (i in seen or seen.add(i))]  # type: ignore[func-returns-value]
