"""The fake Hub's HTTP routes: what huggingface_hub 2.4 calls to read, download and push.

One method per route; each returns a `Reply`. Auth, gating and error headers (`X-Error-Code`)
follow the real Hub closely enough that the client raises its usual typed errors.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tests.support.fakehub_store import Repo, StoredFile, User, goes_to_lfs

if TYPE_CHECKING:
    from tests.support.fakehub import FakeHub

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"
# (method, path pattern, route name); the first match wins. HEAD uses the GET routes.
ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (m, re.compile(p), n)
    for m, p, n in [
        ("GET", r"^/api/whoami-v2$", "whoami"),
        ("POST", r"^/api/repos/create$", "create"),
        ("POST", r"^/api/validate-yaml$", "validate_yaml"),
        ("POST", rf"^/api/models/{_REPO}/preupload/{_REV}$", "preupload"),
        ("POST", rf"^/api/models/{_REPO}/commit/{_REV}$", "commit"),
        ("GET", rf"^/api/models/{_REPO}/tree/{_REV}(?:/(?P<path>.*))?$", "tree"),
        ("GET", rf"^/api/models/{_REPO}(?:/revision/{_REV})?$", "model_info"),
        ("POST", rf"^/{_REPO}\.git/info/lfs/objects/batch$", "lfs_batch"),
        ("PUT", r"^/__lfs/(?P<oid>[0-9a-f]{64})$", "lfs_upload"),
        ("POST", r"^/__lfs/(?P<oid>[0-9a-f]{64})/verify$", "lfs_verify"),
        ("GET", rf"^/{_REPO}/resolve/{_REV}/(?P<path>.+)$", "resolve"),
    ]
]


@dataclass
class Reply:
    """Status, headers and body of one response."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_length: int | None = None  # HEAD: the length the GET would have


def json_reply(status: int, payload: Any, **headers: str) -> Reply:
    return Reply(
        status, json.dumps(payload).encode(), {"Content-Type": "application/json", **headers}
    )


def error_reply(status: int, message: str, code: str | None = None, **headers: str) -> Reply:
    extra = {"X-Error-Message": message, **headers}
    if code:
        extra["X-Error-Code"] = code
    return json_reply(status, {"error": message}, **extra)


