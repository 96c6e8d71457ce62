"""Model references -> sources: a path, `zoo:NAME` (the offline model zoo), or a Hub id.

Hub ids (`org/name[@revision]`) are pinned to a commit sha through `hfmerge.hub` before anything
else; their files are downloaded only when asked (`fetch_files`), after preflight has passed.

A relative path is read from the current working directory, wherever the recipe file is (as
`output.path` is): `local_path` is that rule. An existing local directory always wins over a Hub
id of the same spelling. A reference that names neither says which local path was tried, and
when it looks like a mistyped path rather than a Hub id, says so (`unresolved_reference`).
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from hfmerge.errors import HfMergeError, HubError, ModelSourceError
from hfmerge.tensors import INDEX_FILE, SIDE_FILES, SINGLE_FILE

ZOO_PREFIX = "zoo:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Hub answers that leave open whether a Hub-shaped reference was meant as a local path: the repo
# is not there, the id is not a valid one, or the Hub could not be asked at all.
_PATH_OR_HUB = frozenset({"not_found", "invalid", "offline", "network"})
_OFFLINE = frozenset({"offline", "network"})
_LISTING_LIMIT = 5000  # entries of one folder compared against a mistyped name


@dataclass(frozen=True)
class ModelSource:
    """A pinned model: where its files are, and the reference the user wrote for it."""

    ref: str  # as written in the recipe or on the command line
    # Local directory holding config.json and safetensors. For a Hub model, the cache's snapshot
    # folder of its pinned commit, which holds its files once `fetch_files` has run.
    path: Path
    hub_id: str | None = None  # set for models that came from the Hub
    revision: str | None = None  # the commit sha they were pinned to
    license: str | None = None  # the Hub card's license, when it declares one
    # A LoRA adapter applied to this model's weights on read (`BASE+ADAPTER`); `ref` then names
    # both, and the other fields are the base's.
    adapter: ModelSource | None = None

    @property
    def label(self) -> str:
        """The model's name in messages and tables: the reference as the user wrote it."""
        return self.ref

    @property
    def without_adapter(self) -> ModelSource:
        """The model itself, as it is without its adapter (this source when it has none)."""
        if self.adapter is None:
            return self
        return replace(self, ref=self.ref.removesuffix(f"+{self.adapter.ref}"), adapter=None)

    @property
    def adapter_path(self) -> Path | None:
        """The local folder of its LoRA adapter (a Hub one's once downloaded); None without."""
        return None if self.adapter is None else self.adapter.path


def split_revision(ref: str) -> tuple[str, str | None]:
    """`org/name@rev` -> ("org/name", "rev"); a reference without `@` has no revision."""
    if "@" in ref and not Path(ref).exists():
        name, _, revision = ref.rpartition("@")
        return name, revision or None
    return ref, None


def is_hub_id(ref: str) -> bool:
    """True for `org/name` that is not an existing local path."""
    return bool(_HUB_ID.match(split_revision(ref)[0])) and not Path(ref).exists()


def local_path(ref: str) -> Path:
    """The absolute local path a reference names: `~` expanded, relative to the working directory.

    This is the one rule for relative model paths, in recipes and on the command line alike: they
    are read from the current directory, not from the recipe file's folder.
    """
    path = Path(ref)
    with contextlib.suppress(RuntimeError):  # `~name` of an unknown user: a literal name then
        path = path.expanduser()
    return path.absolute()


def pin_model(
    ref: str,
    *,
    revision: str | None = None,
    lora: str | None = None,
    offline: bool = False,
    progress: bool = True,
    recipe_dir: Path | None = None,
) -> ModelSource:
    """Resolve a reference without downloading weights: Hub ids are pinned to a commit sha.

    `lora`, a second reference (a local folder or `org/name[@revision]`), is a LoRA adapter to
    apply to the model on read; it is pinned the same way and the source's `ref` is
    `REF+LORA`. `recipe_dir` (the folder of the recipe that names `ref`) only improves the
    error for a relative path that exists there but not in the current directory.

    Raises:
        ModelSourceError: the reference names nothing usable (the error shows the local path
            tried), or a Hub-shaped reference looks like a mistyped local path.
        HubError: the Hub cannot resolve it (missing repo or revision, no access, offline).
    """
    if lora is not None:
        model = pin_model(
            ref, revision=revision, offline=offline, progress=progress, recipe_dir=recipe_dir
        )
        adapter = pin_model(lora, offline=offline, progress=progress, recipe_dir=recipe_dir)
        return replace(model, ref=f"{model.ref}+{adapter.ref}", adapter=adapter)
    if ref.startswith(ZOO_PREFIX):
        from hfmerge.zoo import zoo_model

        return ModelSource(ref=ref, path=zoo_model(ref[len(ZOO_PREFIX) :], progress=progress))
    path = local_path(ref)
    if path.is_dir():
        return ModelSource(ref=ref, path=path.resolve())
    if path.exists():
        raise ModelSourceError(
            ref,
            f"{path} is a file, not a model directory",
            "name the directory that holds config.json and *.safetensors",
        )
    if is_hub_id(ref):
        try:
            return _pin_hub_model(ref, revision, offline=offline)
        except HubError as exc:
            raise unresolved_reference(ref, exc, recipe_dir=recipe_dir) from None
    raise ModelSourceError(
        ref,
        f"no such directory ({path})",
        f"{_path_fix(ref, _close_directory(path), _beside_recipe(ref, path, recipe_dir))}; "
        "otherwise give a model directory, `zoo:NAME` or a Hub id `org/name`",
    )


