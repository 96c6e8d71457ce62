"""Every error hfmerge raises on purpose, with structured fields.

Each error says three things: what went wrong (`what`), why it matters or what was found (`why`) and
what the user can do about it (`fix`). The CLI formats them in one place (`cli/app.py`), so no
other module prints an error. A field that names a model (`model`, `model_a`, `model_b`) holds its
label, the model's name in messages (see `hfmerge.sources`).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


class HfMergeError(Exception):
    """Base class: a user-facing failure with what / why / fix."""

    def __init__(self, what: str, *, why: str = "", fix: str = "") -> None:
        self.what = what
        self.why = why
        self.fix = fix
        super().__init__(self.message())

    def message(self) -> str:
        """One paragraph: what happened, why, and what to do."""
        parts = [_sentence(self.what)]
        if self.why:
            parts.append(_sentence(self.why))
        if self.fix:
            parts.append("Fix: " + _sentence(self.fix))
        return " ".join(parts)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled by their fields, not their constructor arguments (every subclass takes others),
        # so an error raised in a worker process reaches the parent as the same error.
        return _restore, (type(self), self.__dict__)


def _restore(cls: type[HfMergeError], fields: dict[str, Any]) -> HfMergeError:
    error = cls.__new__(cls)
    error.__dict__.update(fields)
    Exception.__init__(error, error.message())
    return error


def _sentence(text: str) -> str:
    """Closed with a full stop (a multi-line text, e.g. a YAML block, is left as it is)."""
    return text if "\n" in text else text.rstrip(".") + "."


@dataclass(frozen=True)
class RecipeProblem:
    """One problem in a recipe, located in the YAML file."""

    location: str  # dotted path such as "models.1.weight"
    message: str
    line: int | None = None  # 1-based line in the YAML file, when known
    column: int | None = None

    def describe(self) -> str:
        """`models.1.weight (line 7, col 5): message`."""
        where = self.location or "(top level)"
        if self.line is not None:
            where += f" (line {self.line}" + (f", col {self.column})" if self.column else ")")
        return f"{where}: {self.message}"


class RecipeError(HfMergeError):
    """A recipe failed validation; `problems` holds every problem found, not just the first."""

    def __init__(self, source: str, problems: Sequence[RecipeProblem]) -> None:
        self.source = source
        self.problems = list(problems)
        count = len(self.problems)
        listing = "\n".join("  - " + p.describe() for p in self.problems)
        super().__init__(
            f"Recipe {source} has {count} problem{'s' if count != 1 else ''}:\n{listing}",
            fix="edit the recipe at the places listed, then run `hfmerge validate` on it",
        )


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`did you mean 'x'?` for the choice closest to a misspelt `name`; '' when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"did you mean {close[0]!r}?" if close else ""


class UnknownNameError(HfMergeError):
    """A name (merge method, architecture family, ...) is not in its registry."""

    def __init__(
        self, kind: str, name: str, choices: Sequence[str], *, owner: str | None = None
    ) -> None:
        self.kind = kind
        self.name = name
        self.choices = sorted(choices)
        self.owner = owner  # whose name it is (a model), where that helps find it
        fix = f"use one of the valid {kind}s"
        hint = did_you_mean(name, self.choices)
        super().__init__(
            f"Unknown {kind} {name!r}" + (f" of {owner}" if owner else ""),
            why=f"valid {kind}s are: {', '.join(self.choices)}",
            fix=f"{hint} Otherwise {fix}" if hint else fix,
        )


class OptionError(HfMergeError):
    """A command-line option (or the library argument it feeds) has a value hfmerge cannot use."""

    def __init__(self, option: str, value: str, problem: str, *, why: str = "", fix: str) -> None:
        self.option = option  # as spelt on the command line: "--device-map"
        self.value = value
        self.problem = problem
        super().__init__(f"{option} {value!r}: {problem}", why=why, fix=fix)


class MethodParameterError(HfMergeError):
    """A merge method got parameters it cannot use (in the tensor `tensor`, when it is known)."""

    def __init__(self, method: str, problem: str, fix: str, *, tensor: str | None = None) -> None:
        self.method = method
        self.problem = problem
        self.tensor = tensor
        where = f" in tensor {tensor}" if tensor else ""
        super().__init__(f"Merge method {method!r}{where}: {problem}", fix=fix)

    def in_tensor(self, tensor: str) -> MethodParameterError:
        """The same error, naming the tensor it was raised for (a method never knows it)."""
        return MethodParameterError(self.method, self.problem, self.fix, tensor=tensor)


class VocabularyError(HfMergeError):
    """The models' vocabularies cannot be merged as the recipe asks."""

    def __init__(self, problem: str, *, fix: str) -> None:
        self.problem = problem
        super().__init__(f"Tokenizer merging: {problem}", fix=fix)


