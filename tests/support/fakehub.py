"""A Hub-compatible HTTP server on 127.0.0.1 for tests, and the `fake_hub` pytest fixture.

The real `huggingface_hub` client talks to it (routes in `fakehub_routes.py`, state in
`fakehub_store.py`); tests seed repos, inject failures and read the request log.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from tests.support.fakehub_routes import ROUTES, HttpError, Reply, Request, Routes, error_reply
from tests.support.fakehub_store import Repo, Store, User, stored

TOKEN = "hf_fakehub_alice_0123456789"  # alice, member of org
OTHER_TOKEN = "hf_fakehub_bob_0123456789"  # bob, no organisation


@dataclass(frozen=True)
class LoggedRequest:
    """One request as the server saw it."""

    method: str
    path: str
    route: str
    status: int
    range: str | None


class FakeHub:
    """In-memory Hub: start it, seed it, point the client at `url`."""

    def __init__(self, *, port: int = 0) -> None:
        self.store = Store({TOKEN: User("alice", ("org",)), OTHER_TOKEN: User("bob")})
        self.routes = Routes(self)
        self.log: list[LoggedRequest] = []
        self.weight_bytes: dict[str, int] = {}  # file -> tensor-data bytes served
        self._failures: dict[str, tuple[int, int]] = {}  # route -> (remaining, status)
        self._lock = threading.Lock()
        self._server = _HubServer(("127.0.0.1", port), _Handler, self)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- seeding -----------------------------------------------------------------------------
    def add_model(
        self,
        repo_id: str,
        folder: Path,
        *,
        private: bool = False,
        gated: bool = False,
        license: str | None = None,
    ) -> str:
        """Create `repo_id` holding every file of `folder` (plus a card with `license`)."""
        repo = self.store.create(repo_id, private=private, gated=gated)
        files = {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
        if license:
            files["README.md"] = f"---\nlicense: {license}\n---\n# {repo_id}\n".encode()
        return self.commit_files(repo.repo_id, files)

    def commit_files(self, repo_id: str, files: Mapping[str, bytes | None]) -> str:
        """A new commit on main (None deletes a file); its sha."""
        with self.store.lock:
            changes = {p: None if d is None else stored(p, d) for p, d in files.items()}
            return self.repo(repo_id).commit(changes)

    def repo(self, repo_id: str) -> Repo:
        return self.store.repos[repo_id]

    def head(self, repo_id: str) -> str:
        return self.repo(repo_id).branches["main"]

    def file(self, repo_id: str, path: str, *, revision: str = "main") -> bytes:
        repo = self.repo(repo_id)
        sha = repo.resolve(revision)
        assert sha is not None
        return repo.commits[sha][path].data

    # -- failures and observation ------------------------------------------------------------
    def fail(self, route: str, *, times: int, status: int = 500) -> None:
        """Answer the next `times` requests of `route` with `status`."""
        with self._lock:
            self._failures[route] = (times, status)

    def take_failure(self, route: str) -> int | None:
        with self._lock:
            remaining, status = self._failures.get(route, (0, 0))
            if remaining <= 0:
                return None
            self._failures[route] = (remaining - 1, status)
            return status

    def record(self, entry: LoggedRequest) -> None:
        with self._lock:
            self.log.append(entry)

    def count_weight_bytes(self, path: str, count: int) -> None:
        with self._lock:
            self.weight_bytes[path] = self.weight_bytes.get(path, 0) + count

    @property
    def weight_bytes_served(self) -> int:
        """Bytes of tensor data (past any safetensors header) served so far."""
        return sum(self.weight_bytes.values())

    def requests(self, route: str | None = None) -> list[LoggedRequest]:
        with self._lock:
            return [r for r in self.log if route is None or r.route == route]


class _HubServer(ThreadingHTTPServer):
    """The HTTP server, holding the hub its handlers serve."""

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], hub: FakeHub
    ) -> None:
        super().__init__(address, handler)
        self.hub = hub


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def log_message(self, format: str, *args: object) -> None:
        pass  # the request log is kept in FakeHub.log

    def _serve(self, method: str) -> None:
        assert isinstance(self.server, _HubServer)
        hub = self.server.hub
        url = urlsplit(self.path)
        body = self._read_body()
        route, reply = self._route(hub, method, url.path, url.query, body)
        hub.record(LoggedRequest(method, url.path, route, reply.status, self.headers["Range"]))
        self._send(reply, head=method == "HEAD")

    def _route(
        self, hub: FakeHub, method: str, path: str, query: str, body: bytes
    ) -> tuple[str, Reply]:
        found = _find_route(method, path)
        if found is None:
            return "unknown", error_reply(404, f"no route for {method} {path}")
        name, match = found
        status = hub.take_failure(name)
        if status is not None:
            return name, error_reply(status, f"injected failure of {name}")
        token = (self.headers.get("authorization") or "").removeprefix("Bearer ").strip()
        user = hub.store.users.get(token)
        if token and user is None and name != "lfs_upload":
            return name, error_reply(401, "Invalid credentials in Authorization header")
        params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
        headers = {k.lower(): v for k, v in self.headers.items()}
        request = Request(method, params, parse_qs(query), headers, body, user)
        try:
            with hub.store.lock:
                return name, hub.routes.handler(name)(request)
        except HttpError as exc:
            return name, exc.reply

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()  # the blank line after the last chunk
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, reply: Reply, *, head: bool) -> None:
        self.send_response(reply.status)
        length = reply.content_length if reply.content_length is not None else len(reply.body)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if not head:
            self.wfile.write(reply.body)


def _find_route(method: str, path: str) -> tuple[str, re.Match[str]] | None:
    for verb, pattern, name in ROUTES:
        match = pattern.match(path)
        if match and (verb == method or (method == "HEAD" and verb == "GET")):
            return name, match
    return None


@pytest.fixture
def fake_hub(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeHub]:
    """A running fake Hub; the client (env and `huggingface_hub.constants`) points at it.

    HF_HOME is a fresh directory, the token is alice's (member of `org`), Xet and telemetry are
    off, and offline mode is off.
    """
    from huggingface_hub import constants

    hub = FakeHub().start()
    home = tmp_path_factory.mktemp("fakehub-home")
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": TOKEN,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # Read once at import time by the client, so they are patched as well.
    patches: dict[str, object] = {
        "ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
    }
    for constant, setting in patches.items():
        monkeypatch.setattr(constants, constant, setting)
    yield hub
    hub.stop()


def use_cache(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """Point both the environment and the client's constants at another HF cache."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def card_metadata(readme: str) -> dict[str, object]:
    """The YAML front matter of a model card."""
    import yaml

    assert readme.startswith("---\n"), readme[:80]
    data = yaml.safe_load(readme[4:].split("\n---", 1)[0])
    assert isinstance(data, dict)
    return data