def unresolved_reference(
    ref: str, cause: HubError, *, recipe_dir: Path | None = None
) -> HfMergeError:
    """The error for a Hub-shaped reference that the Hub could not provide.

    `cause` as it is when the reference is surely a Hub id: the repo exists there (gated, no such
    revision, no access) or nothing local resembles it. Otherwise (offline, the Hub unreachable,
    not a valid Hub id, or a local folder close to it) a ModelSourceError saying that it is
    neither an existing local directory nor reachable on the Hub, with the local path tried and
    both fixes.
    """
    if cause.kind not in _PATH_OR_HUB:
        return cause
    tried = local_path(ref)
    near, beside = _close_directory(tried), _beside_recipe(ref, tried, recipe_dir)
    looks_local = tried.parent.is_dir() or near is not None or beside is not None
    if cause.kind == "not_found" and not looks_local:
        return cause
    hub_fix = cause.fix.rstrip(".") if cause.fix else "check its spelling"
    return ModelSourceError(
        ref,
        "is neither an existing local directory nor reachable on the Hub: the local path "
        f"{tried} does not exist, and Hub repo {cause.repo_id}: {cause.problem}",
        f"{_path_fix(ref, near, beside)}; if it is a Hub id, {hub_fix}",
    )


def _path_fix(ref: str, near: Path | None, beside: Path | None) -> str:
    """How to fix a local path that does not exist: the close folder that does, or the folder
    beside the recipe, and the relative-path rule."""
    fix = "check the path" + (f" (did you mean {_shown(near)}?)" if near is not None else "")
    if beside is not None:
        return (
            f"{fix}; relative paths are read from the current directory, not the recipe's "
            f"folder (did you mean {_shown(beside.absolute())}?)"
        )
    if not _is_absolute(ref):
        fix += f"; relative paths are read from the current directory ({Path.cwd()})"
    return fix


def _is_absolute(ref: str) -> bool:
    return ref.startswith("~") or Path(ref).is_absolute()


def _beside_recipe(ref: str, tried: Path, recipe_dir: Path | None) -> Path | None:
    """`recipe_dir/ref` when that is a directory and `ref` (relative) is not one here."""
    if recipe_dir is None or _is_absolute(ref):
        return None
    candidate = recipe_dir / ref
    return candidate if candidate.absolute() != tried and candidate.is_dir() else None


def _close_directory(path: Path) -> Path | None:
    """An existing directory whose path differs from absolute `path` by typos in its names."""
    current = Path(path.anchor)
    for name in path.parts[1:]:
        if (current / name).is_dir():
            current = current / name
            continue
        try:
            entries = list(itertools.islice(current.iterdir(), _LISTING_LIMIT))
            names = [entry.name for entry in entries if entry.is_dir()]
        except OSError:
            return None
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
        if not close:
            return None
        current = current / close[0]
    return current if current != path else None


def _shown(path: Path) -> str:
    """`path` as the user would type it: relative to the working directory when inside it."""
    cwd = Path.cwd()
    return str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path)


def resolve_model(
    ref: str, *, revision: str | None = None, offline: bool = False, progress: bool = True
) -> ModelSource:
    """Resolve one reference to a local model directory, downloading a Hub model if needed.

    Raises:
        ModelSourceError: the reference names nothing usable.
        HubError: the Hub cannot provide it.
    """
    source = pin_model(ref, revision=revision, offline=offline, progress=progress)
    return download_pinned(source, offline=offline)


def download_pinned(source: ModelSource, *, offline: bool = False) -> ModelSource:
    """A pinned Hub model's weights, config and tokenizer in the cache, and its Hub adapter's
    config and weights; local sources as they are."""
    if source.adapter is not None:
        adapter = _download_adapter(source.adapter, offline=offline)
        source = replace(source, adapter=adapter)
    if source.hub_id is None or source.revision is None:
        return source
    from hfmerge import hub

    index = hub.remote_index(source.hub_id, source.revision, offline=offline)
    return fetch_files(source, index.shards, side_files=True, offline=offline)


def _download_adapter(adapter: ModelSource, *, offline: bool) -> ModelSource:
    """A pinned Hub adapter's `adapter_config.json` and safetensors weights in the cache."""
    if adapter.hub_id is None or adapter.revision is None:
        return adapter
    from hfmerge import hub
    from hfmerge.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    patterns = [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    path = hub.download(adapter.hub_id, adapter.revision, allow_patterns=patterns, offline=offline)
    return replace(adapter, path=path)


def fetch_files(
    source: ModelSource, shards: Sequence[str], *, side_files: bool, offline: bool = False
) -> ModelSource:
    """Download a pinned Hub model's weight `shards` (and config/tokenizer files) to the cache.

    Only safetensors shards named by its header index and the known config and tokenizer files
    are fetched; local sources are returned unchanged.
    """
    if source.hub_id is None or source.revision is None:
        return source
    from hfmerge import hub

    patterns = list(shards)
    if tuple(shards) != (SINGLE_FILE,):
        patterns.append(INDEX_FILE)
    patterns += list(SIDE_FILES) if side_files else ["config.json"]
    path = hub.download(source.hub_id, source.revision, allow_patterns=patterns, offline=offline)
    return replace(source, path=path)


def _pin_hub_model(ref: str, revision: str | None, *, offline: bool) -> ModelSource:
    from hfmerge import hub

    repo_id, inline = split_revision(ref)
    if inline and revision and inline != revision:
        raise ModelSourceError(
            ref,
            f"names revision {inline!r} and also `revision: {revision}`",
            "give the revision once, either as `org/name@rev` or as `revision:`",
        )
    pinned = hub.pin(repo_id, revision or inline, offline=offline)
    return ModelSource(
        ref=f"{ref}@{revision}" if revision and not inline else ref,  # as a recipe entry's ref
        path=hub.snapshot_dir(repo_id, pinned.sha),
        hub_id=repo_id,
        revision=pinned.sha,
        license=pinned.license,
    )
