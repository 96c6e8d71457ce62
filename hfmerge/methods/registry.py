"""Every merge method hfmerge knows, listed explicitly (no registration by import side effects)."""

from __future__ import annotations

from hfmerge.errors import UnknownNameError
from hfmerge.methods.arcee_fusion import ARCEE_FUSION
from hfmerge.methods.base import MergeMethod
from hfmerge.methods.breadcrumbs import BREADCRUMBS, BREADCRUMBS_TIES
from hfmerge.methods.dare import DARE_LINEAR, DARE_TIES
from hfmerge.methods.della import DELLA, DELLA_LINEAR
from hfmerge.methods.karcher import KARCHER
from hfmerge.methods.linear import LINEAR
from hfmerge.methods.model_stock import MODEL_STOCK
from hfmerge.methods.multislerp import MULTISLERP
from hfmerge.methods.nearswap import NEARSWAP
from hfmerge.methods.nuslerp import NUSLERP
from hfmerge.methods.passthrough import PASSTHROUGH
from hfmerge.methods.sce import SCE
from hfmerge.methods.slerp import SLERP
from hfmerge.methods.task_arithmetic import TASK_ARITHMETIC
from hfmerge.methods.ties import TIES

_ALL = (
    LINEAR,
    SLERP,
    TASK_ARITHMETIC,
    TIES,
    DARE_TIES,
    DARE_LINEAR,
    BREADCRUMBS,
    BREADCRUMBS_TIES,
    DELLA,
    DELLA_LINEAR,
    SCE,
    MODEL_STOCK,
    NEARSWAP,
    ARCEE_FUSION,
    NUSLERP,
    MULTISLERP,
    KARCHER,
    PASSTHROUGH,
)

METHODS: dict[str, MergeMethod] = {method.name: method for method in _ALL}
if len(METHODS) != len(_ALL):
    raise RuntimeError("two merge methods share a name")


def get_method(name: str) -> MergeMethod:
    """The method called `name`; `UnknownNameError` listing the valid names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownNameError("merge method", name, list(METHODS)) from None


def list_methods() -> list[MergeMethod]:
    """Every method, in the registry's order (simple to elaborate)."""
    return list(_ALL)
