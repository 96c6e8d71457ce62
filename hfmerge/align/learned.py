"""Learned orthogonal alignment (`learned`): the residual map of `weight+orthogonal` (with its
within-head maps, kept as they are) refined by gradient descent on the loss of the interpolated
model (after Theus et al. 2025, *Generalized linear mode connectivity for transformers*).

Start: `weight+orthogonal` (FF / attention permutations, within-head maps and a residual rotation
Q0). Then a few hundred Adam steps on the mean next-token loss of θ(λ, Q) = (1-λ)·A + λ·Q(B) on
probe batches, λ drawn from U(0.4, 0.6) per step, both models folded and B's units permuted. Only
Q moves: the permutations and head maps stay as they were found (Theus et al. find that the
refinement mostly adjusts the residual map). Q stays orthogonal, so B read through it keeps B's
function exactly. A share of the probe batches is held out of the steps and chooses the Q kept,
so a refinement that only fits the probe text is dropped (with few probe tokens it can: on the
tiny test models, with 16 windows of 48 tokens, the steps raise the held-out midpoint loss).

The model runs functionally: one loaded skeleton of A takes the interpolated tensors at each step
(`torch.func.functional_call`), so no second model is built.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch.func import functional_call
from transformers import PreTrainedModel

from hfmerge.align.head_maps import head_map_matching
from hfmerge.align.orthogonal import axes_of
from hfmerge.align.weight_matching import MatchResult
from hfmerge.arch.head_maps import HeadMaps
from hfmerge.arch.residual import (
    FOLDED,
    BasisMap,
    lift_rotation,
    map_state_dict,
    rotate_residual,
    rotation_space,
)
from hfmerge.arch.spec import ArchSpec, AxisRole, Permutations
from hfmerge.errors import AlignmentError
from hfmerge.lm.checkpoint_views import loaded_names
from hfmerge.lm.scoring import IGNORE
from hfmerge.progress import track
from hfmerge.runtime import fixed_threads

STEPS = 300  # the budget: at most this many gradient steps
LEARNING_RATE = 2e-3  # Adam on the generator of the rotation (see `_rotation`)
LAMBDAS = (0.4, 0.6)  # λ is drawn uniformly from this range at every step
WINDOW_STEPS = 20  # the loss is averaged over windows of at least this many steps ...
PATIENCE = 3  # ... and the refinement stops after this many windows without a gain ...
MIN_GAIN = 1e-3  # ... of at least this fraction of the best window's loss
MIDPOINT = 0.5
OBJECTIVE_BATCHES = 16  # the midpoint loss reported is measured on at most this many batches
HELDOUT_EVERY = 4  # every 4th probe batch (the last one of 2 or 3) chooses Q, never trains it

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Interpolated:
    """θ(λ, Q) = (1-λ)·A + λ·Q(B) run through one loaded skeleton of A, by module tensor name.

    `own`: A folded; `other`: B folded and permuted, not rotated (float32 both); `axes`: each
    tensor's axis roles, which say where Q acts (none for the folded norm gains); `space`: the
    directions Q may turn (`rotation_space`: None, all; 1⊥ with centred norms).
    """

    model: PreTrainedModel
    own: dict[str, torch.Tensor]
    other: dict[str, torch.Tensor]
    axes: dict[str, tuple[AxisRole | None, ...]]
    space: torch.Tensor | None = None

    def weights(self, lam: float, rotation: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every tensor of the interpolated model; differentiable in `rotation` [hidden, hidden]."""
        turn = rotation.to(torch.float32)
        return {
            name: torch.lerp(a, rotate_residual(self.other[name], self.axes[name], turn), lam)
            for name, a in self.own.items()
        }

    def loss(self, batch: Batch, lam: float, rotation: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss over the batch's unpadded tokens (a scalar with a gradient)."""
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
        out = functional_call(
            self.model,
            self.weights(lam, rotation),
            args=(),
            kwargs={**batch, "labels": labels},
            tie_weights=False,  # a folded head is no longer its embedding
        )
        loss: torch.Tensor = out.loss
        return loss

    def mean_loss(self, batches: list[Batch], lam: float, rotation: torch.Tensor) -> float:
        """Token-weighted mean loss over `batches` at a fixed λ and Q."""
        total, tokens = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                count = int(batch["attention_mask"][:, 1:].sum())  # predicted tokens
                total += float(self.loss(batch, lam, rotation)) * count
                tokens += count
        return total / max(tokens, 1)


def interpolated(
    spec: ArchSpec,
    model: PreTrainedModel,
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
    perms: Permutations,
    *,
    label: str,
    head_maps: HeadMaps | None = None,
) -> Interpolated:
    """A and B (checkpoint tensors, `spec`'s names) folded, B permuted by `perms` and mapped
    within its heads by `head_maps`, renamed to `model`'s own tensors (A's causal LM, loaded).
    The head maps act on head dims, Q on the residual axis: they commute.

    Raises:
        AlignmentError: the checkpoint's tensors are not the model's parameters one to one
            (transformers fused some of them on load, as it does with experts).
    """
    own = map_state_dict(params_a, spec, FOLDED)
    other = map_state_dict(params_b, spec, BasisMap(perms, fold=True, head_maps=head_maps))
    names = _module_names(model, own, label=label)
    return Interpolated(
        model,
        own={names[n]: t.float() for n, t in own.items()},
        other={names[n]: t.float() for n, t in other.items()},
        # A folded norm gain is 1 on every unit, which Q leaves as it is: no axis to rotate.
        axes={names[n]: () if n in spec.norm_readers else axes_of(spec, n) for n in own},
        space=rotation_space(spec),
    )


def _module_names(
    model: PreTrainedModel, tensors: Mapping[str, torch.Tensor], *, label: str
) -> dict[str, str]:
    """Checkpoint name -> the module tensor it is, refused unless one to one and covering."""
    loaded = loaded_names(model, label=label)
    state = model.state_dict()
    names = {n: loaded.get(n, n) for n in tensors}
    wrong = [n for n, m in names.items() if m not in state or state[m].shape != tensors[n].shape]
    fused = len(set(names.values())) < len(names)
    missed = sorted(
        {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(names.values())
    )
    if wrong or fused or missed:
        raise AlignmentError(
            f"`learned` alignment runs {label} with its checkpoint tensors as the model's own, "
            f"and they do not map one to one ({', '.join((wrong + missed)[:3]) or 'fused'})",
            why="transformers renames, fuses or adds tensors on load (mixture-of-experts "
            "models fuse their experts)",
            fix="use `weight+orthogonal`, which reads the safetensors directly",
        )
    return names


def _rotation(
    start: torch.Tensor, generator: torch.Tensor, space: torch.Tensor | None
) -> torch.Tensor:
    """Q = Q0 · expm(G - Gᵀ) [hidden, hidden]; with centred norms Q0 · lift(expm(G - Gᵀ)), G
    [hidden − 1, hidden − 1] acting on `space` (the basis of 1⊥, `rotation_space`), so Q fixes
    the all-ones direction as Q0 does.

    The exponential of a skew-symmetric matrix is a rotation, so Q is orthogonal at every step by
    construction, with no projection back (plain steps on Q then an SVD would leave the manifold
    and come back by a jump Adam's moments know nothing of); G = 0 is exactly the start.
    """
    turn: torch.Tensor = torch.linalg.matrix_exp(generator - generator.T)  # [k, k]
    return start @ lift_rotation(space, turn)


def split_heldout(batches: list[Batch]) -> tuple[list[Batch], list[Batch]]:
    """(batches the steps train on, batches held out to choose Q): every HELDOUT_EVERY-th batch
    is held out, the last of 2 or 3; one batch is not split."""
    if len(batches) < 2:
        return batches, []
    held = {i for i in range(len(batches)) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1}
    held = held or {len(batches) - 1}
    return (
        [b for i, b in enumerate(batches) if i not in held],
        [b for i, b in enumerate(batches) if i in held],
    )


def refine_rotation(
    model: Interpolated,
    start: torch.Tensor,
    batches: list[Batch],
    *,
    heldout: list[Batch] | None = None,
    steps: int = STEPS,
    learning_rate: float = LEARNING_RATE,
    seed: int = 0,
    progress: bool = False,
) -> tuple[torch.Tensor, int, bool]:
    """The orthogonal Q near `start` (float64) lowering the loss of `model` for λ ~ U(0.4, 0.6):
    (Q float64, steps taken, whether it stopped early because the loss stopped improving).

    The steps visit `batches` in turn, in windows of whole passes over them (at least
    WINDOW_STEPS steps). At the end of each window Q is scored: by the midpoint loss on `heldout`
    when given (text the steps never see, so a Q that only fits the probe text is not chosen;
    the start is scored too, so the Q returned is never worse there), else by the window's mean
    training loss. The Q returned is the best scored; the steps stop after PATIENCE windows
    without a gain.
    """
    draws = torch.Generator().manual_seed(seed)
    space = model.space
    size = start.shape[0] if space is None else space.shape[1]
    generator = torch.zeros(size, size, dtype=torch.float64, requires_grad=True)  # [k, k]
    optimizer = torch.optim.Adam([generator], lr=learning_rate)
    window = len(batches) * math.ceil(WINDOW_STEPS / len(batches))
    best_loss, best = math.inf, generator.detach().clone()
    if heldout:
        best_loss = model.mean_loss(heldout, MIDPOINT, start)
    running, stale, taken = 0.0, 0, 0
    model.model.train(False)  # no dropout
    # One thread: float sums depend on the split, so the learned Q is the same on any machine
    # (and two threads preempted on a shared CPU spin at barriers, many times slower).
    with torch.enable_grad(), fixed_threads(1):
        for step in track(range(steps), description="learned alignment", enabled=progress):
            low, high = LAMBDAS
            lam = low + (high - low) * float(torch.rand((), generator=draws, dtype=torch.float64))
            turned = _rotation(start, generator, space)
            loss = model.loss(batches[step % len(batches)], lam, turned)
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            running, taken = running + loss.item(), step + 1
            if taken % window:
                continue
            mean, running = running / window, 0.0
            if heldout:  # the Q reached, scored on text the steps never saw
                mean = model.mean_loss(heldout, MIDPOINT, _rotation(start, generator, space))
            if mean < best_loss * (1 - MIN_GAIN):
                best_loss, best, stale = mean, generator.detach().clone(), 0
                continue
            stale += 1
            if stale >= PATIENCE:
                break
    last = generator.detach().clone()
    if not heldout and taken < window:  # too few steps for one window: the last Q is all there is
        best = last
    elif heldout and taken % window:  # the steps after the last window are scored too
        late = model.mean_loss(heldout, MIDPOINT, _rotation(start, last, space))
        best = last if late < best_loss else best
    with torch.no_grad():
        return _rotation(start, best, space), taken, taken < steps


def learned_matching(
    spec: ArchSpec,
    model: PreTrainedModel,
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
    batches: Iterable[Batch],
    *,
    label: str,
    seed: int = 0,
    steps: int | None = None,
    learning_rate: float = LEARNING_RATE,
    progress: bool = False,
) -> MatchResult:
    """B's permutations and residual rotation into A's basis, the rotation learned.

    `model` is A's causal LM, loaded (its tensors are replaced at every step, never written);
    `params_*` every non-buffer checkpoint tensor, by `spec`'s names. `objective` holds the
    midpoint loss (λ = 0.5, on the first OBJECTIVE_BATCHES batches, held-out ones included) at the
    start Q and at the learned Q; `iterations` the gradient steps taken (at most `steps`, default
    STEPS); `converged`, whether the loss stopped improving within them. Every HELDOUT_EVERY-th
    batch is held out of the steps and chooses the Q returned (`split_heldout`).
    """
    data = list(batches)
    if not data:
        raise AlignmentError("`learned` alignment got no probe batches", fix="give probe text")
    start = head_map_matching(spec, params_a, params_b, seed=seed, progress=progress)
    assert start.rotation is not None
    midpoint = interpolated(
        spec, model, params_a, params_b, start.perms, label=label, head_maps=start.head_maps
    )
    train, heldout = split_heldout(data)
    rotation, taken, stopped = refine_rotation(
        midpoint,
        start.rotation,
        train,
        heldout=heldout,
        steps=STEPS if steps is None else steps,
        learning_rate=learning_rate,
        seed=seed,
        progress=progress,
    )
    measured = data[:OBJECTIVE_BATCHES]
    objective = [midpoint.mean_loss(measured, MIDPOINT, q) for q in (start.rotation, rotation)]
    return MatchResult(
        perms=start.perms,
        iterations=taken,
        objective=objective,
        converged=stopped,
        rotation=rotation,
        head_maps=start.head_maps,
    )


__all__ = ["Interpolated", "interpolated", "learned_matching", "refine_rotation"]
