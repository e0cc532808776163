"""Whether a plan fits a memory budget, the largest batch that fits, and the cheapest changes that make it fit."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from toolkit.plan.planner import Plan, PlanInputs, plan_memory, plan_to_dict

# Largest batch the search tries, far above the ResNet training batches that fit on current GPUs.
MAX_BATCH = 1 << 16
# Smallest embedding size a suggestion goes down to.
MIN_EMBEDDING_DIM = 64
# Maximum number of GPUs a suggestion requests.
MAX_WORLD_SIZE = 64


@dataclass(frozen=True)
class Suggestion:
    """One change that makes the plan fit, with what it costs the user."""

    change: str  # the change, such as "bf16 autocast instead of fp32"
    option: str  # the command-line option that plans it, such as "--precision bf16"
    cost: str  # the cost of the change to the user
    total_bytes: int  # planned memory with the change
    largest_batch: int  # largest batch that fits with the change


@dataclass(frozen=True)
class PlanResult:
    """A plan checked against a memory budget."""

    plan: Plan
    budget_bytes: int
    fits: bool
    largest_batch: int  # 0 when batch 1 does not fit
    suggestions: tuple[Suggestion, ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Return the result as JSON-ready data; every size is in bytes."""
        data = plan_to_dict(self.plan)
        data["notes"] = [*self.notes, *data["notes"]]
        data.update(
            {
                "gpu_memory_bytes": self.budget_bytes,
                "fits": self.fits,
                "largest_batch": self.largest_batch,
                "suggestions": [dataclasses.asdict(suggestion) for suggestion in self.suggestions],
            }
        )
        return data


def fits(inputs: PlanInputs, budget_bytes: int) -> bool:
    return plan_memory(inputs).total_bytes <= budget_bytes


def largest_batch(inputs: PlanInputs, budget_bytes: int, max_batch: int = MAX_BATCH) -> int:
    """Return the largest batch size up to `max_batch` whose plan fits `budget_bytes`, or 0 if batch 1 does not.

    The planned total never falls as the batch grows, so a doubling search followed by a binary
    search finds it.
    """
    def fits_at(batch_size: int) -> bool:
        return fits(dataclasses.replace(inputs, batch_size=batch_size), budget_bytes)

    if max_batch < 1 or not fits_at(1):
        return 0

    # double until a batch does not fit, then search between the last two
    low, high = 1, 2
    while high <= max_batch and fits_at(high):
        low, high = high, high * 2
    high = min(high, max_batch + 1)
    while high - low > 1:
        middle = (low + high) // 2
        if fits_at(middle):
            low = middle
        else:
            high = middle
    return low


