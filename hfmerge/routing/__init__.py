"""Per-input routing among whole expert models: build a router, write a routed repo, serve it.

`build_router` fits a router on each expert's calibration texts; `routed_manifest` and
`write_routed_repo` save it; `RoutedModel.from_pretrained` loads it (experts placed with
accelerate, kept in an LRU within a memory budget) and routes every sequence to one expert.
"""

from hfmerge.routing.build import BuiltRouter, build_router, routed_manifest
from hfmerge.routing.calibration import CalibrationReport
from hfmerge.routing.evaluation import eval_routed
from hfmerge.routing.features import default_layer, pooled_features
from hfmerge.routing.manifest import (
    MANIFEST_FILE,
    ROUTER_FILE,
    BackboneRef,
    ExpertEntry,
    ModelLocation,
    RoutedManifest,
    RouterSpec,
)
from hfmerge.routing.model import RoutedModel, RoutedOutput
from hfmerge.routing.placement import ExpertPool, PooledModel
from hfmerge.routing.repo import is_routed_repo, open_routed_repo, read_manifest, write_routed_repo
from hfmerge.routing.routers import ROUTERS, Router, RouterSettings, router_class

__all__ = [
    "MANIFEST_FILE",
    "ROUTERS",
    "ROUTER_FILE",
    "BackboneRef",
    "BuiltRouter",
    "CalibrationReport",
    "ExpertEntry",
    "ExpertPool",
    "ModelLocation",
    "PooledModel",
    "RoutedManifest",
    "RoutedModel",
    "RoutedOutput",
    "Router",
    "RouterSettings",
    "RouterSpec",
    "build_router",
    "default_layer",
    "eval_routed",
    "is_routed_repo",
    "open_routed_repo",
    "pooled_features",
    "read_manifest",
    "routed_manifest",
    "router_class",
    "write_routed_repo",
]
