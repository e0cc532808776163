"""Cross-entropy and top-k over a class matrix split by class range across a process group.

Rank r keeps the rows [class_start, class_start + C_r) of the C × D class matrix. Every rank
gathers the embeddings and labels of all ranks, scores them against its own rows one chunk at a
time (`toolkit.ops.chunked_ce._partial_stats`), and the ranks combine their softmax statistics
with two all-reduces: the row maxima with MAX, then the sums of exponentials (rescaled to the
global maximum), the target logits and, for label smoothing, the logit sums with SUM. Every rank
then holds the same per-row losses of the global batch, equal to `F.cross_entropy` on the full
logits up to float32 rounding.

In backward each rank computes its rows' share of the gradient of the gathered embeddings. The
all-gather's backward sums those shares over the ranks and hands each rank the rows of its own
embeddings, so every rank's embeddings get the exact gradient of the global loss. The gradient
of the class rows stays on the rank that holds them.

Two options change how the class rows are used:

- sampling (`sampled_cross_entropy`, Partial FC style): each rank keeps the rows of every class
  in the global batch plus random other rows, up to `sample_rate` of its rows, and the softmax
  runs over the kept rows of all ranks only. This is an approximation of the full loss. The
  kept rows are copied into a new leaf tensor, so the gradient covers only them.
- a row update (`row_update`): backward passes each chunk's weight gradient to a callback as
  soon as it is computed, so that an optimizer can apply it at once. No gradient of the whole
  class matrix is then kept.

`group=None` means a single process: the same code runs without collectives.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from toolkit.ops.chunked_ce import (
    REDUCTIONS,
    _check_inputs,
    _check_labels,
    _check_matrices,
    _compute_dtype,
    _Head,
    _make_head,
    _partial_grads,
    _partial_stats,
    _smoothed_losses,
    chunked_topk,
)

__all__ = [
    "RowUpdate",
    "SampledLoss",
    "gather_rows",
    "row_counts",
    "sample_class_rows",
    "sampled_cross_entropy",
    "sharded_cross_entropy",
    "sharded_topk",
]

# Called in backward with some rows of the weight passed to the loss (a slice, or an int64 index
# tensor for a sampled loss) and their gradient (n, D), after those rows' share of the embedding
# gradient is computed.
RowUpdate = Callable[[slice | Tensor, Tensor], None]


# ---------------------------------------------------------------------------------------------
# gathering rows across ranks


def row_counts(rows: int, group: dist.ProcessGroup | None, device: torch.device) -> list[int]:
    """Return every rank's row count, in rank order; [rows] without a group."""
    if group is None:
        return [rows]
    world_size = dist.get_world_size(group)
    local = torch.tensor([rows], dtype=torch.int64, device=device)
    counts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(counts, local, group=group)
    return [int(count) for count in torch.cat(counts).tolist()]


def gather_rows(x: Tensor, group: dist.ProcessGroup | None, sizes: list[int] | None = None) -> Tensor:
    """Concatenate every rank's rows of `x` in rank order, with a gradient back to each rank's rows.

    x: (B_r, ...) on each rank. `sizes` lists every rank's B_r when they differ (see
    `row_counts`); None means all ranks pass the same shape. Returns (sum of B_r, ...). The
    backward pass sums the incoming gradient over ranks and returns this rank's rows of it.
    Without a group, returns x.
    """
    if group is None:
        return x
    if x.requires_grad:
        return _GatherRows.apply(x, group, sizes)
    return _all_gather(x, group, sizes)


def _all_gather(x: Tensor, group: dist.ProcessGroup, sizes: list[int] | None) -> Tensor:
    world_size = dist.get_world_size(group)
    x = x.contiguous()
    if sizes is None:
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts)

    # pad every rank's rows to the largest count, then cut the padding off again
    longest = max(sizes)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]].copy_(x)
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])  # (sum of sizes, ...)


