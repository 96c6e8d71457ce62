"""A PEFT LoRA adapter's `adapter_config.json`: what hfmerge reads from it, and what it refuses.

The scale of one adapted module is `alpha / r` (rsLoRA: `alpha / sqrt(r)`), with `r` and `alpha`
from `rank_pattern` and `alpha_pattern` when a pattern names the module. A pattern key matches a
module whose name is the key or ends with `.` + the key (a regular expression, as PEFT reads it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ALL_LINEAR = "all-linear"  # PEFT's `target_modules` shorthand for every linear layer

# Keys whose setting hfmerge cannot apply as `W + scale·B·A`: the setting that is fine (their
# default), and why any other is refused.
_REFUSED: dict[str, tuple[Any, str]] = {
    "use_dora": (False, "DoRA (`use_dora`) rescales each column by a learnt magnitude"),
    "lora_bias": (False, "`lora_bias` adds a trained bias to lora_B"),
    "layer_replication": (None, "`layer_replication` duplicates layers of the base"),
    "target_parameters": (None, "`target_parameters` adapts raw parameters, not modules"),
    "trainable_token_indices": (None, "`trainable_token_indices` trains single token rows"),
    "use_qalora": (False, "QALoRA (`use_qalora`) pools the input before lora_A"),
}


@dataclass(frozen=True)
class AdapterConfig:
    """What applying a LoRA adapter takes from its config (defaults as PEFT's)."""

    r: int
    alpha: float
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    target_modules: tuple[str, ...] | str | None = None
    modules_to_save: tuple[str, ...] = ()
    base_model: str | None = None  # `base_model_name_or_path`, as written by whoever trained it

    def rank(self, module: str) -> int:
        """The rank the config gives `module` (`rank_pattern` first, then `r`)."""
        key = _pattern_key(self.rank_pattern, module)
        return self.r if key is None else self.rank_pattern[key]

    def scale(self, module: str) -> float:
        """`alpha / r` for `module` (`alpha / sqrt(r)` with rsLoRA)."""
        key = _pattern_key(self.alpha_pattern, module)
        alpha = self.alpha if key is None else self.alpha_pattern[key]
        rank = self.rank(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def targets(self, module: str) -> bool:
        """Whether `target_modules` names `module` (a list: by name or name suffix; a string: a
        regular expression over the whole name, or `all-linear`)."""
        if self.target_modules is None or self.target_modules == ALL_LINEAR:
            return True
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module) is not None
        return any(module == t or module.endswith("." + t) for t in self.target_modules)


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def parse_adapter_config(data: Any) -> tuple[AdapterConfig | None, list[str]]:
    """The config of a LoRA adapter from its parsed JSON, or None and every problem found."""
    if not isinstance(data, dict):
        return None, [f"{ADAPTER_CONFIG} is not a JSON object"]
    problems = _refusals(data)
    r, alpha = data.get("r", 8), data.get("lora_alpha", 8)
    if not _is_int(r) or r < 1:
        problems.append(f"`r` is {r!r}, not a positive integer")
    if not _is_number(alpha):
        problems.append(f"`lora_alpha` is {alpha!r}, not a number")
    ranks = _mapping(data, "rank_pattern", _is_positive_int, problems)
    alphas = _mapping(data, "alpha_pattern", _is_number, problems)
    targets = _targets(data.get("target_modules"), problems)
    saved = data.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(m, str) for m in saved):
        problems.append("`modules_to_save` is not a list of module names")
        saved = []
    if problems:
        return None, problems
    base = data.get("base_model_name_or_path")
    config = AdapterConfig(
        r=int(r),
        alpha=float(alpha),
        rank_pattern={k: int(v) for k, v in ranks.items()},
        alpha_pattern={k: float(v) for k, v in alphas.items()},
        fan_in_fan_out=data.get("fan_in_fan_out") is True,
        use_rslora=data.get("use_rslora") is True,
        target_modules=targets,
        modules_to_save=tuple(saved),
        base_model=base if isinstance(base, str) and base else None,
    )
    return config, []


def _refusals(data: dict[str, Any]) -> list[str]:
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        return [
            f"its peft_type is {peft_type!r}; hfmerge applies LoRA adapters (peft_type LORA) only"
        ]
    return [
        f"{why}, which hfmerge cannot apply as W + scale·B·A"
        for key, (fine, why) in _REFUSED.items()
        if data.get(key) not in (fine, None, False, [], {})
    ]


def _targets(value: Any, problems: list[str]) -> tuple[str, ...] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    problems.append("`target_modules` is neither a module name list nor a regular expression")
    return None


def _mapping(data: dict[str, Any], key: str, valid: Any, problems: list[str]) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict) or not all(valid(v) for v in value.values()):
        problems.append(f"`{key}` is not a mapping of module patterns to numbers")
        return {}
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
