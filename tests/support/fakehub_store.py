"""The fake Hub's state: users, repos with branches and commits, and the LFS blob store.

Pure data and rules (who may read or write, which files go through LFS); no HTTP here.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

import yaml

# What the real Hub's default .gitattributes sends through LFS (the part that matters here).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".onnx")
LFS_MIN_SIZE = 10_000_000
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, as the Hub reports for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def goes_to_lfs(path: str, size: int, sample: bytes) -> bool:
    """The Hub's rule: LFS by name, by size, or when the first bytes are binary."""
    return path.endswith(LFS_SUFFIXES) or size > LFS_MIN_SIZE or b"\0" in sample


@dataclass(frozen=True)
class StoredFile:
    """One file of one commit."""

    data: bytes
    lfs: bool

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def git_oid(self) -> str:
        return git_blob_sha1(self.data)

    @property
    def etag(self) -> str:
        """What the client uses as the blob name in its cache."""
        return self.sha256 if self.lfs else self.git_oid

    def sibling(self, path: str) -> dict[str, Any]:
        """The file as `model_info` lists it."""
        entry: dict[str, Any] = {"rfilename": path, "size": self.size, "blobId": self.git_oid}
        if self.lfs:
            entry["lfs"] = {"size": self.size, "sha256": self.sha256, "pointerSize": 134}
        return entry

    def tree_entry(self, path: str) -> dict[str, Any]:
        """The file as the tree endpoint lists it."""
        entry: dict[str, Any] = {
            "type": "file",
            "oid": self.git_oid,
            "size": self.size,
            "path": path,
        }
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": 134}
        return entry


def stored(path: str, data: bytes) -> StoredFile:
    """A file stored the way the Hub would store it."""
    return StoredFile(data=data, lfs=goes_to_lfs(path, len(data), data[:512]))


@dataclass(frozen=True)
class User:
    """A token's owner and the organisations it may write to."""

    name: str
    orgs: tuple[str, ...] = ()

    def can_write(self, namespace: str) -> bool:
        return namespace == self.name or namespace in self.orgs


@dataclass
class Repo:
    """A model repo: branches point at commits; a commit is a full file tree."""

    repo_id: str
    private: bool = False
    gated: bool = False
    granted: set[str] = field(default_factory=set)  # users who accepted a gated repo's terms
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, StoredFile]] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)  # commit shas, oldest first

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    def resolve(self, revision: str | None) -> str | None:
        """A branch name or a known commit sha -> the commit sha; None if unknown."""
        revision = revision or "main"
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None

    def commit(self, changes: dict[str, StoredFile | None], *, branch: str = "main") -> str:
        """Apply `changes` (None deletes) on top of the branch head; the new commit's sha."""
        head = self.branches.get(branch)
        files = dict(self.commits[head]) if head else {}
        for path, content in changes.items():
            if content is None:
                files = {
                    p: f
                    for p, f in files.items()
                    if p != path and not p.startswith(path.rstrip("/") + "/")
                }
            else:
                files[path] = content
        sha = secrets.token_hex(20)
        self.commits[sha] = files
        self.branches[branch] = sha
        self.history.append(sha)
        return sha

    def card_data(self, sha: str) -> dict[str, Any] | None:
        """The YAML front matter of README.md at `sha`, as the Hub parses it."""
        readme = self.commits[sha].get("README.md")
        if readme is None:
            return None
        text = readme.data.decode("utf-8", errors="replace")
        if not text.startswith("---\n"):
            return None
        front = text[4:].split("\n---", 1)[0]
        data = yaml.safe_load(front)
        return data if isinstance(data, dict) else None

    def may_read(self, user: User | None) -> bool:
        return not self.private or (user is not None and user.can_write(self.namespace))

    def may_download(self, user: User | None) -> bool:
        """Gated repos show their metadata to all, their files only to granted users."""
        return self.may_read(user) and (
            not self.gated or (user is not None and user.name in self.granted)
        )


class Store:
    """Every repo and LFS object of the fake Hub, behind one lock."""

    def __init__(self, users: dict[str, User]) -> None:
        self.users = users  # token -> user
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> content, uploaded through LFS
        self.lock = threading.RLock()

    def create(self, repo_id: str, *, private: bool = False, gated: bool = False) -> Repo:
        """A new repo whose first commit holds .gitattributes, as on the Hub."""
        with self.lock:
            repo = Repo(repo_id, private=private, gated=gated)
            repo.commit({".gitattributes": StoredFile(GITATTRIBUTES, lfs=False)})
            self.repos[repo_id] = repo
            return repo