class ArchitectureError(HfMergeError):
    """A model's architecture is unsupported, or its tensors do not match its family's spec."""

    def __init__(self, model: str, problem: str, *, fix: str = "") -> None:
        self.model = model
        super().__init__(
            f"Model {model}: {problem}",
            fix=fix
            or "check that the model is a supported family (`hfmerge archs`) and unmodified",
        )


class NoPermutationSpecError(HfMergeError):
    """A step that needs a permutation spec (align, REPAIR, the CKA gate, a router backbone) was
    asked of a model whose model_type has none: such a model merges tensor by tensor only."""

    def __init__(self, model: str, model_type: str, feature: str, families: Sequence[str]) -> None:
        self.model = model
        self.model_type = model_type
        self.feature = feature  # what asked for it: "recipe `align:`", "hfmerge align", ...
        self.families = list(families)  # "llama (llama, mistral, qwen2)", one per family
        super().__init__(
            f"Model {model}: {feature} needs a permutation spec, and model_type "
            f"{model_type!r} has none",
            why="hfmerge merges any transformers checkpoint tensor by tensor, but aligning, "
            "repairing, probing blocks and routing need the family's structure; families with a "
            f"permutation spec: {'; '.join(self.families)}",
            fix=f"drop {feature} for a plain merge, or use models of a listed family "
            "(`hfmerge archs`)",
        )


class IncompatibleModelsError(HfMergeError):
    """Two input models cannot be merged tensor by tensor (names, shapes or families differ)."""

    def __init__(self, model_a: str, model_b: str, problems: Sequence[str]) -> None:
        self.model_a = model_a
        self.model_b = model_b
        self.problems = list(problems)
        shown = self.problems[:10]
        more = len(self.problems) - len(shown)
        listing = "; ".join(shown) + (f"; and {more} more" if more > 0 else "")
        super().__init__(
            f"Models {model_a} and {model_b} are not compatible",
            why=listing,
            fix="merge only models that share one architecture and shape (usually fine-tunes of "
            "one base, or one recipe trained from different seeds)",
        )


class ModelSourceError(HfMergeError):
    """A model reference cannot be read: missing directory, no safetensors, pickle-only, ..."""

    def __init__(self, model: str, problem: str, fix: str) -> None:
        self.model = model
        super().__init__(f"Model {model}: {problem}", fix=fix)


class AdapterError(HfMergeError):
    """A LoRA adapter cannot be applied to its base: unreadable, unsupported or mismatched.

    `problems` lists every problem found (a preflight reports them all at once).
    """

    def __init__(self, adapter: str, base: str, problems: Sequence[str], fix: str) -> None:
        self.adapter = adapter
        self.base = base
        self.problems = list(problems)
        shown = self.problems[:10]
        more = len(self.problems) - len(shown)
        listing = "; ".join(shown) + (f"; and {more} more" if more > 0 else "")
        super().__init__(f"Adapter {adapter} (on base {base}): {listing}", fix=fix)