class _GatherRows(torch.autograd.Function):
    """All-gather whose backward sums the gradient over ranks and slices this rank's rows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup, sizes: list[int] | None) -> Tensor:
        world_size = dist.get_world_size(group)
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.sizes = sizes if sizes is not None else [x.shape[0]] * world_size
        return _all_gather(x, group, sizes)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        # NOTE: an all-reduce moves world_size times the data a reduce-scatter would, but it
        # works on every backend (gloo has no reduce-scatter) and the rows are only B × D.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


# ---------------------------------------------------------------------------------------------
# public functions


def sharded_cross_entropy(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    class_start: int,
    num_classes: int,
    group: dist.ProcessGroup | None,
    chunk_size: int = 8192,
    label_smoothing: float = 0.0,
    normalize: bool = False,
    scale: float = 1.0,
    margin: float = 0.0,
    margin_type: str = "none",
    reduction: str = "mean",
    uneven: bool = False,
    row_update: RowUpdate | None = None,
) -> Tensor:
    """Compute the cross-entropy of every rank's embeddings against the class matrix split over ranks.

    Every rank of `group` must call this together. embeddings: (B, D) this rank's rows, any float
    dtype. weight: (C_r, D) this rank's class rows, the global classes [class_start,
    class_start + C_r). labels: (B,) int64 global class indices in [0, num_classes).
    uneven: set it when ranks may pass different B, 0 included. It costs one more small
    all-gather. Without it every rank must pass the same B.
    reduction: "mean" and "sum" over the global batch, the same value on every rank; "none"
    returns the losses of this rank's rows (B,).
    row_update: see `RowUpdate`; the weight then gets no gradient.
    The other options are those of `chunked_cross_entropy`.

    Raises ValueError for shapes, dtypes, options or labels that are invalid.
    """
    head = _check_options(embeddings, weight, labels, chunk_size, label_smoothing, reduction,
                          normalize, scale, margin_type, margin)
    _check_range(weight, class_start, num_classes)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        batch = _gather_batch(embeddings, weight, labels, head, group, uneven)
        _check_labels(batch.labels, num_classes)
        local_labels = batch.labels - class_start  # (B_all,), outside [0, C_r) where another rank owns the class
        losses = _ShardedCrossEntropy.apply(
            batch.x, weight, local_labels, head, label_smoothing, chunk_size, num_classes, group, row_update
        )
    return _reduce(losses, reduction, batch)


@dataclass
class SampledLoss:
    """The loss of one sampled step and the class rows it used.

    rows: (S_r,) sorted local row indices of this rank's shard that the step kept.
    weight_rows: (S_r, D) a copy of those rows. It is a leaf whose `.grad` is their gradient
    after backward, unless a row update consumed the gradient.
    """

    loss: Tensor
    rows: Tensor
    weight_rows: Tensor


def sampled_cross_entropy(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    class_start: int,
    num_classes: int,
    group: dist.ProcessGroup | None,
    sample_rate: float,
    generator: torch.Generator | None = None,
    chunk_size: int = 8192,
    label_smoothing: float = 0.0,
    normalize: bool = False,
    scale: float = 1.0,
    margin: float = 0.0,
    margin_type: str = "none",
    row_update: RowUpdate | None = None,
) -> SampledLoss:
    """Compute the mean cross-entropy of the global batch over a sample of the classes.

    Each rank keeps the rows of every class in the global batch plus random others, up to
    ceil(sample_rate × C_r) rows (`sample_class_rows`), and the softmax runs over the kept rows
    of all ranks. Label smoothing spreads over the kept classes. The result approximates the full
    loss and equals it when every row is kept. Every rank must pass the same B. The arguments
    are those of `sharded_cross_entropy`; `row_update` receives index tensors into `weight`.
    """
    head = _check_options(embeddings, weight, labels, chunk_size, label_smoothing, "mean",
                          normalize, scale, margin_type, margin)
    _check_range(weight, class_start, num_classes)
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"invalid sample_rate {sample_rate}; expected a fraction in (0, 1], such as 0.1")

    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        batch = _gather_batch(embeddings, weight, labels, head, group, uneven=False)
        _check_labels(batch.labels, num_classes)

        # the kept rows of this rank, and each label's position among them
        C_r = weight.shape[0]
        rows = sample_class_rows(batch.labels, class_start, C_r, sample_rate, generator)  # (S_r,)
        local = batch.labels - class_start  # (B_all,)
        owned = (local >= 0) & (local < C_r)
        positions = torch.searchsorted(rows, local.clamp(0, C_r - 1))  # (B_all,)
        local_labels = torch.where(owned, positions, -1)

        # the softmax runs over the kept rows of all ranks
        kept_classes = _sum_over_ranks(rows.shape[0], group, weight.device)
        weight_rows = weight.detach().index_select(0, rows).requires_grad_(row_update is None)  # (S_r, D)
        copy_update = None
        if row_update is not None:
            # blocks of the copy map back to the shard's rows
            def copy_update(block: slice, grad: Tensor) -> None:
                row_update(rows[block], grad)

        losses = _ShardedCrossEntropy.apply(
            batch.x, weight_rows, local_labels, head, label_smoothing, chunk_size, kept_classes, group, copy_update
        )
    return SampledLoss(loss=losses.mean(), rows=rows, weight_rows=weight_rows)


@torch.no_grad()
def sharded_topk(
    embeddings: Tensor,
    weight: Tensor,
    k: int,
    *,
    class_start: int,
    num_classes: int,
    group: dist.ProcessGroup | None,
    chunk_size: int = 8192,
    normalize: bool = False,
    uneven: bool = False,
) -> tuple[Tensor, Tensor]:
    """Find the k largest logits of this rank's embeddings over the class matrix split over ranks.

    Every rank of `group` must call this together; `uneven` as in `sharded_cross_entropy`.
    Returns (values, indices), both (B, k) for this rank's rows, sorted in descending order, with
    global class indices. With normalize=True the values are cosines.
    """
    _check_matrices(embeddings, weight, chunk_size)
    _check_range(weight, class_start, num_classes)
    if not 1 <= k <= num_classes:
        raise ValueError(f"k must be in [1, {num_classes}] for a class matrix of {num_classes} rows, got {k}.")
    B = embeddings.shape[0]
    sizes = row_counts(B, group, embeddings.device) if uneven and group is not None else None
    x = gather_rows(embeddings.to(_compute_dtype(embeddings, weight)), group, sizes)  # (B_all, D)

    # this rank's candidates, padded to k so that every rank sends the same shape
    B_all = x.shape[0]
    kept = min(k, weight.shape[0])
    values, indices = chunked_topk(x, weight, kept, chunk_size=chunk_size, normalize=normalize)  # (B_all, kept)
    candidates = torch.full((B_all, k), -math.inf, dtype=values.dtype, device=values.device)
    candidate_indices = torch.full((B_all, k), -1, dtype=torch.int64, device=values.device)
    candidates[:, :kept] = values
    candidate_indices[:, :kept] = indices + class_start
    if group is None:
        return candidates, candidate_indices

    # merge the candidates of all ranks
    world_size = dist.get_world_size(group)
    all_values = [torch.empty_like(candidates) for _ in range(world_size)]
    all_indices = [torch.empty_like(candidate_indices) for _ in range(world_size)]
    dist.all_gather(all_values, candidates, group=group)
    dist.all_gather(all_indices, candidate_indices, group=group)
    merged_values = torch.cat(all_values, dim=1)  # (B_all, world_size · k)
    merged_indices = torch.cat(all_indices, dim=1)  # (B_all, world_size · k)
    best, order = merged_values.topk(k, dim=1)  # (B_all, k)
    best_indices = merged_indices.gather(1, order)  # (B_all, k)

    start = _own_start(B, group, sizes)
    return best[start : start + B], best_indices[start : start + B]


def sample_class_rows(
    labels: Tensor, class_start: int, num_rows: int, sample_rate: float, generator: torch.Generator | None = None
) -> Tensor:
    """Return the sorted local rows one sampled step keeps, as an int64 tensor.

    Keeps every row whose class is among `labels` (global indices, and labels of other ranks'
    rows are ignored). Then adds rows drawn uniformly without replacement until
    ceil(sample_rate × num_rows) rows are kept. When the batch's classes alone are more, all of
    them are kept.
    """
    device = labels.device
    local = labels - class_start
    local = local[(local >= 0) & (local < num_rows)]
    positives = torch.unique(local)

    # random scores, with the positives above every random one, so top-k keeps them first
    scores = torch.rand(num_rows, generator=generator, device=device)
    scores[positives] = 2.0
    keep = max(math.ceil(sample_rate * num_rows), positives.numel(), 1)
    keep = min(keep, num_rows)
    return scores.topk(keep).indices.sort().values


# ---------------------------------------------------------------------------------------------
# autograd function


class _ShardedCrossEntropy(torch.autograd.Function):
    """Per-row losses (B_all,) of gathered `x` against this rank's rows; the same on every rank.

    local_labels: (B_all,) each row's label as an index into `weight`, or any index outside
    [0, C_r) where another rank has the class. num_classes: the classes of the whole softmax,
    which label smoothing spreads over.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        local_labels: Tensor,
        head: _Head,
        label_smoothing: float,
        chunk_size: int,
        num_classes: int,
        group: dist.ProcessGroup | None,
        row_update: RowUpdate | None,
    ) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            row_max, sum_exp, target_logit, sum_logits = _partial_stats(
                x, weight, local_labels, head=head, chunk_size=chunk_size, with_sum_logits=label_smoothing > 0
            )
            lse, target_logit, sum_logits = _combine_stats(row_max, sum_exp, target_logit, sum_logits, group)
            losses = _smoothed_losses(lse, target_logit, sum_logits, label_smoothing, num_classes)

        ctx.save_for_backward(x, weight, local_labels, lse)
        ctx.head = head
        ctx.label_smoothing = label_smoothing
        ctx.chunk_size = chunk_size
        ctx.num_classes = num_classes
        ctx.row_update = row_update
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, local_labels, lse = ctx.saved_tensors
        want_x = ctx.needs_input_grad[0]
        if not (want_x or ctx.needs_input_grad[1] or ctx.row_update is not None):
            return (None,) * 9
        settings = dict(head=ctx.head, label_smoothing=ctx.label_smoothing, num_classes=ctx.num_classes)
        with torch.autocast(device_type=x.device.type, enabled=False):
            grad_losses = grad_losses.to(x.dtype)
            if ctx.row_update is not None:
                grad_x = _grads_with_row_update(
                    x, weight, local_labels, lse, grad_losses, ctx.chunk_size, ctx.row_update, want_x, settings
                )
                grad_weight = None
            else:
                grad_x, grad_weight = _partial_grads(
                    x, weight, local_labels, lse, grad_losses, chunk_size=ctx.chunk_size,
                    want_x=want_x, want_weight=ctx.needs_input_grad[1], **settings,
                )
        return grad_x, grad_weight, None, None, None, None, None, None, None


