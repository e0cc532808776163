"""Memory planner: what a training run needs per GPU, whether it fits, and what would make it fit.

`plan_run` serves `toolkit plan`; `check_plan` and `plan_training` serve `toolkit train`.
Activation sizes are measured on the model (`toolkit.plan.activations`), and
`toolkit.plan.measure` measures a real training step's peak on the CPU to check the plan.
"""

from toolkit.plan.fit import MAX_BATCH, PlanResult, Suggestion, evaluate, fits, largest_batch, suggest_changes
from toolkit.plan.planner import (
    PART_NAMES,
    Part,
    Plan,
    PlanError,
    PlanInputs,
    describe,
    inputs_from_config,
    naive_inputs,
    plan_memory,
)
from toolkit.plan.run import check_plan, device_memory_bytes, plan_run, plan_training
from toolkit.plan.sizes import SizeError, format_size, parse_size

__all__ = [
    "MAX_BATCH",
    "PART_NAMES",
    "Part",
    "Plan",
    "PlanError",
    "PlanInputs",
    "PlanResult",
    "SizeError",
    "Suggestion",
    "check_plan",
    "describe",
    "device_memory_bytes",
    "evaluate",
    "fits",
    "format_size",
    "inputs_from_config",
    "largest_batch",
    "naive_inputs",
    "parse_size",
    "plan_memory",
    "plan_run",
    "plan_training",
    "suggest_changes",
]