class HubError(HfMergeError):
    """A Hub request failed.

    `kind` says how (not_found, revision_not_found, gated, unauthorized, forbidden, offline,
    network, server, invalid), so callers can decide without parsing the text.
    """

    def __init__(
        self,
        repo_id: str,
        problem: str,
        *,
        kind: str,
        revision: str | None = None,
        why: str = "",
        fix: str = "",
    ) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.kind = kind
        self.problem = problem
        name = f"{repo_id}@{revision}" if revision else repo_id
        super().__init__(f"Hub repo {name}: {problem}", why=why, fix=fix)


class PushError(HfMergeError):
    """Pushing a finished output failed; the local output is complete and can be pushed later."""

    def __init__(self, folder: str, repo_id: str, cause: HfMergeError) -> None:
        self.folder = folder
        self.repo_id = repo_id
        self.cause = cause
        super().__init__(
            f"The output in {folder} is complete, but pushing it to {repo_id} failed: "
            + cause.what.rstrip("."),
            why=cause.why,
            fix=(cause.fix.rstrip(".") + ", then " if cause.fix else "")
            + f"run `hfmerge push {folder} {repo_id}` to finish",
        )


class PreflightError(HfMergeError):
    """Several input models failed preflight; `problems` holds each model's error."""

    def __init__(self, problems: Sequence[HfMergeError]) -> None:
        self.problems = list(problems)
        listing = "\n".join("  - " + p.message() for p in self.problems)
        super().__init__(
            f"{len(self.problems)} problems with the input models (no weights were downloaded; "
            "fix each, then run `hfmerge validate` again):\n" + listing
        )


class NonFiniteWeightsError(HfMergeError):
    """A tensor holds NaN or Inf values: in an input (`model` is its label) or, from finite
    inputs, in the merged output (`model` is None). Counts are over the whole tensor."""

    def __init__(
        self,
        model: str | None,
        tensor: str,
        *,
        nan: int,
        posinf: int,
        neginf: int,
        method: str,
        others: Sequence[str] = (),
    ) -> None:
        self.model = model
        self.tensor = tensor
        self.nan, self.posinf, self.neginf = nan, posinf, neginf
        self.method = method
        self.others = list(others)  # other inputs with non-finite values in the same tensor
        counts = (
            f"{nan + posinf + neginf} non-finite values ({nan} NaN, {posinf} +Inf, "
            f"{neginf} -Inf, counted over the whole tensor)"
        )
        also = f"; so does that tensor in {', '.join(self.others)}" if self.others else ""
        optin = "pass --allow-non-finite (RunOptions(allow_non_finite=True))"
        if model is None:
            super().__init__(
                f"The {method} merge produced {counts} in tensor {tensor} from finite inputs; "
                "nothing was written",
                why="The method's arithmetic overflowed or divided zero by zero for these values",
                fix=f"check the method's parameters for this tensor, or {optin} to write it anyway",
            )
            return
        super().__init__(
            f"Model {model}: tensor {tensor} holds {counts}{also}; nothing was written",
            why="NaN or Inf weights flow into the merged model, whose outputs then turn NaN",
            fix="check the model's weights or download it again (a Hub model: delete its folder "
            f"in the HF cache); or, to merge anyway, {optin}",
        )


class OutputError(HfMergeError):
    """The output location cannot be written as asked (exists, not writable, ...)."""

    def __init__(self, path: str, problem: str, fix: str) -> None:
        self.path = path
        super().__init__(f"Output {path}: {problem}", fix=fix)


class InputDataError(HfMergeError):
    """Probe or calibration data cannot be read."""

    def __init__(self, path: str, problem: str, fix: str) -> None:
        self.path = path
        super().__init__(f"Data {path}: {problem}", fix=fix)


class AlignmentError(HfMergeError):
    """Permutation alignment cannot run on the given models, tensors or data."""

    def __init__(self, problem: str, *, why: str = "", fix: str = "") -> None:
        super().__init__(f"Alignment failed: {problem}", why=why, fix=fix)


class FingerprintError(HfMergeError):
    """A model cannot be fingerprinted: its spec gives nothing to probe the residual basis with."""

    def __init__(self, model: str, problem: str, *, fix: str = "") -> None:
        self.model = model
        super().__init__(f"Cannot fingerprint {model}: {problem}", fix=fix)


