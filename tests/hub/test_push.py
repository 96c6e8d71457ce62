"""Pushing outputs to the loopback Hub: one commit, retries, and `hfmerge push` to finish."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from hfmerge import hub
from hfmerge.cli.app import main
from tests.support.fakehub import TOKEN, FakeHub, card_metadata
from tests.support.fakehub_models import seed_llama, write_recipe

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
def merged(
    fake_hub: FakeHub, tmp_path: Path, chdir_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """The recipe r.yaml merging org/a and org/b into ./merged (not yet run); fast retries."""
    monkeypatch.setattr(hub.push, "PUSH_BACKOFF_S", 0.01)
    seed_llama(fake_hub, tmp_path, "org/a", seed=0)
    seed_llama(fake_hub, tmp_path, "org/b", seed=1)
    return write_recipe(chdir_tmp / "r.yaml", ["org/a", "org/b"])


def remote_files(fake_hub: FakeHub, repo_id: str) -> dict[str, bytes]:
    repo = fake_hub.repo(repo_id)
    return {p: f.data for p, f in repo.commits[repo.branches["main"]].items()}


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_push_retries_server_errors_and_makes_one_commit(
    fake_hub: FakeHub, merged: Path, chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(merged)]) == 0
    capsys.readouterr()
    fake_hub.fail("commit", times=2, status=500)
    assert main(["push", "merged", "org/pushed", "--private"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"{fake_hub.url}/org/pushed"
    assert "retrying" in captured.err
    assert TOKEN not in captured.out + captured.err
    assert [r.status for r in fake_hub.requests("commit")] == [500, 500, 200]
    assert len(fake_hub.requests("lfs_upload")) == 1  # a retry skips blobs already stored
    repo = fake_hub.repo("org/pushed")
    assert repo.private
    assert len(repo.history) == 2
    files = local_files(chdir_tmp / "merged")
    assert {
        p: d for p, d in remote_files(fake_hub, "org/pushed").items() if p != ".gitattributes"
    } == files
    assert "from_pretrained('org/pushed')" in files["README.md"].decode()  # named on push


@pytest.mark.slow
def test_a_push_that_fails_for_good_keeps_the_output_and_says_how_to_finish(
    fake_hub: FakeHub, merged: Path, chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_hub.fail("commit", times=1000, status=503)
    assert main(["run", str(merged), "--push", "org/merged"]) == 1
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert "The output in merged is complete, but pushing it to org/merged failed" in err
    assert "the Hub answered 503" in err
    assert "run `hfmerge push merged org/merged` to finish" in err
    assert len(fake_hub.requests("commit")) == hub.PUSH_ATTEMPTS
    assert captured.out.strip() == ""
    AutoModelForCausalLM.from_pretrained(chdir_tmp / "merged")  # the output is complete
    assert "from_pretrained('org/merged')" in (chdir_tmp / "merged" / "README.md").read_text()
    assert set(remote_files(fake_hub, "org/merged")) == {".gitattributes"}

    fake_hub.fail("commit", times=0)
    assert main(["push", "merged", "org/merged"]) == 0
    assert capsys.readouterr().out.strip() == f"{fake_hub.url}/org/merged"
    pushed = remote_files(fake_hub, "org/merged")
    assert {p: d for p, d in pushed.items() if p != ".gitattributes"} == local_files(
        chdir_tmp / "merged"
    )
    assert card_metadata(pushed["README.md"].decode())["base_model"] == ["org/a", "org/b"]
    every_file = b"".join(p.read_bytes() for p in chdir_tmp.rglob("*") if p.is_file())
    assert TOKEN.encode() not in every_file


@pytest.mark.parametrize("contents", [{}, {"README.md": b"# notes"}, {"config.json": b"{}"}])
def test_push_refuses_a_directory_that_is_not_a_model_output(
    fake_hub: FakeHub,
    chdir_tmp: Path,
    capsys: pytest.CaptureFixture[str],
    contents: dict[str, bytes],
) -> None:
    folder = chdir_tmp / "notes"
    folder.mkdir()
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    assert main(["push", "notes", "org/notes"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "Output notes: " in err
    assert "model output" in err
    assert fake_hub.log == []  # refused before any request


def test_run_push_checks_the_token_before_merging(
    fake_hub: FakeHub,
    merged: Path,
    chdir_tmp: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    assert main(["run", str(merged), "--push", "org/merged"]) == 1
    assert "pushing needs a Hub token, and none is set" in capsys.readouterr().err
    assert not (chdir_tmp / "merged").exists()
    assert fake_hub.log == []
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["run", str(merged), "--push", "bob/merged"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "your token belongs to 'alice', who cannot write to 'bob'" in err
    assert not (chdir_tmp / "merged").exists()
    assert main(["run", str(merged), "--push", "org/merged", "--offline"]) == 1
    assert "cannot be pushed to in offline mode" in capsys.readouterr().err


@pytest.mark.slow
def test_recipe_output_push_and_a_repush_without_stale_shards(
    fake_hub: FakeHub, merged: Path, chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sharded = write_recipe(
        chdir_tmp / "s.yaml",
        ["org/a", "org/b"],
        out="sharded",
        push="org/m",
        private=True,
        max_shard_size="100KB",
    )
    assert main(["run", str(sharded)]) == 0
    assert capsys.readouterr().out.split()[-1] == f"{fake_hub.url}/org/m"
    assert fake_hub.repo("org/m").private
    shards = {p for p in remote_files(fake_hub, "org/m") if p.startswith("model-")}
    assert len(shards) > 1

    single = write_recipe(chdir_tmp / "t.yaml", ["org/a", "org/b"], out="single", push="m")
    assert main(["run", str(single)]) == 0  # no namespace: the token owner's
    assert main(["push", "single", "org/m"]) == 0
    remote = remote_files(fake_hub, "org/m")
    assert "model.safetensors" in remote
    assert not shards & set(remote)
    assert "alice/m" in fake_hub.store.repos
