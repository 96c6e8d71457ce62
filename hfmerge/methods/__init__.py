"""Merge methods: small pure tensor functions with typed parameters, and their registry."""

from hfmerge.methods.base import MergeMethod
from hfmerge.methods.params import MergeFn, MethodParams, ModelParams, Problem
from hfmerge.methods.registry import METHODS, get_method, list_methods
from hfmerge.methods.validation import (
    ParameterInfo,
    describe_parameters,
    param_problems,
    usage,
    validate_params,
)

__all__ = [
    "METHODS",
    "MergeFn",
    "MergeMethod",
    "MethodParams",
    "ModelParams",
    "ParameterInfo",
    "Problem",
    "describe_parameters",
    "get_method",
    "list_methods",
    "param_problems",
    "usage",
    "validate_params",
]
