"""Model references -> local directories: a path, `zoo:NAME` (the offline model zoo), or a Hub id.

Hub ids (`org/name[@revision]`) are resolved by `hfmerge.hub`; this module only decides what a
reference is and reports references that cannot work, before anything is downloaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from hfmerge.errors import ModelSourceError

ZOO_PREFIX = "zoo:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where one input model's files are, and how the user named it."""

    ref: str  # as written in the recipe or on the command line
    path: Path  # local directory holding config.json and safetensors
    hub_id: str | None = None  # set for models that came from the Hub
    revision: str | None = None  # the commit sha they were pinned to

    @property
    def display(self) -> str:
        """Short name for tables and messages."""
        return self.ref


def split_revision(ref: str) -> tuple[str, str | None]:
    """`org/name@rev` -> ("org/name", "rev"); a reference without `@` has no revision."""
    if "@" in ref and not Path(ref).exists():
        name, _, revision = ref.rpartition("@")
        return name, revision or None
    return ref, None


def is_hub_id(ref: str) -> bool:
    """True for `org/name` that is not an existing local path."""
    return bool(_HUB_ID.match(split_revision(ref)[0])) and not Path(ref).exists()


def resolve_model(ref: str, *, revision: str | None = None, progress: bool = True) -> ModelSource:
    """Resolve one reference to a local model directory.

    Raises:
        ModelSourceError: the reference names nothing usable.
    """
    if ref.startswith(ZOO_PREFIX):
        from hfmerge.zoo import zoo_model

        return ModelSource(ref=ref, path=zoo_model(ref[len(ZOO_PREFIX) :], progress=progress))
    path = Path(ref).expanduser()
    if path.is_dir():
        return ModelSource(ref=ref, path=path.resolve())
    if path.exists():
        raise ModelSourceError(
            ref,
            "is a file, not a model directory",
            "name the directory that holds config.json and *.safetensors",
        )
    if is_hub_id(ref):
        raise ModelSourceError(
            ref,
            "is not a local directory, and this build of hfmerge reads local models only",
            "download it first (`hf download " + split_revision(ref)[0] + " --local-dir DIR`) "
            "and name DIR in the recipe",
        )
    raise ModelSourceError(
        ref, "no such directory", "give a model directory, `zoo:NAME` or a Hub id `org/name`"
    )
