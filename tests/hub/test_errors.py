"""Preflight against the loopback Hub: every problem of every model at once, no weights fetched."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hfmerge import hub
from hfmerge.cli.app import main
from hfmerge.errors import HubError, ModelSourceError
from tests.support.fakehub import OTHER_TOKEN, TOKEN, FakeHub, unused_port
from tests.support.fakehub_models import seed_llama, write_recipe


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.slow
def test_every_preflight_problem_of_every_model_at_once_without_weights(
    fake_hub: FakeHub, tmp_path: Path, chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_llama(fake_hub, tmp_path, "org/a", seed=0)
    seed_llama(fake_hub, tmp_path, "org/gated", seed=1, gated=True)
    seed_llama(fake_hub, tmp_path, "bob/secret", seed=2, private=True)
    seed_llama(fake_hub, tmp_path, "org/wide", seed=3, intermediate_size=128)
    models = ["org/a", "org/missing", "org/a@no-such-branch", "org/gated", "bob/secret", "org/wide"]
    recipe = write_recipe(chdir_tmp / "r.yaml", models)
    for command in (
        ["validate", str(recipe)],
        ["run", str(recipe)],
        ["run", str(recipe), "--dry-run"],
    ):
        assert main(command) == 1
        err = one_line(capsys.readouterr().err)
        assert "5 problems with the input models" in err
        assert "Hub repo org/missing: does not exist" in err
        assert "Hub repo org/a@no-such-branch: has no revision 'no-such-branch'" in err
        gated_sha = fake_hub.head("org/gated")
        assert f"Hub repo org/gated@{gated_sha}: is gated and your token has no access" in err
        assert "accept its conditions" in err
        assert "Hub repo bob/secret: does not exist" in err
        assert "it is private" in err
        assert "Models org/a and org/wide are not compatible" in err
        assert "mlp.up_proj.weight has shape [96, 64] vs [128, 64]" in err
        assert "Traceback" not in err
    assert fake_hub.weight_bytes_served == 0
    assert not (chdir_tmp / "merged").exists()


def test_a_missing_model_fails_within_seconds_naming_it(
    fake_hub: FakeHub, tmp_path: Path, chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_llama(fake_hub, tmp_path, "org/a", seed=0)
    recipe = write_recipe(chdir_tmp / "r.yaml", ["org/a", "org/does-not-exist"])
    capsys.readouterr()
    start = time.monotonic()
    assert main(["run", str(recipe)]) == 1
    assert time.monotonic() - start < 5
    err = one_line(capsys.readouterr().err)
    assert err.startswith("error: Hub repo org/does-not-exist: does not exist on http://127.0.0.1:")
    assert "check the repo id's spelling" in err
    assert fake_hub.weight_bytes_served == 0
    assert not (chdir_tmp / "merged").exists()


def test_gated_and_private_repos_open_to_the_right_token(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_llama(fake_hub, tmp_path, "org/gated", seed=1, gated=True)
    seed_llama(fake_hub, tmp_path, "bob/secret", seed=2, private=True)
    sha = hub.resolve_revision("org/gated", None)  # a gated repo's metadata is public
    with pytest.raises(HubError) as gated:
        hub.remote_config("org/gated", sha)
    assert gated.value.kind == "gated"
    fake_hub.repo("org/gated").granted.add("alice")
    assert hub.remote_config("org/gated", sha)["model_type"] == "llama"

    with pytest.raises(HubError) as hidden:
        hub.pin("bob/secret", None)
    assert hidden.value.kind == "not_found"
    monkeypatch.setenv("HF_TOKEN", OTHER_TOKEN)
    pinned = hub.pin("bob/secret", None)
    assert pinned.sha == fake_hub.head("bob/secret")
    assert pinned.license == "apache-2.0"
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="no token is set"):
        hub.pin("bob/secret", None)


def test_a_rejected_token_is_named_as_such_and_never_shown(
    fake_hub: FakeHub,
    tmp_path: Path,
    chdir_tmp: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seed_llama(fake_hub, tmp_path, "org/a", seed=0)
    bad = "hf_" + "x" * 30
    monkeypatch.setenv("HF_TOKEN", bad)
    recipe = write_recipe(chdir_tmp / "r.yaml", ["org/a", "org/a"])
    assert main(["validate", str(recipe)]) == 1
    captured = capsys.readouterr()
    err = one_line(captured.err)
    assert "Hub repo org/a: the Hub rejected the token (401 Unauthorized)" in err
    assert "settings/tokens" in err
    assert bad not in captured.err + captured.out
    assert TOKEN not in captured.err
    assert fake_hub.weight_bytes_served == 0


def test_conflicting_revisions_and_bad_ids_are_refused_before_any_request(
    fake_hub: FakeHub, chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(chdir_tmp / "r.yaml", [{"model": "org/a@v1", "revision": "v2"}, "org/a"])
    assert main(["validate", str(recipe)]) == 1
    assert "names revision 'v1' and also `revision: v2`" in one_line(capsys.readouterr().err)
    with pytest.raises(HubError) as caught:
        hub.pin("org/" + "x" * 120, None)
    assert caught.value.kind == "invalid"
    assert [r.route for r in fake_hub.log] == ["model_info"]  # only org/a was asked about


def test_pickle_only_repo_is_refused_clearly_and_never_downloaded(
    fake_hub: FakeHub, tmp_path: Path, chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_llama(fake_hub, tmp_path, "org/a", seed=0)
    fake_hub.store.create("org/pickled")
    config = fake_hub.file("org/a", "config.json")
    fake_hub.commit_files(
        "org/pickled", {"config.json": config, "pytorch_model.bin": b"\x80\x04pickle" * 100}
    )
    recipe = write_recipe(chdir_tmp / "r.yaml", ["org/a", "org/pickled"])
    assert main(["validate", str(recipe)]) == 1
    err = one_line(capsys.readouterr().err)
    assert "Model org/pickled: has only pickle checkpoints (pytorch_model.bin)" in err
    assert "unpickling a file can run arbitrary code" in err
    assert not [r for r in fake_hub.log if r.path.endswith(".bin") and r.method == "GET"]
    with pytest.raises(ModelSourceError, match="pickle"):
        hub.download("org/pickled", fake_hub.head("org/pickled"), allow_patterns=["*.bin"])


def test_an_unreachable_hub_is_a_network_error(
    monkeypatch: pytest.MonkeyPatch, fake_hub: FakeHub
) -> None:
    port = unused_port()  # a port on 127.0.0.1 that nothing listens on
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(HubError) as caught:
        hub.pin("org/a", None)
    assert caught.value.kind == "network"
    assert f"cannot reach http://127.0.0.1:{port}" in caught.value.message()
    assert "--offline" in caught.value.message()
