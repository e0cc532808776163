"""A plan as Rich tables for the terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from toolkit.plan.fit import PlanResult
from toolkit.plan.planner import FRAGMENTATION, OVERHEAD_FIXED_BYTES, describe
from toolkit.plan.sizes import format_size


def render_plan(result: PlanResult, console: Console) -> None:
    """Print the parts table, the verdict, the largest batch and, when it does not fit, the changes that would."""
    plan = result.plan
    console.print(f"memory plan per GPU: {describe(plan.inputs)}", highlight=False)
    console.print(parts_table(result))

    # verdict
    budget = format_size(result.budget_bytes)
    if result.fits:
        console.print(f"[bold green]fits[/]: {format_size(plan.total_bytes)} of {budget}", highlight=False)
    else:
        console.print(
            f"[bold red]does not fit[/]: {format_size(plan.total_bytes)} needed, {budget} available",
            highlight=False,
        )
    if result.largest_batch:
        console.print(f"largest batch that fits: {result.largest_batch}", highlight=False)
    else:
        console.print(f"largest batch that fits: none; batch 1 does not fit in {budget}", highlight=False)

    for note in (*result.notes, *plan.notes):
        console.print(f"note: {note}", highlight=False)

    if not result.fits and result.suggestions:
        console.print(suggestions_table(result))
    elif not result.fits and not plan.inputs.naive:
        console.print("no single change among precision, fused update, checkpointing, optimizer, embedding size "
                      "and GPU count makes it fit at this batch size", highlight=False)


def parts_table(result: PlanResult) -> Table:
    """Return the table of parts: full size, bytes live at the peak, and what each part is."""
    plan = result.plan
    table = Table(title="memory by part", title_justify="left")
    table.add_column("part")
    table.add_column("size", justify="right")
    table.add_column("at peak", justify="right")
    table.add_column("what", overflow="fold")
    for part in plan.parts:
        if part.bytes == 0 and part.at_peak == 0:
            continue
        table.add_row(part.name, format_size(part.bytes), format_size(part.at_peak), part.note)

    table.add_section()
    table.add_row("peak", "", format_size(plan.peak_bytes), f"during the {plan.peak_moment}")
    fixed = OVERHEAD_FIXED_BYTES[plan.inputs.device_type]
    overhead = f"{FRAGMENTATION:.0%} of the peak for allocator fragmentation"
    if fixed:
        overhead = f"CUDA context and library handles ({format_size(fixed)}, an estimate) plus {overhead}"
    table.add_row("framework overhead", "", format_size(plan.overhead_bytes), overhead)
    table.add_row("total", "", format_size(plan.total_bytes), f"of {format_size(result.budget_bytes)}")
    return table


def suggestions_table(result: PlanResult) -> Table:
    """Return the single changes that make the plan fit, cheapest for the user first."""
    table = Table(title="changes that make it fit, cheapest first", title_justify="left")
    table.add_column("change", overflow="fold")
    table.add_column("option", no_wrap=True)
    table.add_column("total", justify="right")
    table.add_column("largest batch", justify="right")
    table.add_column("cost", overflow="fold")
    for suggestion in result.suggestions:
        table.add_row(
            suggestion.change,
            suggestion.option,
            format_size(suggestion.total_bytes),
            str(suggestion.largest_batch),
            suggestion.cost,
        )
    return table


__all__ = ["parts_table", "render_plan", "suggestions_table"]
