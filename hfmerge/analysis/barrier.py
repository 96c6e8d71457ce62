"""Loss barrier on the straight line between two checkpoints, with or without permutation alignment.

barrier = max over λ of L((1-λ)θA + λθB) − ((1-λ)L(θA) + λL(θB)); weights are streamed per tensor.
A curve is an alignment mode, optionally with REPAIR (`weight+repair`): each interior point is then
rescaled to the endpoints' blended channel statistics before it is scored (`align.repair`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel

from hfmerge.analysis.interpolate import Interpolator, check_same_tensors, spec_of
from hfmerge.arch import require_permutable
from hfmerge.arch.residual import BasisMap, require_foldable
from hfmerge.arch.spec import ArchSpec
from hfmerge.errors import UnknownNameError
from hfmerge.lm.batches import pad_id_of, window_batches
from hfmerge.lm.load import Objective, load_lm, load_tokenizer, usable_length
from hfmerge.lm.scoring import Scored, objective_of, prepare, score
from hfmerge.progress import track
from hfmerge.recipe.align_methods import ALIGN_METHODS, ORTHOGONAL_METHODS, AlignMethod
from hfmerge.sources.refs import ModelSource

if TYPE_CHECKING:
    from hfmerge.align.repair import Repairer

REPAIR_SUFFIX = "+repair"
CURVES: tuple[str, ...] = ALIGN_METHODS + tuple(m + REPAIR_SUFFIX for m in ALIGN_METHODS)
MIDPOINT = 0.5
REPAIR_WINDOWS = 256  # probe windows REPAIR fits on (as a recipe's default `probe.samples`)


@dataclass(frozen=True)
class Curve:
    """One requested curve: an alignment mode, and whether interior points are REPAIRed."""

    align: str  # one of ALIGN_METHODS
    repair: bool = False

    @property
    def name(self) -> str:
        """`weight`, `weight+repair`, ...: the `align` field of its result."""
        return self.align + (REPAIR_SUFFIX if self.repair else "")

    @classmethod
    def parse(cls, name: str) -> Curve:
        """`MODE` or `MODE+repair`; an unknown name lists the valid ones."""
        if name not in CURVES:
            raise UnknownNameError("alignment mode", name, CURVES)
        return cls(name.removesuffix(REPAIR_SUFFIX), name.endswith(REPAIR_SUFFIX))


@dataclass(frozen=True)
class BarrierResult:
    """The loss curve between A (λ=0) and B (λ=1) for one alignment mode, and its barrier."""

    align: str
    lambdas: list[float]
    loss: list[float]
    loss_a: float
    loss_b: float
    barrier: float  # max over the grid of loss minus the linear baseline (>= 0: endpoints are 0)
    barrier_lambda: float  # where that maximum is
    loss_mid: float  # L(½θA + ½θB): the plain average (merged) model
    tokens: int  # scored tokens per evaluation
    objective: Objective
    model_a: str = ""
    model_b: str = ""
    data: str = ""
    max_length: int = 0

    @property
    def baseline(self) -> list[float]:
        """(1-λ)·loss_a + λ·loss_b on the grid."""
        return linear_baseline(self.lambdas, self.loss_a, self.loss_b)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (`lambdas`, `loss`, `barrier`, ...): the `--json` file's field names."""
        return {**asdict(self), "baseline": self.baseline}


def lambda_grid(steps: int) -> list[float]:
    """`steps` evenly spaced λ in [0, 1], plus 0.5 (the merged model) if the grid misses it."""
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (both endpoints), got {steps}")
    grid = {i / (steps - 1) for i in range(steps)} | {MIDPOINT}
    return sorted(grid)


def linear_baseline(lambdas: Sequence[float], loss_a: float, loss_b: float) -> list[float]:
    """The endpoints' straight line: (1-λ)·loss_a + λ·loss_b (exact at λ = 0 and 1)."""
    return [(1.0 - lam) * loss_a + lam * loss_b for lam in lambdas]


def barrier_of(lambdas: Sequence[float], losses: Sequence[float]) -> tuple[float, float]:
    """(barrier, λ at which it occurs) of a curve whose first and last points are the endpoints."""
    baseline = linear_baseline(lambdas, losses[0], losses[-1])
    gaps = [loss - line for loss, line in zip(losses, baseline, strict=True)]
    best = max(range(len(gaps)), key=gaps.__getitem__)
    return gaps[best], lambdas[best]


def _basis(mode: str, setup: _Setup, *, batch_size: int, progress: bool) -> BasisMap:
    """B's map into A's basis by `mode`; activation matching and `learned` read the probe
    windows."""
    from hfmerge.align import align_basis

    windows = setup.probes
    batches = window_batches(windows, pad_id=setup.pad_id, batch_size=batch_size)
    return align_basis(mode, setup.a, setup.b, seed=0, batches=batches, progress=progress)


