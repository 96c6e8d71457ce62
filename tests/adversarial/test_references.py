"""Model references that name nothing: mistyped paths shaped like Hub ids, paths written relative to
the recipe's folder, `~` of an unknown user.

Relative paths are read from the current directory (as `output.path` is). Every such error shows
the absolute local path that was tried, says whether the reference could have been a Hub id,
and offers the fix: the close folder that exists, or the recipe-folder spelling.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hfmerge.cli.app import main
from hfmerge.errors import HubError, ModelSourceError
from hfmerge.sources.refs import local_path, pin_model
from tests.adversarial.cli_failures import fails
from tests.support.fakehub import FakeHub, unused_port
from tests.support.fakehub_models import seed_llama, write_recipe
from tests.support.tiny_models import save_tiny_model

NEITHER = "is neither an existing local directory nor reachable on the Hub"


@pytest.fixture
def local_models(chdir_tmp: Path) -> Path:
    """models/base and models/my-model (tiny Llamas) in the working directory."""
    save_tiny_model("llama", chdir_tmp / "models" / "base", seed=0)
    save_tiny_model("llama", chdir_tmp / "models" / "my-model", seed=1)
    return chdir_tmp / "models"


def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode, as a user without network sets it (tests/conftest.py sets it too)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_a_mistyped_local_path_shaped_like_a_hub_id_offline(
    local_models: Path,
    chdir_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    offline(monkeypatch)
    recipe = write_recipe(chdir_tmp / "r.yaml", ["models/base", "models/mymodel"])
    for command in (["validate", str(recipe)], ["run", str(recipe)]):
        err = fails(command, capsys)
        assert f"Model models/mymodel: {NEITHER}" in err
        assert f"the local path {chdir_tmp / 'models' / 'mymodel'} does not exist" in err
        assert "offline mode is on" in err
        assert "check the path (did you mean models/my-model?)" in err
        assert "if it is a Hub id, run the same command once online" in err
    assert not (chdir_tmp / "merged").exists()


def test_a_mistyped_local_path_the_hub_does_not_know(
    fake_hub: FakeHub, local_models: Path, chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(chdir_tmp / "r.yaml", ["models/base", "models/mymodel"])
    err = fails(["run", str(recipe)], capsys)
    assert f"Model models/mymodel: {NEITHER}" in err
    assert f"Hub repo models/mymodel: does not exist on {fake_hub.url}" in err
    assert "did you mean models/my-model?" in err
    assert "if it is a Hub id, check" in err
    assert not (chdir_tmp / "merged").exists()


def test_a_missing_hub_id_with_nothing_local_stays_a_hub_error(
    fake_hub: FakeHub, chdir_tmp: Path
) -> None:
    with pytest.raises(HubError) as caught:
        pin_model("org/does-not-exist")
    assert caught.value.kind == "not_found"


def test_hub_ids_still_win_when_their_namespace_is_a_local_folder(
    fake_hub: FakeHub, tmp_path: Path, chdir_tmp: Path
) -> None:
    seed_llama(fake_hub, tmp_path, "org/a", seed=0)
    seed_llama(fake_hub, tmp_path, "org/b", seed=1)
    (chdir_tmp / "org" / "notes").mkdir(parents=True)  # a local org/ that holds neither model
    recipe = write_recipe(chdir_tmp / "r.yaml", ["org/a", "org/b"])
    assert main(["run", str(recipe)]) == 0
    assert (chdir_tmp / "merged" / "model.safetensors").is_file()


def test_an_unreachable_hub_names_the_local_path_tried(
    fake_hub: FakeHub,
    chdir_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = unused_port()  # a port on 127.0.0.1 that nothing listens on
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    save_tiny_model("llama", chdir_tmp / "a", seed=0)
    recipe = write_recipe(chdir_tmp / "r.yaml", ["a", "someorg/model"])
    err = fails(["validate", str(recipe)], capsys)
    assert f"Model someorg/model: {NEITHER}" in err
    assert f"the local path {chdir_tmp / 'someorg' / 'model'} does not exist" in err
    assert f"cannot reach http://127.0.0.1:{port}" in err
    assert f"relative paths are read from the current directory ({chdir_tmp})" in err


@pytest.mark.parametrize(
    "ref", ["./models/mymodel", "../models/mymodel", "~/models/mymodel", "models/my-model/../x"]
)
def test_a_path_spelt_as_a_path_is_never_sent_to_the_hub(
    ref: str,
    local_models: Path,
    chdir_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("HOME", str(chdir_tmp))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # any request would fail loudly
    recipe = write_recipe(chdir_tmp / "r.yaml", ["models/base", ref])
    err = fails(["validate", str(recipe)], capsys)
    assert f"Model {ref}: no such directory ({local_path(ref)})" in err
    assert str(local_path(ref)).startswith("/")
    assert "~" not in str(local_path(ref))
    assert "Hub repo" not in err
    assert "127.0.0.1:9" not in err


def test_an_absolute_path_error_offers_the_close_folder(
    local_models: Path, chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = str(chdir_tmp / "models" / "my_model")
    recipe = write_recipe(chdir_tmp / "r.yaml", ["models/base", ref])
    err = fails(["validate", str(recipe)], capsys)
    assert f"Model {ref}: no such directory ({ref})" in err
    assert "did you mean models/my-model?" in err
    assert "relative paths are read" not in err  # the rule does not concern an absolute path


def test_tilde_of_an_unknown_user_is_an_error_not_a_traceback(
    local_models: Path, chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(chdir_tmp / "r.yaml", ["models/base", "~no-such-user-xyz/model"])
    err = fails(["validate", str(recipe)], capsys)
    assert f"no such directory ({chdir_tmp / '~no-such-user-xyz' / 'model'})" in err


def test_eval_of_a_mistyped_path_says_neither_local_nor_on_the_hub(
    local_models: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    offline(monkeypatch)
    err = fails(["eval", "models/mymodel"], capsys)
    assert f"Model models/mymodel: {NEITHER}" in err
    assert "did you mean models/my-model?" in err


# ---- the relative-path rule: the current directory, never the recipe's folder -------------------


@pytest.fixture
def recipe_beside_models(chdir_tmp: Path) -> Path:
    """project/recipe.yaml naming models/a and models/b, which sit in project/models/."""
    project = chdir_tmp / "project"
    save_tiny_model("llama", project / "models" / "a", seed=0)
    save_tiny_model("llama", project / "models" / "b", seed=1)
    return write_recipe(project / "recipe.yaml", ["./models/a", "./models/b"], out="merged")


def test_relative_paths_are_read_from_the_current_directory(
    recipe_beside_models: Path, chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = fails(["run", str(recipe_beside_models)], capsys)
    assert f"Model ./models/a: no such directory ({chdir_tmp / 'models' / 'a'})" in err
    assert (
        "relative paths are read from the current directory, not the recipe's folder "
        "(did you mean project/models/a?)" in err
    )
    assert "2 problems with the input models" in err  # both, at once
    assert not (chdir_tmp / "merged").exists()
    assert not (chdir_tmp / "project" / "merged").exists()


def test_the_same_recipe_runs_from_its_own_folder(
    recipe_beside_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = recipe_beside_models.parent
    monkeypatch.chdir(project)
    assert main(["run", "recipe.yaml"]) == 0
    assert (project / "merged" / "model.safetensors").is_file()  # output.path: same rule


def test_a_route_recipe_gets_the_same_hint(
    chdir_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = chdir_tmp / "project"
    save_tiny_model("llama", project / "experts" / "code", seed=0)
    save_tiny_model("llama", chdir_tmp / "prose", seed=1)
    recipe = project / "routed.yaml"
    recipe.write_text(
        f"models: [experts/code, {chdir_tmp / 'prose'}]\n"
        "route:\n  experts: [{data: builtin:code}, {data: builtin:prose}]\n"
    )
    err = fails(["validate", str(recipe)], capsys)
    assert f"Model experts/code: {NEITHER}" in err  # Hub-shaped, and offline
    assert f"the local path {chdir_tmp / 'experts' / 'code'} does not exist" in err
    assert "not the recipe's folder (did you mean project/experts/code?)" in err


def test_pin_model_error_fields_name_the_reference(local_models: Path) -> None:
    with pytest.raises(ModelSourceError) as caught:
        pin_model("./models/nope")
    assert caught.value.model == "./models/nope"
    assert str(local_path("./models/nope")) in caught.value.what
    assert "give a model directory, `zoo:NAME` or a Hub id" in caught.value.fix