def _grads_with_row_update(
    x: Tensor,
    weight: Tensor,
    local_labels: Tensor,
    lse: Tensor,
    grad_losses: Tensor,
    chunk_size: int,
    row_update: RowUpdate,
    want_x: bool,
    settings: dict,
) -> Tensor | None:
    """Return this rank's share of grad x, handing each chunk's weight gradient to `row_update`.

    Each chunk's share of grad x is computed from the rows before the update changes them.
    """
    grad_x = torch.zeros_like(x) if want_x else None
    C_r = weight.shape[0]
    for start in range(0, C_r, chunk_size):
        rows = weight[start : start + chunk_size]  # (n, D), a view
        chunk_grad_x, grad_rows = _partial_grads(
            x, rows, local_labels, lse, grad_losses, chunk_size=chunk_size, class_start=start,
            want_x=want_x, want_weight=True, **settings,
        )  # (B_all, D), (n, D)
        if grad_x is not None:
            grad_x += chunk_grad_x
        row_update(slice(start, start + rows.shape[0]), grad_rows)
    return grad_x


def _combine_stats(
    row_max: Tensor, sum_exp: Tensor, target_logit: Tensor, sum_logits: Tensor | None, group: dist.ProcessGroup | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Combine per-rank softmax statistics into (lse, target_logit, sum_logits) of all classes, each (B_all,)."""
    if group is None:
        return row_max + sum_exp.log(), target_logit, sum_logits

    # the global maximum first, so that every rank rescales its sum of exponentials to it
    global_max = row_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    rescaled = sum_exp * torch.exp(row_max - global_max)  # (B_all,)

    # the sums, the target logits (non-zero on the owning rank only) and the logit sums add up
    parts = [rescaled, target_logit] + ([sum_logits] if sum_logits is not None else [])
    stacked = torch.stack(parts)  # (2 or 3, B_all)
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
    lse = global_max + stacked[0].log()
    return lse, stacked[1], stacked[2] if sum_logits is not None else None


# ---------------------------------------------------------------------------------------------
# helpers


@dataclass
class _GatheredBatch:
    """The global batch: every rank's embeddings (cast, normalised) and labels, and each rank's row count."""

    x: Tensor  # (B_all, D)
    labels: Tensor  # (B_all,)
    rows: int  # this rank's B
    start: int  # where this rank's rows begin in the global batch


def _gather_batch(
    embeddings: Tensor, weight: Tensor, labels: Tensor, head: _Head, group: dist.ProcessGroup | None, uneven: bool
) -> _GatheredBatch:
    """Cast and normalise this rank's embeddings, then gather them and the labels from every rank.

    The cast to float32 happens before the gather, so the gradients are summed over ranks in
    float32 too.
    """
    B = embeddings.shape[0]
    sizes = row_counts(B, group, embeddings.device) if uneven and group is not None else None
    x = embeddings.to(_compute_dtype(embeddings, weight))
    if head.normalize:
        x = F.normalize(x, dim=1)
    x_all = gather_rows(x, group, sizes)  # (B_all, D)
    labels_all = gather_rows(labels, group, sizes)  # (B_all,)
    start = _own_start(B, group, sizes)
    return _GatheredBatch(x=x_all, labels=labels_all, rows=B, start=start)


def _own_start(rows: int, group: dist.ProcessGroup | None, sizes: list[int] | None) -> int:
    if group is None:
        return 0
    rank = dist.get_rank(group)
    return sum(sizes[:rank]) if sizes is not None else rank * rows


def _reduce(losses: Tensor, reduction: str, batch: _GatheredBatch) -> Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses[batch.start : batch.start + batch.rows]


def _sum_over_ranks(value: int, group: dist.ProcessGroup | None, device: torch.device) -> int:
    if group is None:
        return value
    total = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return int(total)


def _check_options(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    chunk_size: int,
    label_smoothing: float,
    reduction: str,
    normalize: bool,
    scale: float,
    margin_type: str,
    margin: float,
) -> _Head:
    _check_inputs(embeddings, weight, labels, chunk_size)
    head = _make_head(normalize, scale, margin_type, margin)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}.")
    if reduction not in REDUCTIONS:
        raise ValueError(f"Invalid reduction {reduction!r}. Use one of {', '.join(REDUCTIONS)}.")
    return head


def _check_range(weight: Tensor, class_start: int, num_classes: int) -> None:
    C_r = weight.shape[0]
    if C_r < 1:
        raise ValueError("invalid empty class shard: every rank needs at least one class row, so use num_classes >= world_size")
    if class_start < 0 or class_start + C_r > num_classes:
        raise ValueError(
            f"rows [{class_start}, {class_start + C_r}) are outside the {num_classes} classes; "
            "check class_start and num_classes"
        )
