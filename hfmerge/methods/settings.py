"""Parameter settings that vary per tensor: gradients over the layers and tensor-name filters.

A setting is what a recipe gives for one parameter. Besides one value it may be:
- a **gradient**, a list of values spread evenly over the layers: a tensor at relative depth
  `t` in [0, 1] takes the value interpolated linearly between the two nearest entries (numbers),
  or the entry at `floor(t * (len - 1))` (booleans and names, which cannot be interpolated);
- a list of **filter entries** `{filter: TEXT, value: SETTING}`: the first entry whose `filter`
  occurs in the tensor's name gives the value (itself a setting, so a gradient may sit inside a
  filter); an entry without `filter` (or with `filter: "*"`) matches every tensor. When none
  matches, the parameter is unset for that tensor and the next source (the recipe-wide default,
  then the method's default) decides.

These are mergekit's semantics, so a mergekit config's gradients give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

UNSET: Any = None  # a filter list that no entry matches leaves the parameter to the next source
FILTER_KEYS = frozenset({"filter", "value"})


def varies(setting: Any) -> bool:
    """Whether `setting` can take different values in different tensors."""
    return isinstance(setting, list) or is_filter_entry(setting)


def is_filter_entry(setting: Any) -> bool:
    """Whether `setting` is one `{filter: ..., value: ...}` entry (a mapping of those keys)."""
    return isinstance(setting, Mapping) and bool(setting) and set(setting) <= FILTER_KEYS


def resolve(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of `setting` for the tensor `tensor_name` at relative depth `t`; `UNSET` when it
    is a filter list that no entry matches (or an empty list)."""
    if is_filter_entry(setting):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return UNSET
    if all(is_filter_entry(entry) for entry in setting):
        for entry in setting:
            if _matches(entry.get("filter"), tensor_name):
                return resolve(entry.get("value"), tensor_name, t)
        return UNSET
    return _gradient(setting, t)


def _matches(pattern: Any, tensor_name: str) -> bool:
    return pattern is None or pattern == "*" or str(pattern) in tensor_name


def _gradient(values: Sequence[Any], t: float) -> Any:
    found = [_number(value) for value in values]
    numbers = [number for number in found if number is not None]
    if len(numbers) < len(values):
        # Booleans and names are picked, not blended.
        return values[math.floor(t * (len(values) - 1))]
    position = t * (len(values) - 1)
    low = math.floor(position)
    high = min(len(values) - 1, low + 1)
    frac = position - low
    return (1 - frac) * numbers[low] + frac * numbers[high]


def _number(value: Any) -> float | None:
    """`value` as a number when it is one (YAML reads `1e-5` as a string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def leaves(setting: Any) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    """Every single value inside `setting`, with its path below the parameter's key (`(2,)` for
    a gradient's third entry, `(0, "value", 1)` inside a filter entry). Interpolation stays
    between two of them, so checking the leaves checks every value a tensor can get."""
    if is_filter_entry(setting):
        yield from _prefixed(("value",), leaves(setting.get("value")))
    elif isinstance(setting, list):
        for index, entry in enumerate(setting):
            if is_filter_entry(entry):
                yield from _prefixed((index, "value"), leaves(entry.get("value")))
            else:
                yield (index,), entry
    else:
        yield (), setting


def _prefixed(
    prefix: tuple[str | int, ...], found: Iterator[tuple[tuple[str | int, ...], Any]]
) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    for path, value in found:
        yield (*prefix, *path), value


def shape_problems(setting: Any) -> list[tuple[tuple[str | int, ...], str]]:
    """What is wrong with the shape of a setting (not its values): a list that mixes filter
    entries with plain values, a filter entry without `value`, a nested list in a gradient."""
    if is_filter_entry(setting):
        setting = [setting]
    if not isinstance(setting, list):
        return []
    entries = [is_filter_entry(entry) for entry in setting]
    if any(entries) and not all(entries):
        return [((), "mixes `filter:` entries with plain values; give one or the other")]
    problems: list[tuple[tuple[str | int, ...], str]] = []
    for index, entry in enumerate(setting):
        if is_filter_entry(entry):
            if "value" not in entry:
                problems.append(((index,), "a `filter:` entry needs a `value:`"))
            problems += [((index, "value", *p), m) for p, m in shape_problems(entry.get("value"))]
        elif isinstance(entry, list | Mapping):
            problems.append(((index,), "a gradient's entries must be single values"))
    return problems


def layer_positions(layers: Mapping[str, tuple[str, int] | None]) -> dict[str, float]:
    """Relative depth `t` of each tensor from its (stack, layer index), or None outside any stack
    (embeddings, final norm, head: `t = 0`, as mergekit gives them). Layer `i` of a stack of `n`
    is at `i / (n - 1)`; a stack of one layer is at 1."""
    sizes: dict[str, int] = {}
    for where in layers.values():
        if where is not None:
            stack, index = where
            sizes[stack] = max(sizes.get(stack, 0), index + 1)
    positions = {}
    for name, where in layers.items():
        if where is None:
            positions[name] = 0.0
        else:
            stack, index = where
            count = sizes[stack]
            positions[name] = index / (count - 1) if count > 1 else 1.0
    return positions