class RoutedRepoError(HfMergeError):
    """A routed repo (`hfmerge_router.json` + `router.safetensors`) is missing or malformed."""

    def __init__(self, repo: str, problem: str, fix: str) -> None:
        self.repo = repo
        super().__init__(f"Routed repo {repo}: {problem}", fix=fix)


class RoutingError(HfMergeError):
    """A router cannot be built or used as asked (calibration data, experts, memory budget)."""

    def __init__(self, problem: str, *, why: str = "", fix: str = "") -> None:
        super().__init__(f"Routing: {problem}", why=why, fix=fix)


class CkaBelowThresholdError(HfMergeError):
    """A diagonal CKA value is below `--fail-under` (or undefined).

    `failing` holds every (layer pair, value) below the threshold; `layer` and `value` the lowest.
    """

    def __init__(
        self,
        model_a: str,
        model_b: str,
        *,
        threshold: float,
        failing: Sequence[tuple[str, float]],
        layers: int,
    ) -> None:
        self.model_a, self.model_b = model_a, model_b
        self.failing = list(failing)
        where, value = min(self.failing, key=lambda f: -math.inf if math.isnan(f[1]) else f[1])
        self.threshold, self.layer, self.value = threshold, where, value
        listing = ", ".join(f"{name} {v:.3f}" for name, v in self.failing)
        super().__init__(
            f"CKA of {model_a} and {model_b} falls below {threshold:g}: "
            f"{value:.3f} at {where} ({len(self.failing)} of {layers} layers below: {listing})",
            why="representations that far apart usually average badly (a high loss barrier), "
            "and NaN means a layer with no variance on the probe text",
            fix="route between the models instead of merging them, probe with text closer to "
            "their use (--data), or lower --fail-under if this drift is expected",
        )


class CkaGateError(HfMergeError):
    """An input's CKA with the base is below `check.cka_min`: merging would likely fail.

    `layer` and `value` are the lowest CKA found; `route_block` the `route:` YAML to use instead.
    """

    def __init__(
        self,
        model_a: str,
        model_b: str,
        *,
        layer: str,
        value: float,
        threshold: float,
        route_block: str,
    ) -> None:
        self.model_a, self.model_b = model_a, model_b
        self.layer, self.value, self.threshold = layer, value, threshold
        self.route_block = route_block
        super().__init__(
            f"Refusing to merge: CKA between {model_a} and {model_b} is "
            f"{value:.4f} at {layer}, below check.cka_min {threshold:g}",
            why="models whose representations drifted apart average badly; routing each input "
            "to the model that fits it keeps what each learned",
            fix="replace `merge:` (and any `align:`) with this `route:` block (one calibration "
            "text per model), "
            f"lower `check.cka_min`, or pass --force to merge anyway:\n{route_block}",
        )


class ShardWriteError(ValueError):
    """A tensor does not match the shard plan, or the plan was not completely written.

    A caller broke the writer's contract (a bug, not a user's mistake), so it is a ValueError with
    a plain message rather than an HfMergeError with a fix.
    """


class ManifestError(ValueError):
    """One invalid field of a routed repo's manifest; the repo loader turns it into a
    RoutedRepoError naming the repo."""

    def __init__(self, where: str, problem: str) -> None:
        self.where = where  # the field's dotted path, "" for the whole document
        self.problem = problem
        super().__init__(f"{where}: {problem}" if where else problem)


class Interrupted(BaseException):
    """A signal (SIGINT, SIGTERM, SIGHUP) ended the command; the exit status is 128 + its number.

    A BaseException, like KeyboardInterrupt: it is no error of the input, so `except Exception`
    blocks let it pass, while the clean-up of staged output (`except BaseException`) still runs.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signum)

    @property
    def exit_status(self) -> int:
        """The shell's convention for a command ended by a signal: 130 for SIGINT, 143 for TERM."""
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        """`SIGINT`, `SIGTERM`, ..."""
        import signal

        return signal.Signals(self.signum).name
