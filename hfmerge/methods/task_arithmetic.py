"""Task arithmetic: add the weighted sum of task vectors (model minus base) to the base."""

from __future__ import annotations

from hfmerge.methods.gta import TaskArithmeticParams, TaskVectorMethod, TaskVectorModelParams

TASK_ARITHMETIC = TaskVectorMethod(
    name="task_arithmetic",
    summary="Add the weighted sum of the models' task vectors (model - base) to the base.",
    paper="https://arxiv.org/abs/2212.04089",
    params=TaskArithmeticParams,
    model_params=TaskVectorModelParams,
    consensus=False,
).merge_method()
