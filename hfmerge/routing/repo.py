"""A routed repo on disk: `hfmerge_router.json`, `router.safetensors`, bundled `experts/<name>/`.

Writing bundles expert checkpoints by hard link where the file system allows (no copy of
gigabytes), else by copy. Reading resolves every expert to a local folder: bundled ones inside
the repo, Hub ones through `hfmerge.sources.refs` at their pinned commit.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file

from hfmerge.errors import ManifestError, RoutedRepoError
from hfmerge.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from hfmerge.routing.manifest import (
    MANIFEST_FILE,
    ROUTER_FILE,
    ModelLocation,
    RoutedManifest,
    parse_manifest,
)
from hfmerge.routing.routers import Router, router_class
from hfmerge.tensors import INDEX_FILE, copy_side_files, read_checkpoint_index

_FIX = f"rebuild the routed repo with hfmerge, or correct {MANIFEST_FILE} by hand"


@dataclass(frozen=True)
class LocalRoutedRepo:
    """A routed repo read from a folder, with every model it names resolved to a folder."""

    folder: Path
    manifest: RoutedManifest
    router: Router
    expert_paths: dict[str, Path]  # expert name -> its model folder
    backbone_path: Path | None  # a separate backbone's folder; None when it is an expert
    ref: str  # how the user named the repo
    revision: str | None = None  # the commit sha, for a Hub repo
    adapter_paths: dict[str, Path] = field(default_factory=dict)  # adapter experts' folders


def is_routed_repo(ref: str | Path, *, check_hub: bool = False, offline: bool = False) -> bool:
    """Whether `ref` is a routed repo: a local folder holding its manifest or, with
    `check_hub`, a Hub id `org/name[@rev]` whose commit has one (one small download)."""
    path = Path(ref).expanduser()
    if path.is_dir() or not check_hub:
        return (path / MANIFEST_FILE).is_file()
    from hfmerge.sources.refs import is_hub_id, split_revision

    if not is_hub_id(str(ref)):
        return False
    from hfmerge import hub

    repo_id, revision = split_revision(str(ref))
    sha = hub.pin(repo_id, revision, offline=offline).sha
    folder = hub.download(repo_id, sha, allow_patterns=[MANIFEST_FILE], offline=offline)
    return (folder / MANIFEST_FILE).is_file()


def read_manifest(folder: Path, *, label: str | None = None) -> RoutedManifest:
    """The validated manifest in `folder`; RoutedRepoError naming the bad field otherwise."""
    label = label or str(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise RoutedRepoError(
            label,
            f"has no {MANIFEST_FILE}",
            "name a folder or Hub repo written by hfmerge's routing",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise RoutedRepoError(label, f"{MANIFEST_FILE} cannot be read ({exc})", _FIX) from None
    try:
        return parse_manifest(data)
    except ManifestError as problem:
        raise RoutedRepoError(label, f"{MANIFEST_FILE}: {problem}", _FIX) from None


def read_router(folder: Path, manifest: RoutedManifest, *, label: str | None = None) -> Router:
    """The router described by the manifest, with its tensors from `router.safetensors`."""
    label = label or str(folder)
    cls = router_class(manifest.router.type)
    if cls.inputs == "features" and manifest.router.backbone is None:
        raise RoutedRepoError(
            label,
            f"{MANIFEST_FILE}: router.backbone is missing, and the "
            f"{cls.name} router reads its features from a backbone",
            _FIX,
        )
    path = folder / ROUTER_FILE
    if not path.is_file():
        raise RoutedRepoError(label, f"has no {ROUTER_FILE}", _FIX)
    try:
        tensors = load_file(path)
        return cls.from_saved(manifest.router_config(), tensors)
    except Exception as exc:  # safetensors raises its own errors on corrupt files
        raise RoutedRepoError(
            label, f"{ROUTER_FILE} does not fit the manifest's {cls.name} router ({exc})", _FIX
        ) from None


def write_routed_repo(
    staging_dir: Path,
    manifest: RoutedManifest,
    router: Router,
    *,
    bundle_sources: Mapping[str, Path] | None = None,
    backbone_source: Path | None = None,
    adapter_sources: Mapping[str, Path] | None = None,
) -> Path:
    """Write the manifest, router tensors and bundled models into `staging_dir`; returns it.

    `bundle_sources` maps each expert whose location is a `path` to the folder to copy it
    from (an adapter expert's base: a base shared by several is copied once);
    `adapter_sources` maps each adapter expert whose adapter is a `path` to its adapter folder;
    `backbone_source` does the same for a separate bundled backbone. The card is not written
    here.
    """
    _check_router_fits(manifest, router)
    staging_dir.mkdir(parents=True, exist_ok=True)
    sources, adapters = dict(bundle_sources or {}), dict(adapter_sources or {})
    bundled: set[str] = set()
    for expert in manifest.experts:
        if expert.location.path not in bundled:
            _bundle_location(expert.location, sources.get(expert.name), staging_dir, expert.name)
            bundled.add(str(expert.location.path))
        if expert.adapter is not None and expert.adapter.path is not None:
            source = adapters.get(expert.name)
            if source is None:
                raise ValueError(f"adapter of {expert.name} is bundled but no folder was given")
            bundle_adapter(source, staging_dir / expert.adapter.path)
    backbone = manifest.router.backbone
    location = None if backbone is None else backbone.location
    if location is not None and str(location.path) not in bundled:  # else: adapters' base
        _bundle_location(location, backbone_source, staging_dir, "router backbone")
    save_file(
        router.to_tensors(),
        staging_dir / ROUTER_FILE,
        metadata={"format": "pt", "router": router.name},
    )
    text = json.dumps(manifest.to_json(), indent=2, ensure_ascii=False) + "\n"
    (staging_dir / MANIFEST_FILE).write_text(text, encoding="utf-8")
    return staging_dir


def _check_router_fits(manifest: RoutedManifest, router: Router) -> None:
    if router.name != manifest.router.type or router.num_experts != len(manifest.experts):
        raise ValueError(
            f"a {router.name} router over {router.num_experts} experts does not fit "
            f"a manifest for a {manifest.router.type} router over "
            f"{len(manifest.experts)} experts"
        )


def _bundle_location(
    location: ModelLocation, source: Path | None, staging_dir: Path, what: str
) -> None:
    if location.path is None:
        return
    if source is None:
        raise ValueError(f"{what} is bundled at {location.path!r} but no source folder was given")
    bundle_model(source, staging_dir / location.path, label=what)


def bundle_model(source: Path, target: Path, *, label: str) -> list[str]:
    """Copy a model folder's config, tokenizer and safetensors files into `target`; names."""
    index = read_checkpoint_index(source, label=label)  # refuses pickle-only folders
    target.mkdir(parents=True, exist_ok=True)
    copied = copy_side_files(source, target)
    weights = list(index.shards) + ([INDEX_FILE] if (source / INDEX_FILE).is_file() else [])
    for name in weights:
        _link_or_copy(source / name, target / name)
    return copied + weights


def bundle_adapter(source: Path, target: Path) -> list[str]:
    """Copy a PEFT adapter folder's config and safetensors weights into `target`; names."""
    names = [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    for name in names:
        _link_or_copy(source / name, target / name)
    return names


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard link (instant, no extra space), else copy; resolve first: the Hub cache's snapshot
    files are symlinks, and a hard link to a symlink would dangle once moved."""
    target.parent.mkdir(parents=True, exist_ok=True)
    real = source.resolve()
    try:
        os.link(real, target)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(real, target)


def resolve_location(
    location: ModelLocation, folder: Path, *, label: str, offline: bool, progress: bool
) -> Path:
    """A local model folder for `location`: inside `folder`, or downloaded at its pinned sha."""
    if location.path is not None:
        path = folder / location.path
        if not path.is_dir():
            raise RoutedRepoError(
                str(folder),
                f"{label} should be bundled in {location.path}/, which is missing",
                "download the whole routed repo",
            )
        return path
    from hfmerge.sources.refs import resolve_model

    ref = f"{location.repo_id}@{location.revision}"
    return resolve_model(ref, offline=offline, progress=progress).path


def resolve_adapter(location: ModelLocation, folder: Path, *, label: str, offline: bool) -> Path:
    """A local adapter folder for `location`: inside `folder`, or its config and safetensors
    weights downloaded at the pinned sha."""
    if location.path is not None:
        return resolve_location(location, folder, label=label, offline=offline, progress=False)
    from hfmerge import hub

    patterns = [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    repo_id, sha = str(location.repo_id), str(location.revision)  # both set: checked when parsed
    return hub.download(repo_id, sha, allow_patterns=patterns, offline=offline)


def open_routed_repo(
    ref: str | Path, *, revision: str | None = None, offline: bool = False, progress: bool = False
) -> LocalRoutedRepo:
    """Read a routed repo (local folder or Hub id) and resolve every model it names."""
    folder, sha = _repo_folder(str(ref), revision=revision, offline=offline)
    label = str(ref)
    manifest = read_manifest(folder, label=label)
    router = read_router(folder, manifest, label=label)
    if sha is not None:  # bundled models are downloaded only now that the manifest is known
        folder = _download_bundled(str(ref), sha, manifest, offline=offline)
    experts = {
        expert.name: resolve_location(
            expert.location,
            folder,
            label=f"expert {expert.name!r}",
            offline=offline,
            progress=progress,
        )
        for expert in manifest.experts
    }
    adapters = {
        expert.name: resolve_adapter(
            expert.adapter, folder, label=f"adapter of expert {expert.name!r}", offline=offline
        )
        for expert in manifest.experts
        if expert.adapter is not None
    }
    backbone = manifest.router.backbone
    backbone_path = None
    if backbone is not None and backbone.location is not None:
        backbone_path = resolve_location(
            backbone.location,
            folder,
            label="the router backbone",
            offline=offline,
            progress=progress,
        )
    return LocalRoutedRepo(folder, manifest, router, experts, backbone_path, label, sha, adapters)


def _repo_folder(ref: str, *, revision: str | None, offline: bool) -> tuple[Path, str | None]:
    """(folder holding the manifest, commit sha or None for a local folder)."""
    from hfmerge.sources.refs import is_hub_id, split_revision

    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve(), None
    if not is_hub_id(ref):
        raise RoutedRepoError(
            ref,
            "is neither a folder nor a Hub id `org/name`",
            "give the routed repo's folder or its Hub id",
        )
    from hfmerge import hub

    repo_id, inline = split_revision(ref)
    sha = hub.pin(repo_id, revision or inline, offline=offline).sha
    folder = hub.download(
        repo_id, sha, allow_patterns=[MANIFEST_FILE, ROUTER_FILE], offline=offline
    )
    return folder, sha


def _download_bundled(ref: str, sha: str, manifest: RoutedManifest, *, offline: bool) -> Path:
    """Fetch the bundled model folders of a Hub routed repo (nothing when none is bundled)."""
    from hfmerge import hub
    from hfmerge.sources.refs import split_revision

    locations = [expert.location for expert in manifest.experts]
    locations += [expert.adapter for expert in manifest.experts if expert.adapter is not None]
    if manifest.router.backbone is not None and manifest.router.backbone.location is not None:
        locations.append(manifest.router.backbone.location)
    patterns = list(dict.fromkeys(f"{loc.path}/*" for loc in locations if loc.path is not None))
    repo_id = split_revision(ref)[0]
    if not patterns:  # every model is a pinned Hub repo of its own
        return hub.snapshot_dir(repo_id, sha)
    return hub.download(
        repo_id, sha, allow_patterns=[MANIFEST_FILE, ROUTER_FILE, *patterns], offline=offline
    )


__all__ = [
    "LocalRoutedRepo",
    "bundle_adapter",
    "bundle_model",
    "is_routed_repo",
    "open_routed_repo",
    "read_manifest",
    "read_router",
    "resolve_adapter",
    "resolve_location",
    "write_routed_repo",
]
