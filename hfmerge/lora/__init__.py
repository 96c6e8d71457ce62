"""LoRA adapters in the PEFT format: read one and apply it to its base on read
(`AdaptedReader`), or extract one from a fine-tune (`extract`).

`config` parses `adapter_config.json`, `layout` maps the adapter's tensors onto the base's and
checks them from headers alone, `files` reads a local adapter folder.
"""

from hfmerge.lora.config import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterConfig,
    parse_adapter_config,
)
from hfmerge.lora.files import (
    NOT_AN_ADAPTER_FIX,
    PICKLE_FIX,
    AdapterFiles,
    missing_weights,
    read_local_adapter,
)
from hfmerge.lora.layout import PEFT_PREFIX, AdapterLayout, LowRankDelta, plan_adapter
from hfmerge.lora.reader import AdaptedReader

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "NOT_AN_ADAPTER_FIX",
    "PEFT_PREFIX",
    "PICKLE_FIX",
    "AdaptedReader",
    "AdapterConfig",
    "AdapterFiles",
    "AdapterLayout",
    "LowRankDelta",
    "missing_weights",
    "parse_adapter_config",
    "plan_adapter",
    "read_local_adapter",
]