@dataclass(frozen=True)
class _Setup:
    """Everything loaded once per comparison: the model, scored windows, paths, labels."""

    model: PreTrainedModel
    probes: list[torch.Tensor]  # unmasked token windows for activation matching, learned, REPAIR
    scored: list[Scored]  # the scored windows with their labels (MLM: masked)
    pad_id: int
    a: ModelSource
    b: ModelSource
    data: str
    max_length: int

    @property
    def label_a(self) -> str:
        """Model A's name in reports."""
        return self.a.label

    @property
    def label_b(self) -> str:
        """Model B's name in reports."""
        return self.b.label


def _setup(
    model_a: ModelSource,
    model_b: ModelSource,
    *,
    data: str | None,
    probe_data: str | None,
    max_length: int,
    samples: int | None,
) -> _Setup:
    from hfmerge.lm.textdata import describe_data, load_texts, token_windows

    texts = load_texts(data)  # first: a bad data file should fail before any model loads
    probe_texts = texts if probe_data is None else load_texts(probe_data)
    path_a, path_b = model_a.path, model_b.path
    label_a, label_b = model_a.label, model_b.label
    check_same_tensors(path_a, path_b, label_a=label_a, label_b=label_b)
    tokenizer = load_tokenizer(path_a, label=label_a)  # A's tokenizer scores both models
    model = load_lm(path_a, label=label_a, adapter=model_a.adapter_path)
    length = usable_length(model, max_length)
    windows = token_windows(tokenizer, texts, max_length=length, samples=samples)
    probes = (
        windows
        if probe_data is None
        else token_windows(tokenizer, probe_texts, max_length=length, samples=samples)
    )
    scored = prepare(windows, tokenizer, objective=objective_of(model), mlm_seed=0)
    return _Setup(
        model,
        probes,
        scored,
        pad_id_of(tokenizer),
        model_a,
        model_b,
        describe_data(data),
        length,
    )


def _permutable_spec(
    model_a: ModelSource, model_b: ModelSource, curves: Sequence[Curve]
) -> ArchSpec | None:
    """B's spec when a curve permutes or repairs (None when none does), after refusing a pair
    without a permutation spec."""
    needing = [c.name for c in curves if c.align != "none" or c.repair]
    if not needing:
        return None
    specs = [spec_of(m.path, label=m.label) for m in (model_a, model_b)]
    for model, spec in zip((model_a, model_b), specs, strict=True):
        require_permutable(spec, label=model.label, feature=f"`barrier --align {needing[0]}`")
        for curve in (c for c in curves if c.align in ORTHOGONAL_METHODS):
            feature = f"`barrier --align {curve.name}`"
            # A tied head is untied in the loaded model while folded weights are interpolated.
            require_foldable(spec, label=model.label, feature=feature)
    return specs[1]


def _check_modes(aligns: Sequence[str]) -> list[Curve]:
    curves = [Curve.parse(name) for name in dict.fromkeys(aligns)]
    if not curves:
        raise ValueError("give at least one alignment mode")
    return curves


def _repairer(
    setup: _Setup,
    interpolator: Interpolator,
    spec: ArchSpec | None,
    basis: BasisMap | None,
    *,
    batch_size: int,
) -> Repairer:
    """REPAIR between A and π(B), their statistics measured on the probe windows."""
    from hfmerge.align.repair import Repairer

    windows = setup.probes[:REPAIR_WINDOWS]  # bounded, whatever --samples says
    batches = window_batches(windows, pad_id=setup.pad_id, batch_size=batch_size)
    repairer = Repairer(setup.model, batches)

    def endpoint(lam: float) -> PreTrainedModel:
        interpolator.load(lam, spec=spec, basis=basis)
        return setup.model

    repairer.measure_endpoints(endpoint)
    return repairer


