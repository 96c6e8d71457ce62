"""Pushing a finished output directory to the Hub: checks first, then one commit."""

from __future__ import annotations

from pathlib import Path

from hfmerge.errors import HfMergeError, ModelSourceError, OutputError, PushError
from hfmerge.pipeline.card import with_repo_id
from hfmerge.tensors import read_checkpoint_index


def push_output(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    offline: bool = False,
    checked: bool = False,
    method: str | None = None,
) -> str:
    """Push a finished output directory to the Hub as one commit; the repo's URL.

    Refuses, before uploading anything, a directory that is not a model output (no config.json
    or no safetensors weights) or a routed repo that does not open. `checked` says `check_push`
    already ran.

    Raises:
        PushError: the upload failed after retries; the local output is untouched.
    """
    folder = Path(folder)
    _check_model_output(folder)
    if not checked:
        repo_id = check_push(repo_id, offline=offline)
    from hfmerge import hub

    readme = folder / "README.md"
    if readme.is_file():  # a card written before the repo id was known names it now
        text = readme.read_text(encoding="utf-8")
        if with_repo_id(text, repo_id) != text:
            readme.write_text(with_repo_id(text, repo_id), encoding="utf-8")
    message = f"Upload {method} merge made with hfmerge" if method else "Upload with hfmerge"
    try:
        return hub.push_folder(folder, repo_id, private=private, commit_message=message)
    except HfMergeError as exc:
        raise PushError(str(folder), repo_id, exc) from None


def check_push(repo_id: str, *, offline: bool) -> str:
    """Fail fast, before any long work, if `repo_id` cannot be pushed to; the full repo id."""
    from hfmerge import hub

    return hub.check_push(repo_id, offline=offline)


def _check_model_output(folder: Path) -> None:
    if not folder.is_dir():
        raise OutputError(str(folder), "is not a directory", "name a model output directory")
    from hfmerge.routing.manifest import MANIFEST_FILE

    if (folder / MANIFEST_FILE).is_file():
        _check_routed_output(folder)
        return
    if not (folder / "config.json").is_file():
        raise OutputError(
            str(folder),
            "has no config.json, so it is not a model output",
            "push the directory that `hfmerge run` wrote",
        )
    try:
        read_checkpoint_index(folder)  # safetensors weights present, headers valid
    except ModelSourceError as exc:
        raise OutputError(
            str(folder), f"is not a complete model output: {exc.what}", exc.fix
        ) from None


def _check_routed_output(folder: Path) -> None:
    """A routed repo must open: manifest and router valid, every bundled model complete.

    Experts referenced by Hub id are not fetched: they live in their own repos.
    """
    from hfmerge.errors import RoutedRepoError
    from hfmerge.routing.repo import read_manifest, read_router

    try:
        manifest = read_manifest(folder, label=str(folder))
        read_router(folder, manifest, label=str(folder))
        locations = [expert.location for expert in manifest.experts]
        if manifest.router.backbone is not None and manifest.router.backbone.location:
            locations.append(manifest.router.backbone.location)
        for location in locations:
            if location.path is not None:
                read_checkpoint_index(folder / location.path)
    except (RoutedRepoError, ModelSourceError) as exc:
        raise OutputError(
            str(folder), f"is not a complete routed repo: {exc.what}", exc.fix
        ) from None
