"""Task arithmetic: add the weighted sum of task vectors (model minus base) to the base."""

from __future__ import annotations

from hfmerge.methods.gta import TaskArithmeticParams, task_vector_method
from hfmerge.methods.params import WeightedModelParams

TASK_ARITHMETIC = task_vector_method(
    name="task_arithmetic",
    summary="Add the weighted sum of the models' task vectors (model - base) to the base.",
    paper="https://arxiv.org/abs/2212.04089",
    params=TaskArithmeticParams,
    model_params=WeightedModelParams,
    consensus=False,
)