def compare_barriers(
    model_a: ModelSource,
    model_b: ModelSource,
    *,
    aligns: Sequence[str] = ("none",),
    steps: int = 11,
    data: str | None = None,
    probe_data: str | None = None,
    max_length: int = 128,
    samples: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    solved: Mapping[str, BasisMap] | None = None,
) -> list[BarrierResult]:
    """One barrier curve per alignment mode, on the same windows and λ grid (one model loaded).

    `model_a` and `model_b` are resolved models (`hfmerge.sources.refs.resolve_model`). `aligns`
    holds modes (`none`, `weight`, `activation`, `weight+orthogonal`, ...), each optionally
    `MODE+repair`. Activation matching, `learned` and REPAIR read `probe_data` (default: the
    scored `data`,
    so those curves are then measured in-sample); weight matching reads no data. `solved` gives
    maps already found for a mode (the recipe's align step), so the curve is that of the very
    map merged, and it is not solved twice.
    """
    curves, lambdas = _check_modes(aligns), lambda_grid(steps)
    spec = _permutable_spec(model_a, model_b, curves)  # before any model loads
    setup = _setup(
        model_a,
        model_b,
        data=data,
        probe_data=probe_data,
        max_length=max_length,
        samples=samples,
    )
    modes = list(dict.fromkeys(c.align for c in curves))
    known = dict(solved or {})
    bases = {
        m: None
        if m == "none"
        else known.get(m) or _basis(m, setup, batch_size=batch_size, progress=progress)
        for m in modes
    }
    interpolator = Interpolator(setup.model, setup.a, setup.b)
    repairers = {
        c.align: _repairer(setup, interpolator, spec, bases[c.align], batch_size=batch_size)
        for c in curves
        if c.repair
    }
    # λ=0 is model A whatever the curve (REPAIR there is the identity): evaluate it once.
    jobs = [(curves[0], 0.0)] + [(c, lam) for c in curves for lam in lambdas if lam != 0.0]
    losses: dict[tuple[Curve, float], float] = {}
    tokens = 0
    for curve, lam in track(jobs, description="barrier: interpolating", enabled=progress):
        interpolator.load(lam, spec=spec, basis=bases[curve.align])
        if curve.repair and 0.0 < lam < 1.0:  # endpoints: REPAIR is the identity
            repairers[curve.align].apply(setup.model, lam)
        result = score(
            setup.model,
            setup.scored,
            pad_id=setup.pad_id,
            objective=objective_of(setup.model),
            batch_size=batch_size,
        )
        losses[(curve, lam)], tokens = result.loss, result.tokens
    first = losses[(curves[0], 0.0)]
    return [
        _result(c.name, lambdas, [first] + [losses[(c, lam)] for lam in lambdas[1:]], tokens, setup)
        for c in curves
    ]


def _result(
    mode: str, lambdas: list[float], curve: list[float], tokens: int, setup: _Setup
) -> BarrierResult:
    barrier, at = barrier_of(lambdas, curve)
    return BarrierResult(
        align=mode,
        lambdas=lambdas,
        loss=curve,
        loss_a=curve[0],
        loss_b=curve[-1],
        barrier=barrier,
        barrier_lambda=at,
        loss_mid=curve[lambdas.index(MIDPOINT)],
        tokens=tokens,
        objective=objective_of(setup.model),
        model_a=setup.label_a,
        model_b=setup.label_b,
        data=setup.data,
        max_length=setup.max_length,
    )


def parse_align_modes(values: Sequence[str]) -> list[str]:
    """`--align` values, each possibly a comma list, in order and deduplicated; checked."""
    modes = [part.strip() for value in values for part in value.split(",") if part.strip()]
    return [curve.name for curve in _check_modes(modes or ["none"])]


def barrier_report(results: Sequence[BarrierResult]) -> dict[str, Any]:
    """The `--json` document: the first result's fields at top level, all under `results`."""
    report = results[0].to_json()
    if len(results) > 1:
        report["results"] = [r.to_json() for r in results]
    return report


def format_barrier_table(results: Sequence[BarrierResult]) -> str:
    """λ and one loss column per alignment mode, then barrier, its λ and the midpoint loss."""
    width = max(9, *(len(r.align) + 2 for r in results))

    def row(label: str, values: Sequence[float], digits: int = 4) -> str:
        return f"{label:<9}" + "".join(f"{v:>{width}.{digits}f}" for v in values)

    lines = [f"{'λ':<9}" + "".join(f"{r.align:>{width}}" for r in results)]
    lines += [
        row(f"{lam:.3f}", [r.loss[i] for r in results]) for i, lam in enumerate(results[0].lambdas)
    ]
    lines.append(row("barrier", [r.barrier for r in results]))
    lines.append(row("at λ", [r.barrier_lambda for r in results], digits=3))
    lines.append(row("midpoint", [r.loss_mid for r in results]))
    return "\n".join(lines)


def loss_barrier(
    model_a: ModelSource,
    model_b: ModelSource,
    *,
    align: AlignMethod = "none",
    steps: int = 11,
    data: str | None = None,
    max_length: int = 128,
    samples: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> BarrierResult:
    """The loss barrier between two resolved models for one alignment mode."""
    return compare_barriers(
        model_a,
        model_b,
        aligns=(align,),
        steps=steps,
        data=data,
        max_length=max_length,
        samples=samples,
        batch_size=batch_size,
        progress=progress,
    )[0]


__all__ = [
    "CURVES",
    "BarrierResult",
    "Curve",
    "barrier_of",
    "barrier_report",
    "compare_barriers",
    "format_barrier_table",
    "lambda_grid",
    "linear_baseline",
    "loss_barrier",
    "parse_align_modes",
]
