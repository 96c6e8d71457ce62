"""`hfmerge_router.json`: which experts a routed repo serves, where each one is, and its router.

Experts are Hub repos pinned to a commit sha, or folders bundled inside the routed repo
(`experts/<name>`). Reading validates every field and names the one that is wrong.

An expert that is a PEFT LoRA adapter of a base model also has an `adapter` location (the same
two kinds: `{"repo_id", "revision"}` or `{"path"}`, a bundled adapter in `experts/<name>`), and
its own location is then its base's (a bundled base in `bases/<name>`, once for every expert on
it). `RoutedModel` loads each base once and applies an expert's adapter per input. A manifest
with an adapter is `format_version` 2, so an hfmerge that does not know adapters refuses it
rather than serve the bare base; every other manifest is still written, and read, as version 1.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, NoReturn

from hfmerge.errors import ManifestError

MANIFEST_FILE = "hfmerge_router.json"
ROUTER_FILE = "router.safetensors"
FORMAT_VERSION = 1
ADAPTER_FORMAT_VERSION = 2  # a manifest with an adapter expert
READ_VERSIONS = (FORMAT_VERSION, ADAPTER_FORMAT_VERSION)
POOLING = "mean"  # one masked mean per sequence; the only pooling routers use so far
EXPERTS_DIR = "experts"
BASES_DIR = "bases"  # bundled bases of adapter experts
AUTO_DTYPE = "auto"  # load as the checkpoint stores it
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")  # torch names
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # also a folder name under experts/
_SHA = re.compile(r"^[0-9a-f]{40}$")
_FIX = f"rebuild the routed repo with hfmerge, or correct {MANIFEST_FILE} by hand"


def _fail(where: str, problem: str) -> NoReturn:
    raise ManifestError(where, problem)


@dataclass(frozen=True)
class ModelLocation:
    """A model either on the Hub (`repo_id` at commit `revision`) or in `path` (relative to the
    routed repo's folder)."""

    repo_id: str | None = None
    revision: str | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.repo_id is None):
            _fail("", "give either `path` or `repo_id` + `revision`")

    def to_json(self) -> dict[str, str]:
        """`{"path": ...}` or `{"repo_id": ..., "revision": ...}`."""
        if self.path is not None:
            return {"path": self.path}
        return {"repo_id": str(self.repo_id), "revision": str(self.revision)}


@dataclass(frozen=True)
class ExpertEntry:
    """One expert: its name, where it is, and the dtype to load it in (`auto`: as stored).

    With `adapter`, the expert is that LoRA adapter on the model at `location` (its base).
    """

    name: str
    location: ModelLocation
    dtype: str = AUTO_DTYPE
    adapter: ModelLocation | None = None

    def to_json(self) -> dict[str, Any]:
        """`{"name", "path" | "repo_id"+"revision", "dtype"}`, and `"adapter": {...}`."""
        entry: dict[str, Any] = {"name": self.name, **self.location.to_json(), "dtype": self.dtype}
        if self.adapter is not None:
            entry["adapter"] = self.adapter.to_json()
        return entry


@dataclass(frozen=True)
class BackboneRef:
    """The router backbone: one of the experts (by name), or a model of its own."""

    expert: str | None = None
    location: ModelLocation | None = None
    dtype: str = AUTO_DTYPE

    def to_json(self) -> dict[str, str]:
        """`{"expert": name}` or a location with its dtype."""
        if self.expert is not None:
            return {"expert": self.expert}
        assert self.location is not None  # checked when parsed or built
        return {**self.location.to_json(), "dtype": self.dtype}


@dataclass(frozen=True)
class RouterSpec:
    """How the router reads an input: its type, backbone and layer, and how it decides."""

    type: str
    backbone: BackboneRef | None  # None for the perplexity router (it needs no features)
    layer: int | None
    max_length: int
    temperature: float
    min_confidence: float | None = None
    default_expert: str | None = None
    pooling: str = POOLING

    def to_json(self) -> dict[str, Any]:
        """The `router` object of the manifest."""
        return {
            "type": self.type,
            "backbone": self.backbone.to_json() if self.backbone else None,
            "layer": self.layer,
            "pooling": self.pooling,
            "temperature": self.temperature,
            "min_confidence": self.min_confidence,
            "default_expert": self.default_expert,
            "max_length": self.max_length,
        }


