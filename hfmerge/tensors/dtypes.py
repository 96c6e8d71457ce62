"""safetensors dtype strings ("BF16", "F32", ...) and their torch dtypes and element sizes."""

from __future__ import annotations

import torch

# The dtypes safetensors' torch backend reads and writes, with element sizes in bytes.
_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I16": (torch.int16, 2),
    "U16": (torch.uint16, 2),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I32": (torch.int32, 4),
    "U32": (torch.uint32, 4),
    "F32": (torch.float32, 4),
    "I64": (torch.int64, 8),
    "U64": (torch.uint64, 8),
    "F64": (torch.float64, 8),
    "C64": (torch.complex64, 8),
}
_NAMES: dict[torch.dtype, str] = {dtype: name for name, (dtype, _) in _DTYPES.items()}


def is_known_dtype(name: str) -> bool:
    """Whether `name` is a safetensors dtype string this package can read and write."""
    return name in _DTYPES


def known_dtypes() -> list[str]:
    """Every safetensors dtype string this package reads, in table order."""
    return list(_DTYPES)


def dtype_kind(name: str) -> str:
    """What kind of number the dtype `name` holds: "float", "int", "bool" or "complex"."""
    dtype = _lookup(name)[0]
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "float"
    return "bool" if dtype == torch.bool else "int"


def element_size(name: str) -> int:
    """Bytes per element of the safetensors dtype `name` ("BF16" -> 2)."""
    return _lookup(name)[1]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype string ("BF16" -> torch.bfloat16)."""
    return _lookup(name)[0]


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors dtype string for a torch dtype (torch.bfloat16 -> "BF16")."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"torch dtype {dtype} has no safetensors equivalent") from None


def _lookup(name: str) -> tuple[torch.dtype, int]:
    try:
        return _DTYPES[name]
    except KeyError:
        known = ", ".join(_DTYPES)
        raise ValueError(f"unknown safetensors dtype {name!r} (known: {known})") from None
