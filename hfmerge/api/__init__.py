"""The public Python API: one function per `hfmerge` command, each returning a result object.

What the command line prints or writes as JSON comes from these results; the functions themselves
print nothing to stdout (progress bars go to stderr; `progress=False` turns them off). This is the
boundary that takes model references as users write them, `org/name[@revision]`, a local directory
or `zoo:NAME`, and resolves them (`hfmerge.sources.refs`); everything below takes resolved sources.

    from hfmerge import api
    result = api.run("recipes/demo.yaml", api.RunOptions(force=True))
    report = api.cka("zoo:seed0", "zoo:seed1", samples=64)

Every function raises `HfMergeError` (or a subclass) for a problem the user can fix, with what
went wrong, why, and the fix. torch and transformers are imported inside the functions, so
importing this package (and `import hfmerge`) stays fast.
"""

from hfmerge.api.housekeeping import clean
from hfmerge.api.listings import ArchSupport, MethodInfo, ZooMember, archs, methods, zoo
from hfmerge.api.measures import (
    BarrierReport,
    EvalReport,
    FingerprintReport,
    barrier,
    cka,
    evaluate,
    fingerprint,
)
from hfmerge.api.models import (
    AlignMethod,
    AlignResult,
    CanonicalizeResult,
    align,
    canonicalize,
    extract_lora,
)
from hfmerge.api.recipes import PushResult, Validation, convert, push, run, validate
from hfmerge.pipeline.options import RunOptions

__all__ = [
    "AlignMethod",
    "AlignResult",
    "ArchSupport",
    "BarrierReport",
    "CanonicalizeResult",
    "EvalReport",
    "FingerprintReport",
    "MethodInfo",
    "PushResult",
    "RunOptions",
    "Validation",
    "ZooMember",
    "align",
    "archs",
    "barrier",
    "canonicalize",
    "cka",
    "clean",
    "convert",
    "evaluate",
    "extract_lora",
    "fingerprint",
    "methods",
    "push",
    "run",
    "validate",
    "zoo",
]