@dataclass(frozen=True)
class RoutedManifest:
    """The whole `hfmerge_router.json`."""

    experts: tuple[ExpertEntry, ...]
    router: RouterSpec
    calibration: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _check_experts(self.experts)
        _check_router(self.router, self.names)
        adapted = any(expert.adapter is not None for expert in self.experts)
        if adapted and self.format_version < ADAPTER_FORMAT_VERSION:  # as an old reader sees it
            object.__setattr__(self, "format_version", ADAPTER_FORMAT_VERSION)

    @property
    def names(self) -> tuple[str, ...]:
        """Expert names, in router order."""
        return tuple(expert.name for expert in self.experts)

    def router_config(self) -> dict[str, Any]:
        """What `Router.from_saved` reads (the default expert as an index)."""
        spec = self.router
        default = None if spec.default_expert is None else self.names.index(spec.default_expert)
        return {
            "type": spec.type,
            "num_experts": len(self.experts),
            "temperature": spec.temperature,
            "min_confidence": spec.min_confidence,
            "default_expert": default,
        }

    def to_json(self) -> dict[str, Any]:
        """The JSON document, keys in reading order."""
        return {
            "format_version": self.format_version,
            "experts": [expert.to_json() for expert in self.experts],
            "router": self.router.to_json(),
            "calibration": self.calibration,
        }


def _check_experts(experts: Sequence[ExpertEntry]) -> None:
    if len(experts) < 2:
        _fail("experts", f"lists {len(experts)} expert(s); routing needs at least 2")
    seen: set[str] = set()
    for i, expert in enumerate(experts):
        if not _NAME.match(expert.name):
            _fail(
                f"experts[{i}].name",
                f"{expert.name!r} is not a plain name (letters, digits, "
                "`_.-`, not starting with punctuation)",
            )
        if expert.name in seen:
            _fail(f"experts[{i}].name", f"{expert.name!r} appears twice")
        seen.add(expert.name)
        _check_location(expert.location, f"experts[{i}]")
        if expert.adapter is not None:
            _check_location(expert.adapter, f"experts[{i}].adapter")


def _check_location(location: ModelLocation, where: str) -> None:
    if location.path is not None:
        parts = PurePosixPath(location.path).parts
        if (
            location.path.startswith("/")
            or "\\" in location.path
            or not parts
            or any(part in ("..", ".") for part in parts)
        ):
            _fail(
                f"{where}.path", f"{location.path!r} is not a plain relative folder inside the repo"
            )
        return
    if not isinstance(location.revision, str) or not _SHA.match(location.revision):
        _fail(
            f"{where}.revision",
            f"{location.revision!r} is not a 40-hex commit sha (experts "
            "are pinned so the routed repo always serves the same weights)",
        )


def _check_router(spec: RouterSpec, names: Sequence[str]) -> None:
    if spec.pooling != POOLING:
        _fail("router.pooling", f"{spec.pooling!r} is not supported; use {POOLING!r}")
    if spec.max_length < 2:
        _fail("router.max_length", f"{spec.max_length} is below 2")
    if spec.default_expert is not None and spec.default_expert not in names:
        _fail("router.default_expert", f"{spec.default_expert!r} is not an expert name")
    if spec.backbone is None:
        return
    if spec.layer is None or spec.layer < 1:
        _fail("router.layer", f"{spec.layer!r} is not a block number (1 or more)")
    backbone = spec.backbone
    if (backbone.expert is None) == (backbone.location is None):
        _fail("router.backbone", "give either `expert` or a location")
    if backbone.expert is not None and backbone.expert not in names:
        _fail("router.backbone.expert", f"{backbone.expert!r} is not an expert name")
    if backbone.location is not None:
        _check_location(backbone.location, "router.backbone")


# -- reading ---------------------------------------------------------------------------------


