"""The routed repo format: manifest validation with clear errors, bundling, Hub-pinned experts."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from hfmerge.errors import IncompatibleModelsError, RoutedRepoError, UnknownNameError
from hfmerge.recipe.schema import ProbeSpec, RouteSpec
from hfmerge.routing import (
    MANIFEST_FILE,
    ROUTER_FILE,
    BackboneRef,
    ExpertEntry,
    ModelLocation,
    RoutedModel,
    build_router,
    is_routed_repo,
    read_manifest,
    routed_manifest,
    write_routed_repo,
)
from hfmerge.routing.manifest import parse_manifest
from hfmerge.routing.repo import open_routed_repo
from tests.support.fakehub import FakeHub
from tests.support.routing import (
    NAMES,
    build,
    digit_texts,
    letter_texts,
    save_experts,
    write_bundled,
)

SHA = "0123456789abcdef0123456789abcdef01234567"


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/support/fixtures.py one_thread


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_experts(tmp_path_factory.mktemp("experts"))


@pytest.fixture(scope="module")
def repo(experts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bundled(
        build("centroid", experts), experts, tmp_path_factory.mktemp("routed") / "repo"
    )


def manifest_json(repo: Path) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((repo / MANIFEST_FILE).read_text(encoding="utf-8"))
    return manifest


def test_manifest_round_trips_and_bundles_by_hard_link(
    repo: Path, experts: dict[str, Path]
) -> None:
    data = manifest_json(repo)
    assert data["format_version"] == 1
    assert data["experts"] == [
        {"name": n, "path": f"experts/{n}", "dtype": "float32"} for n in NAMES
    ]
    assert data["router"] | {"layer": None} == {
        "type": "centroid",
        "backbone": {"expert": "digits"},
        "layer": None,
        "pooling": "mean",
        "temperature": 0.1,
        "min_confidence": None,
        "default_expert": None,
        "max_length": 32,
    }
    assert parse_manifest(data).to_json() == data
    weights = repo / "experts" / "digits" / "model.safetensors"
    assert os.path.samefile(weights, experts["digits"] / "model.safetensors")
    assert is_routed_repo(repo)
    assert not is_routed_repo(experts["digits"])


Edit = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = data
        for key in parents:
            target = target[int(key)] if key.isdigit() else target[key]
        target[int(last) if last.isdigit() else last] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set("format_version", 3), "format_version: 3 is not a version this hfmerge reads"),
        (_set("experts.0.adapter", "lora"), r"experts\[0\].adapter: must be a JSON object"),
        (
            _set("experts.0.adapter", {"path": "../lora"}),
            r"experts\[0\].adapter.path: '../lora' is not a plain relative folder",
        ),
        (
            _set("experts.0.adapter", {"repo_id": "org/lora", "revision": "main"}),
            r"experts\[0\].adapter.revision: 'main' is not a 40-hex commit sha",
        ),
        (_set("experts", []), "experts: lists 0 expert"),
        (_set("experts.1.name", "digits"), r"experts\[1\].name: 'digits' appears twice"),
        (_set("experts.0.path", "../elsewhere"), "is not a plain relative folder"),
        (_set("experts.0.path", "/etc"), "is not a plain relative folder"),
        (
            _set("experts.0", {"name": "a", "repo_id": "org/a", "revision": "main"}),
            r"experts\[0\].revision: 'main' is not a 40-hex commit sha",
        ),
        (
            _set("experts.0", {"name": "a", "repo_id": "org/a", "revision": SHA, "path": "x"}),
            "gives both `path` and `repo_id`",
        ),
        (_set("experts.0.dtype", "int8"), r"experts\[0\].dtype: 'int8' is not one of"),
        (_set("router.backbone", {"expert": "nobody"}), "router.backbone.expert: 'nobody' is not"),
        (_set("router.layer", "two"), "router.layer: 'two' is not an integer"),
        (_set("router.temperature", "hot"), "router.temperature: must be a number"),
        (_set("router.default_expert", "nobody"), "router.default_expert: 'nobody' is not"),
        (_set("router.pooling", "last"), "router.pooling: 'last' is not supported"),
        (_set("router", None), "router: must be a JSON object"),
    ],
)
def test_bad_manifests_name_the_field(repo: Path, tmp_path: Path, edit: Edit, message: str) -> None:
    data = manifest_json(repo)
    edit(data)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(RoutedRepoError, match=message) as caught:
        read_manifest(tmp_path)
    assert caught.value.repo == str(tmp_path)
    assert "Fix:" in str(caught.value)


def test_missing_or_unreadable_files_are_clear(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(RoutedRepoError, match=f"has no {MANIFEST_FILE}"):
        RoutedModel.from_pretrained(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(RoutedRepoError, match="cannot be read"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_bytes((repo / MANIFEST_FILE).read_bytes())
    with pytest.raises(RoutedRepoError, match=f"has no {ROUTER_FILE}"):
        open_routed_repo(tmp_path)
    save_file({"centroids": torch.zeros(3, 64), "center": torch.zeros(64)}, tmp_path / ROUTER_FILE)
    with pytest.raises(RoutedRepoError, match=r"does not fit .*shape \(3, 64\)"):
        open_routed_repo(tmp_path)
    (tmp_path / ROUTER_FILE).write_bytes((repo / ROUTER_FILE).read_bytes())
    with pytest.raises(RoutedRepoError, match="should be bundled in experts/digits/"):
        open_routed_repo(tmp_path)


def test_an_unknown_router_type_or_missing_backbone_is_refused(repo: Path, tmp_path: Path) -> None:
    data = manifest_json(repo)
    data["router"]["type"] = "nearest"
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data), encoding="utf-8")
    (tmp_path / ROUTER_FILE).write_bytes((repo / ROUTER_FILE).read_bytes())
    with pytest.raises(UnknownNameError, match="centroid, logistic, perplexity"):
        open_routed_repo(tmp_path)
    data["router"] |= {"type": "centroid", "backbone": None}
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(RoutedRepoError, match=r"router\.backbone is missing"):
        open_routed_repo(tmp_path)


def test_experts_with_another_vocabulary_are_refused(
    experts: dict[str, Path], tmp_path: Path
) -> None:
    other = shutil.copytree(experts["letters"], tmp_path / "other")
    config = json.loads((other / "config.json").read_text(encoding="utf-8"))
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": 120}))
    with pytest.raises(IncompatibleModelsError, match="97 and 120 entries"):
        build_router(
            RouteSpec(method="centroid"),
            ProbeSpec(),
            experts=[experts["digits"], other],
            backbone=experts["digits"],
            calibration_texts=[digit_texts(2), letter_texts(2)],
        )


def test_experts_pinned_on_the_hub_and_a_routed_repo_read_by_id(
    fake_hub: FakeHub, experts: dict[str, Path], tmp_path: Path
) -> None:
    shas = {name: fake_hub.add_model(f"org/{name}", experts[name]) for name in NAMES}
    entries = [ExpertEntry(n, ModelLocation(repo_id=f"org/{n}", revision=shas[n])) for n in NAMES]
    built = build("centroid", experts)
    manifest = routed_manifest(built, entries, backbone=BackboneRef(expert="digits"))
    folder = write_routed_repo(tmp_path / "routed", manifest, built.router)
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST_FILE, ROUTER_FILE]
    fake_hub.add_model("org/routed", folder)
    assert is_routed_repo("org/routed", check_hub=True)
    assert not is_routed_repo("org/digits", check_hub=True)
    assert not is_routed_repo("org/routed")
    model = RoutedModel.from_pretrained("org/routed", device_map=None)
    assert model.revision is not None
    assert model.source == "org/routed"
    assert model.route(digit_texts(2, seed=1) + letter_texts(2, seed=2)) == [0, 0, 1, 1]
    fake_hub.commit_files("org/digits", {"model.safetensors": None})  # main moves on
    again = RoutedModel.from_pretrained("org/routed", device_map=None)
    assert again.route(letter_texts(1, seed=3)) == [1]  # still the pinned commit
