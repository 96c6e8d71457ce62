"""Credentials written into HF_ENDPOINT never show: not in errors, hints, URLs, cards or logs.

A Hub behind a proxy is often reached as `https://user:password@host`. The requests need those
credentials; nothing hfmerge prints or writes may carry them. These tests run the real
`huggingface_hub` client against the fake Hub (`tests/support/fakehub.py`) with such an endpoint.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from hfmerge.cli.app import main
from hfmerge.hub import redact_url
from tests.adversarial.cli_failures import fails, one_line
from tests.support.fakehub import FakeHub, unused_port
from tests.support.fakehub_models import seed_llama, write_recipe
from tests.support.fakehub_store import User

# The client's own LFS upload passes bytes as `data=`, which httpx2 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

USER = "merger"
SECRET = "pr0xy-s3cret-5e55ion"


def with_credentials(url: str) -> str:
    return url.replace("http://", f"http://{USER}:{SECRET}@", 1)


def point_client_at(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """HF_ENDPOINT (and the client's copy, read at import) set to `endpoint`."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)


@pytest.fixture
def secret_hub(fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    """The fake Hub with org/a and org/b, reached through an endpoint carrying credentials.

    The client sends the URL's credentials as HTTP basic auth (in place of the token's bearer
    header), so the Hub knows them as alice's, as a proxy in front of a Hub would.
    """
    seed_llama(fake_hub, tmp_path, "org/a", seed=0)
    seed_llama(fake_hub, tmp_path, "org/b", seed=1)
    basic = "Basic " + base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
    fake_hub.store.users[basic] = User("alice", ("org",))
    point_client_at(monkeypatch, with_credentials(fake_hub.url))
    return fake_hub


def everything_written(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:secret@hub.example", "https://hub.example"),
        ("https://user:p@ss@hub.example/org/a", "https://hub.example/org/a"),
        ("https://token@hub.example:8443/", "https://hub.example:8443/"),
        ("https://hub.example/x?token=abc&page=2", "https://hub.example/x?token=***&page=2"),
        ("https://hub.example/x?page=2&api_key=abc", "https://hub.example/x?page=2&api_key=***"),
        (
            "https://h/f?X-Amz-Signature=abc#access_token=d",
            "https://h/f?X-Amz-Signature=***#access_token=***",
        ),
        ("see https://u:s@h/a and http://v:t@g/b", "see https://h/a and http://g/b"),
        ("https://huggingface.co", "https://huggingface.co"),
        ("http://[not-a-url", "http://[not-a-url"),
    ],
)
def test_redact_url_drops_credentials_and_keeps_the_address(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_a_rejected_credential_is_not_echoed_in_the_error(
    fake_hub: FakeHub,
    tmp_path: Path,
    chdir_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed_llama(fake_hub, tmp_path, "org/a", seed=0)
    point_client_at(monkeypatch, with_credentials(fake_hub.url))  # unknown: every request is 401
    recipe = write_recipe(chdir_tmp / "r.yaml", ["org/a", "org/a@main"])
    for command in (["validate", str(recipe)], ["run", str(recipe)]):
        err = fails(command, capsys)
        assert "the Hub rejected the token (401 Unauthorized)" in err
        assert f"set HF_TOKEN to a token from {fake_hub.url}/settings/tokens" in err
        assert SECRET not in err
        assert f"{USER}:" not in err
    assert not (chdir_tmp / "merged").exists()


def test_a_missing_repo_names_the_host_without_credentials(
    secret_hub: FakeHub, chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(chdir_tmp / "r.yaml", ["org/a", "org/missing"])
    err = fails(["run", str(recipe)], capsys)
    assert f"Hub repo org/missing: does not exist on {secret_hub.url}, or it is private" in err
    assert "check the repo id's spelling" in err
    assert SECRET not in err
    assert not (chdir_tmp / "merged").exists()


def test_an_unreachable_endpoint_is_named_without_credentials(
    fake_hub: FakeHub,
    chdir_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = unused_port()  # a port on 127.0.0.1 that nothing listens on
    point_client_at(monkeypatch, with_credentials(f"http://127.0.0.1:{port}"))
    recipe = write_recipe(chdir_tmp / "r.yaml", ["org/a", "org/b"])
    err = fails(["run", str(recipe)], capsys)
    assert f"cannot reach http://127.0.0.1:{port} to read it" in err
    assert "check the network connection and HF_ENDPOINT" in err
    assert SECRET not in err
    assert not (chdir_tmp / "merged").exists()


def test_a_run_and_push_print_and_write_no_credentials(
    secret_hub: FakeHub, chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(chdir_tmp / "r.yaml", ["org/a", "org/b"])
    capsys.readouterr()
    assert main(["run", str(recipe), "--push", "org/merged"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == f"{secret_hub.url}/org/merged"  # the repo's URL, usable
    assert SECRET not in out + err
    assert f"{USER}:" not in out + err
    card = (chdir_tmp / "merged" / "README.md").read_text()
    sha = secret_hub.head("org/a")
    assert f"({secret_hub.url}/org/a/tree/{sha})" in card  # inputs linked on the Hub they came from
    assert SECRET not in everything_written(chdir_tmp / "merged")
    assert SECRET not in secret_hub.file("org/merged", "README.md").decode()
    capsys.readouterr()
    assert main(["push", str(chdir_tmp / "merged"), "org/again"]) == 0
    out, err = capsys.readouterr()
    assert one_line(out) == f"{secret_hub.url}/org/again"
    assert SECRET not in out + err


@pytest.fixture
def client_log() -> Iterator[io.StringIO]:
    """What the client's own log handler prints (its stream swapped for a buffer)."""
    client_logger = logging.getLogger("huggingface_hub")
    handlers = [h for h in client_logger.handlers if isinstance(h, logging.StreamHandler)]
    assert handlers, "the client logs through a stream handler of its own"
    buffer = io.StringIO()
    streams = [h.setStream(buffer) for h in handlers]
    yield buffer
    for handler, stream in zip(handlers, streams, strict=True):
        handler.setStream(stream)


def test_the_clients_retry_warnings_show_no_credentials(
    secret_hub: FakeHub, client_log: io.StringIO
) -> None:
    from huggingface_hub.utils import http_backoff  # type: ignore[attr-defined]

    secret_hub.fail("model_info", times=1, status=503)
    url = with_credentials(secret_hub.url) + "/api/models/org/a"
    response = http_backoff("GET", url, base_wait_time=0.01, max_wait_time=0.01)
    assert response.status_code == 200  # the retry went through, with the credentials
    logged = client_log.getvalue()
    assert f"HTTP Error 503 thrown while requesting GET {secret_hub.url}/api/models/org/a" in logged
    assert SECRET not in logged