def parse_manifest(data: Any) -> RoutedManifest:
    """The manifest in a parsed JSON document; ManifestError names the first bad field."""
    document = _object(data, "")
    version = document.get("format_version")
    if version not in READ_VERSIONS:
        _fail(
            "format_version",
            f"{version!r} is not a version this hfmerge reads "
            f"({', '.join(map(str, READ_VERSIONS))}); a newer hfmerge may have written it",
        )
    experts = _list(document.get("experts"), "experts")
    entries = tuple(_expert(item, f"experts[{i}]") for i, item in enumerate(experts))
    router = _router(document.get("router"))
    calibration = document.get("calibration", {})
    return RoutedManifest(entries, router, _object(calibration, "calibration"), version)


def _expert(data: Any, where: str) -> ExpertEntry:
    item = _object(data, where)
    adapter = item.get("adapter")
    return ExpertEntry(
        _string(item.get("name"), f"{where}.name"),
        _location(item, where),
        _dtype(item, where),
        None
        if adapter is None
        else _location(_object(adapter, f"{where}.adapter"), f"{where}.adapter"),
    )


def _location(item: Mapping[str, Any], where: str) -> ModelLocation:
    if "path" in item and "repo_id" in item:
        _fail(where, "gives both `path` and `repo_id`; give one")
    if "path" in item:
        return ModelLocation(path=_string(item["path"], f"{where}.path"))
    if "repo_id" not in item:
        _fail(where, "gives neither `path` nor `repo_id` + `revision`")
    return ModelLocation(
        repo_id=_string(item["repo_id"], f"{where}.repo_id"),
        revision=_string(item.get("revision"), f"{where}.revision"),
    )


def _router(data: Any) -> RouterSpec:
    item = _object(data, "router")
    backbone_data = item.get("backbone")
    backbone = None if backbone_data is None else _backbone(backbone_data)
    layer = item.get("layer")
    if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool)):
        _fail("router.layer", f"{layer!r} is not an integer")
    default = item.get("default_expert")
    return RouterSpec(
        type=_string(item.get("type"), "router.type"),
        backbone=backbone,
        layer=layer,
        max_length=_number(item.get("max_length"), "router.max_length", integer=True),
        temperature=_number(item.get("temperature"), "router.temperature"),
        min_confidence=None
        if item.get("min_confidence") is None
        else _number(item["min_confidence"], "router.min_confidence"),
        default_expert=None if default is None else _string(default, "router.default_expert"),
        pooling=_string(item.get("pooling", POOLING), "router.pooling"),
    )


def _backbone(data: Any) -> BackboneRef:
    item = _object(data, "router.backbone")
    if "expert" in item:
        return BackboneRef(expert=_string(item["expert"], "router.backbone.expert"))
    return BackboneRef(
        location=_location(item, "router.backbone"), dtype=_dtype(item, "router.backbone")
    )


def _dtype(item: Mapping[str, Any], where: str) -> str:
    name = _string(item.get("dtype", AUTO_DTYPE), f"{where}.dtype")
    if name != AUTO_DTYPE and name not in FLOAT_DTYPES:
        _fail(f"{where}.dtype", f"{name!r} is not one of {AUTO_DTYPE}, {', '.join(FLOAT_DTYPES)}")
    return name


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        _fail(where, f"must be a JSON object, not {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        _fail(where, f"must be a JSON list, not {type(value).__name__}")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        _fail(where, f"must be a non-empty string, not {value!r}")
    return value


def _number(value: Any, where: str, *, integer: bool = False) -> Any:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        _fail(where, f"must be a{'n integer' if integer else ' number'}, not {value!r}")
    return value if integer else float(value)


__all__ = [
    "ADAPTER_FORMAT_VERSION",
    "AUTO_DTYPE",
    "BASES_DIR",
    "EXPERTS_DIR",
    "FLOAT_DTYPES",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "POOLING",
    "ROUTER_FILE",
    "BackboneRef",
    "ExpertEntry",
    "ModelLocation",
    "RoutedManifest",
    "RouterSpec",
    "parse_manifest",
]