def evaluate(
    inputs: PlanInputs,
    budget_bytes: int,
    *,
    suggest: bool = True,
    notes: tuple[str, ...] = (),
    max_batch: int = MAX_BATCH,
) -> PlanResult:
    """Plan `inputs`, check the plan against `budget_bytes`, and suggest changes when it does not fit.

    The largest batch is searched up to `max_batch`.
    """
    plan = plan_memory(inputs)
    fitting = plan.total_bytes <= budget_bytes
    suggestions = tuple(suggest_changes(inputs, budget_bytes)) if suggest and not fitting else ()
    return PlanResult(
        plan=plan,
        budget_bytes=budget_bytes,
        fits=fitting,
        largest_batch=largest_batch(inputs, budget_bytes, max_batch),
        suggestions=suggestions,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------
# suggestions


Candidate = tuple[str, str, str, PlanInputs]  # change, option, cost, changed inputs


def suggest_changes(inputs: PlanInputs, budget_bytes: int) -> Iterator[Suggestion]:
    """Yield the single changes that make `inputs` fit at its batch size, cheapest for the user first.

    The order is by what a change costs the user. 16-bit precision is usually faster and rarely
    changes accuracy, and the fused head update computes the same SGD step. Checkpointing costs
    about one more forward pass per step. SGD instead of AdamW needs a new learning rate, a
    smaller embedding may lower accuracy, and more GPUs cost hardware.
    """
    for make in CANDIDATES:
        for change, option, cost, changed in make(inputs, budget_bytes):
            plan = plan_memory(changed)
            if plan.total_bytes <= budget_bytes:
                yield Suggestion(change, option, cost, plan.total_bytes, largest_batch(changed, budget_bytes))


def _precision(inputs: PlanInputs, budget_bytes: int) -> Iterator[Candidate]:
    if inputs.precision == "fp32":
        yield (
            "bf16 autocast instead of fp32 (fp16 needs the same memory)",
            "--precision bf16",
            "none on GPUs with bf16; usually faster, rarely changes accuracy",
            dataclasses.replace(inputs, precision="bf16"),
        )


def _fused_update(inputs: PlanInputs, budget_bytes: int) -> Iterator[Candidate]:
    # toolkit train allows it with SGD, one micro-batch per step and no fp16 GradScaler
    allowed = inputs.optimizer == "sgd" and inputs.grad_accum == 1 and inputs.precision != "fp16"
    if allowed and not inputs.fused_head_update and not inputs.naive:
        yield (
            "fused head update: no class matrix gradient",
            "--fused-head-update",
            "none: the same SGD step, applied chunk by chunk in the backward pass; needs --clip-grad 0",
            dataclasses.replace(inputs, fused_head_update=True),
        )


def _checkpointing(inputs: PlanInputs, budget_bytes: int) -> Iterator[Candidate]:
    for mode in ("stage", "block"):
        if inputs.checkpointing == "none" or (inputs.checkpointing == "stage" and mode == "block"):
            yield (
                f"activation checkpointing per {mode}",
                f"--checkpointing {mode}",
                "about one more forward pass per step (roughly 30% more compute)",
                dataclasses.replace(inputs, checkpointing=mode),
            )


def _optimizer(inputs: PlanInputs, budget_bytes: int) -> Iterator[Candidate]:
    if inputs.optimizer in ("adamw", "adam"):
        yield (
            "SGD with momentum instead of AdamW: one state copy instead of two",
            "--optimizer sgd",
            "a different optimizer: the learning rate and schedule need retuning",
            dataclasses.replace(inputs, optimizer="sgd", momentum=0.9),
        )


def _embedding(inputs: PlanInputs, budget_bytes: int) -> Iterator[Candidate]:
    if inputs.naive:
        return
    width = inputs.embedding_dim
    if width == 0:
        return  # without a neck the width is the backbone's; a neck is a model change, planned with --embedding-dim
    width //= 2
    while width >= MIN_EMBEDDING_DIM:
        changed = dataclasses.replace(inputs, embedding_dim=width)
        if fits(changed, budget_bytes):
            yield (
                f"embedding size {width} instead of {inputs.embedding_dim}",
                f"--embedding-dim {width}",
                "a smaller class matrix; may lower accuracy",
                changed,
            )
            return
        width //= 2


def _more_gpus(inputs: PlanInputs, budget_bytes: int) -> Iterator[Candidate]:
    if inputs.naive:
        return
    world_size = inputs.world_size * 2
    while world_size <= MAX_WORLD_SIZE:
        changed = dataclasses.replace(inputs, world_size=world_size)
        if fits(changed, budget_bytes):
            yield (
                f"{world_size} GPUs sharing the class matrix by class range",
                f"--world-size {world_size}",
                f"more hardware: train with torchrun --nproc-per-node {world_size}",
                changed,
            )
            return
        world_size *= 2


CANDIDATES: tuple[Callable[[PlanInputs, int], Iterator[Candidate]], ...] = (
    _precision,
    _fused_update,
    _checkpointing,
    _optimizer,
    _embedding,
    _more_gpus,
)


__all__ = ["MAX_BATCH", "PlanResult", "Suggestion", "evaluate", "fits", "largest_batch", "suggest_changes"]