def serve(argv: list[str] | None = None) -> None:
    """`python tests/support/fakehub.py [--port N] [--seed DIR] [--fail ...]`: serve until Ctrl-C.

    `--seed DIR` first publishes tiny Llamas org/a and org/b (seeds 0 and 1), saved under DIR.
    """
    import argparse
    import time

    parser = argparse.ArgumentParser(description=serve.__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", type=Path, help="publish org/a and org/b, built in this folder")
    parser.add_argument(
        "--fail",
        metavar="ROUTE:TIMES:STATUS",
        action="append",
        default=[],
        help="answer the first TIMES requests of ROUTE (e.g. commit) with STATUS",
    )
    args = parser.parse_args(argv)
    hub = FakeHub(port=args.port).start()
    for spec in args.fail:
        route, times, status = spec.split(":")
        hub.fail(route, times=int(times), status=int(status))
    if args.seed:
        from tests.support.fakehub_models import seed_llama

        for repo_id, seed in (("org/a", 0), ("org/b", 1)):
            print(f"{repo_id} at {seed_llama(hub, args.seed, repo_id, seed=seed)}", flush=True)
    print(f"HF_ENDPOINT={hub.url} HF_TOKEN={TOKEN} HF_HUB_DISABLE_XET=1", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        hub.stop()


if __name__ == "__main__":
    serve()


def unused_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: an endpoint that cannot be reached."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