class HttpError(Exception):
    """Raised inside a route to answer with `reply`."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


@dataclass
class Request:
    """What a route sees of one request."""

    method: str
    params: dict[str, str]
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes
    user: User | None

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


class Routes:
    """Route implementations over the hub's store."""

    def __init__(self, hub: FakeHub) -> None:
        self.hub = hub
        self.store = hub.store

    def handler(self, name: str) -> Callable[[Request], Reply]:
        handler: Callable[[Request], Reply] = getattr(self, name)
        return handler

    # -- access ------------------------------------------------------------------------------
    def _repo(self, req: Request, *, write: bool = False, download: bool = False) -> Repo:
        repo = self.store.repos.get(req.params["repo"])
        if repo is None or not repo.may_read(req.user):
            # Like the Hub: unauthenticated callers get 401, others 404, both "not found".
            raise HttpError(
                error_reply(
                    401 if req.user is None else 404, "Repository not found", "RepoNotFound"
                )
            )
        if write and (req.user is None or not req.user.can_write(repo.namespace)):
            raise HttpError(error_reply(403, "You don't have the rights to write to this repo"))
        if download and not repo.may_download(req.user):
            raise HttpError(
                error_reply(
                    401 if req.user is None else 403,
                    "Access to this model is restricted",
                    "GatedRepo",
                )
            )
        return repo

    @staticmethod
    def _sha(repo: Repo, revision: str | None) -> str:
        sha = repo.resolve(revision)
        if sha is None:
            raise HttpError(error_reply(404, f"Invalid rev id: {revision}", "RevisionNotFound"))
        return sha

    # -- account and repos -------------------------------------------------------------------
    def whoami(self, req: Request) -> Reply:
        if req.user is None:
            return error_reply(401, "Invalid credentials in Authorization header")
        orgs = [{"name": org, "type": "org"} for org in req.user.orgs]
        return json_reply(
            200,
            {
                "type": "user",
                "name": req.user.name,
                "orgs": orgs,
                "auth": {"accessToken": {"role": "write"}},
            },
        )

    def create(self, req: Request) -> Reply:
        body = req.json()
        if req.user is None:
            return error_reply(401, "Invalid credentials in Authorization header")
        namespace = body.get("organization") or req.user.name
        repo_id = f"{namespace}/{body['name']}"
        url = f"{self.hub.url}/{repo_id}"
        with self.store.lock:
            if repo_id in self.store.repos:
                return json_reply(409, {"error": "You already created this model repo", "url": url})
            if not req.user.can_write(namespace):
                return error_reply(403, f"You cannot create a repo in {namespace}")
            self.store.create(repo_id, private=body.get("visibility") == "private")
        return json_reply(200, {"url": url})

    def validate_yaml(self, req: Request) -> Reply:
        return json_reply(200, {"errors": [], "warnings": []})

    def model_info(self, req: Request) -> Reply:
        repo = self._repo(req)
        sha = self._sha(repo, req.params.get("rev"))
        files = repo.commits[sha]
        card = repo.card_data(sha)
        return json_reply(
            200,
            {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": sha,
                "private": repo.private,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "author": repo.namespace,
                "lastModified": "2026-11-01T00:00:00.000Z",
                "tags": (card or {}).get("tags", []),
                "library_name": (card or {}).get("library_name"),
                "cardData": card,
                "siblings": [f.sibling(p) for p, f in sorted(files.items())],
            },
        )

    def tree(self, req: Request) -> Reply:
        repo = self._repo(req)
        files = repo.commits[self._sha(repo, req.params.get("rev"))]
        prefix = req.params.get("path", "").strip("/")
        recursive = req.query.get("recursive", ["false"])[0].lower() == "true"
        entries: dict[str, dict[str, Any]] = {}
        for path, stored in sorted(files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1 :] if prefix else path
            parts = rest.split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                folder = "/".join(([prefix] if prefix else []) + parts[:depth])
                if recursive or depth == 1:
                    entries[folder] = {"type": "directory", "oid": "0" * 40, "path": folder}
            if recursive or len(parts) == 1:
                entries[path] = stored.tree_entry(path)
        if prefix and not entries:
            return error_reply(404, f"{prefix} does not exist", "EntryNotFound")
        return json_reply(200, list(entries.values()))

    # -- upload ------------------------------------------------------------------------------
    def preupload(self, req: Request) -> Reply:
        repo = self._repo(req, write=True)
        files = repo.commits[self._sha(repo, req.params["rev"])]
        answers = []
        for item in req.json()["files"]:
            path, size = item["path"], int(item["size"])
            lfs = size > 0 and goes_to_lfs(path, size, base64.b64decode(item["sample"]))
            old = files.get(path)
            oid = None if old is None else (old.sha256 if lfs else old.git_oid)
            answers.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        return json_reply(200, {"files": answers})

    def lfs_batch(self, req: Request) -> Reply:
        self._repo(req, write=True)
        objects = []
        for obj in req.json()["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.store.blobs:  # no actions: already stored, skip
                href = f"{self.hub.url}/__lfs/{obj['oid']}"
                entry["actions"] = {"upload": {"href": href}, "verify": {"href": href + "/verify"}}
            objects.append(entry)
        return Reply(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            {"Content-Type": "application/vnd.git-lfs+json"},
        )

    def lfs_upload(self, req: Request) -> Reply:
        oid = req.params["oid"]
        if StoredFile(req.body, lfs=True).sha256 != oid:
            return error_reply(400, "content does not match its sha256")
        with self.store.lock:
            self.store.blobs[oid] = req.body
        return Reply(200)

    def lfs_verify(self, req: Request) -> Reply:
        blob = self.store.blobs.get(req.params["oid"])
        if blob is None or len(blob) != int(req.json().get("size", -1)):
            return error_reply(404, "object not stored")
        return json_reply(200, {})

    def commit(self, req: Request) -> Reply:
        repo = self._repo(req, write=True)
        branch = req.params["rev"]
        if branch not in repo.branches:
            return error_reply(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        header: dict[str, Any] = next((x["value"] for x in lines if x["key"] == "header"), {})
        changes: dict[str, StoredFile | None] = {}
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                changes[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                blob = self.store.blobs.get(value["oid"])
                if blob is None:
                    return error_reply(422, f"LFS object {value['oid']} was never uploaded")
                changes[value["path"]] = StoredFile(blob, lfs=True)
            elif key in ("deletedFile", "deletedFolder"):
                changes[value["path"]] = None
        with self.store.lock:
            parent = header.get("parentCommit")
            if parent and parent != repo.branches[branch]:
                return error_reply(412, "A commit has happened since. Please refresh and retry.")
            sha = repo.commit(changes, branch=branch)
        url = f"{self.hub.url}/{repo.repo_id}"
        return json_reply(
            200, {"commitOid": sha, "commitUrl": f"{url}/commit/{sha}", "pullRequestUrl": None}
        )

    # -- download ----------------------------------------------------------------------------
    def resolve(self, req: Request) -> Reply:
        repo = self._repo(req, download=True)
        sha = self._sha(repo, req.params["rev"])
        stored = repo.commits[sha].get(req.params["path"])
        if stored is None:
            return error_reply(404, "Entry not found", "EntryNotFound", **{"X-Repo-Commit": sha})
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{stored.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if stored.lfs:
            headers |= {"X-Linked-Etag": f'"{stored.etag}"', "X-Linked-Size": str(stored.size)}
        if req.method == "HEAD":
            return Reply(200, b"", headers, content_length=stored.size)
        first, last = _byte_range(req.headers.get("range"), stored.size)
        self._count_weight_bytes(req.params["path"], stored.data, first, last)
        body = stored.data[first : last + 1]
        if (first, last) == (0, stored.size - 1) and "range" not in req.headers:
            return Reply(200, body, headers)
        headers["Content-Range"] = f"bytes {first}-{last}/{stored.size}"
        return Reply(206, body, headers)

    def _count_weight_bytes(self, path: str, data: bytes, first: int, last: int) -> None:
        """Bytes served past a safetensors header are tensor data: count them."""
        if not path.endswith(".safetensors") or len(data) < 8:
            return
        header_end = 8 + struct.unpack("<Q", data[:8])[0]
        served = max(0, last + 1 - max(first, header_end))
        if served:
            self.hub.count_weight_bytes(path, served)


def _byte_range(header: str | None, size: int) -> tuple[int, int]:
    """`Range: bytes=a-b` (or `a-`, `-n`) -> inclusive (first, last), clipped to the file."""
    if not header:
        return 0, size - 1
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if match is None:
        raise HttpError(error_reply(416, f"unsupported range {header}"))
    start, end = match.groups()
    if not start:  # suffix range: the last n bytes
        return max(0, size - int(end)), size - 1
    first, last = int(start), min(int(end) if end else size - 1, size - 1)
    if first >= size or first > last:
        raise HttpError(
            error_reply(416, "range not satisfiable", **{"Content-Range": f"bytes */{size}"})
        )
    return first, last
