"""Cross-entropy over a large class matrix, computed one chunk of classes at a time.

`chunked_cross_entropy(x, W, y)` returns the loss and gradients of `F.cross_entropy(x @ W.T, y)`
up to float32 rounding, but it never builds the (B, C) logit matrix or its gradient. The
forward pass keeps an online log-sum-exp (a running row maximum and a sum of exponentials
rescaled to it) over chunks of `chunk_size` classes and saves only the (B,) log-sum-exp. The
backward pass recomputes each chunk's logits, so the extra memory is O(B × chunk_size) and the
price is a fourth (B, D) × (D, chunk) matmul per chunk, where the plain loss runs three.

Logits are always computed in float32 (float64 when an input is float64), with autocast turned
off inside, so bf16/fp16 embeddings from an autocast region give a finite loss even when logits
are large. Gradients come back in the dtypes of the inputs.

The per-chunk statistics (`_partial_stats`) and gradients (`_partial_grads`) take a class
offset, so a class-sharded head can run them on its own rows and combine the ranks with
all-reduces. The row maxima combine with MAX. The sums of exponentials, rescaled to the global
maximum, combine with SUM, and so do the target logits and the logit sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["chunked_cross_entropy", "chunked_logsumexp", "chunked_topk"]

MARGIN_TYPES = ("none", "cosface", "arcface")
REDUCTIONS = ("mean", "sum", "none")

# Smallest sin θ used in the ArcFace slope d cos(θ + m) / d cos θ, which grows like 1 / sin θ as
# an embedding lines up with its class row.
_MIN_SINE = 1e-6


@dataclass(frozen=True)
class _Head:
    """Logit settings: cosine normalisation, scale and the margin on the target logit."""

    normalize: bool = False
    scale: float = 1.0
    margin_type: str = "none"
    margin: float = 0.0

    @property
    def has_margin(self) -> bool:
        return self.margin_type != "none" and self.margin != 0.0


# ---------------------------------------------------------------------------------------------
# public functions


def chunked_cross_entropy(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    chunk_size: int = 8192,
    label_smoothing: float = 0.0,
    normalize: bool = False,
    scale: float = 1.0,
    margin: float = 0.0,
    margin_type: str = "none",
    reduction: str = "mean",
) -> Tensor:
    """Compute `F.cross_entropy(scale * embeddings @ weight.T, labels)` one class chunk at a time.

    embeddings: (B, D) in any float dtype, for example bf16/fp16 from an autocast region.
    weight: (C, D) class matrix. Its gradient is a dense (C, D) tensor in `weight.dtype`.
    labels: (B,) int64 class indices in [0, C).
    normalize: L2-normalise the embeddings and each class row (per chunk, so no normalised
        copy of the class matrix is made), which turns the logits into scaled cosines.
    scale: factor on every logit (cosine heads use values such as 30 or 64).
    margin_type: "none", "cosface" (target logit scale · (cos θ − margin)) or "arcface"
        (target logit scale · cos(θ + margin), margin in radians). Both need normalize=True.
    label_smoothing, reduction: as in `F.cross_entropy`.

    Raises ValueError for shapes, dtypes, options or labels that are invalid.
    """
    _check_inputs(embeddings, weight, labels, chunk_size)
    head = _make_head(normalize, scale, margin_type, margin)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}.")
    if reduction not in REDUCTIONS:
        raise ValueError(f"Invalid reduction {reduction!r}. Use one of {', '.join(REDUCTIONS)}.")
    _check_labels(labels, weight.shape[0])

    compute_dtype = _compute_dtype(embeddings, weight)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        # The cast and the normalisation stay in autograd, which returns dx in embeddings.dtype.
        x = embeddings.to(compute_dtype)
        if head.normalize:
            x = F.normalize(x, dim=1)
        losses = _ChunkedCrossEntropy.apply(x, weight, labels, head, label_smoothing, chunk_size)

    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


@torch.no_grad()
def chunked_topk(
    embeddings: Tensor,
    weight: Tensor,
    k: int,
    *,
    chunk_size: int = 8192,
    normalize: bool = False,
) -> tuple[Tensor, Tensor]:
    """Find the k largest logits `embeddings @ weight.T` per row without the (B, C) matrix.

    Returns (values, indices), both (B, k), sorted in descending order like `torch.topk`. With
    normalize=True the values are cosines. Values are float32 (float64 for float64 inputs).
    """
    _check_matrices(embeddings, weight, chunk_size)
    B, D = embeddings.shape
    C = weight.shape[0]
    if not 1 <= k <= C:
        raise ValueError(f"k must be in [1, {C}] for a class matrix of {C} rows, got {k}.")

    compute_dtype = _compute_dtype(embeddings, weight)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        x = _prepare_embeddings(embeddings, compute_dtype, normalize)
        best_values = x.new_empty(B, 0)
        best_indices = torch.empty(B, 0, dtype=torch.int64, device=x.device)

        for start, rows in _chunks(weight, chunk_size):
            w, _ = _prepare_rows(rows, x.dtype, normalize)  # (n, D)
            logits = _chunk_matmul(x, w)  # (B, n)
            values, indices = logits.topk(min(k, logits.shape[1]), dim=1)  # (B, ≤k)

            # merge the chunk's candidates into the running top-k
            candidates = torch.cat([best_values, values], dim=1)  # (B, ≤2k)
            candidate_indices = torch.cat([best_indices, indices + start], dim=1)  # (B, ≤2k)
            best_values, order = candidates.topk(min(k, candidates.shape[1]), dim=1)  # (B, ≤k)
            best_indices = candidate_indices.gather(1, order)  # (B, ≤k)

    return best_values, best_indices


@torch.no_grad()
def chunked_logsumexp(
    embeddings: Tensor,
    weight: Tensor,
    *,
    chunk_size: int = 8192,
    normalize: bool = False,
    scale: float = 1.0,
) -> Tensor:
    """Compute `torch.logsumexp(scale * embeddings @ weight.T, dim=1)`, shape (B,), by chunks."""
    _check_matrices(embeddings, weight, chunk_size)
    head = _make_head(normalize, scale, "none", 0.0)
    compute_dtype = _compute_dtype(embeddings, weight)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        x = _prepare_embeddings(embeddings, compute_dtype, normalize)
        row_max, sum_exp, _, _ = _partial_stats(
            x, weight, None, head=head, chunk_size=chunk_size, with_sum_logits=False
        )
    return row_max + sum_exp.log()


# ---------------------------------------------------------------------------------------------
# autograd function


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy (B,) of `x` (already cast and normalised) against `weight`."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        labels: Tensor,
        head: _Head,
        label_smoothing: float,
        chunk_size: int,
    ) -> Tensor:
        C = weight.shape[0]
        with torch.autocast(device_type=x.device.type, enabled=False):
            row_max, sum_exp, target_logit, sum_logits = _partial_stats(
                x, weight, labels, head=head, chunk_size=chunk_size, with_sum_logits=label_smoothing > 0
            )
            lse = row_max + sum_exp.log()  # (B,)
            losses = _smoothed_losses(lse, target_logit, sum_logits, label_smoothing, C)

        ctx.save_for_backward(x, weight, labels, lse)
        ctx.head = head
        ctx.label_smoothing = label_smoothing
        ctx.chunk_size = chunk_size
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, labels, lse = ctx.saved_tensors
        want_x, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (want_x or want_weight):
            return None, None, None, None, None, None

        with torch.autocast(device_type=x.device.type, enabled=False):
            grad_x, grad_weight = _partial_grads(
                x,
                weight,
                labels,
                lse,
                grad_losses.to(x.dtype),
                head=ctx.head,
                label_smoothing=ctx.label_smoothing,
                num_classes=weight.shape[0],
                chunk_size=ctx.chunk_size,
                want_x=want_x,
                want_weight=want_weight,
            )
        return grad_x, grad_weight, None, None, None, None


# ---------------------------------------------------------------------------------------------
# per-chunk statistics and gradients, reusable by a class-sharded head


def _smoothed_losses(
    lse: Tensor, target_logit: Tensor, sum_logits: Tensor | None, label_smoothing: float, num_classes: int
) -> Tensor:
    """Return per-row losses from the log-sum-exp, the target logit and the sum of all logits.

    The smoothed target puts 1 − ε on the label and ε / C on every class.
    """
    losses = lse - (1.0 - label_smoothing) * target_logit  # (B,)
    if sum_logits is not None:
        losses = losses - (label_smoothing / num_classes) * sum_logits
    return losses


def _partial_stats(
    x: Tensor,
    weight: Tensor,
    labels: Tensor | None,
    *,
    head: _Head,
    chunk_size: int,
    class_start: int = 0,
    with_sum_logits: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Compute the softmax statistics of the classes in `weight` for each row of `x`.

    x: (B, D) in the compute dtype, already normalised when head.normalize.
    weight: (C_local, D) rows for the global classes [class_start, class_start + C_local).
    labels: (B,) global labels, or None. A label outside this range adds 0 to target_logit, so
        summing target_logit over disjoint class ranges gives each row's target logit.

    Returns (row_max, sum_exp, target_logit, sum_logits), each (B,): the maximum logit, the sum
    of exp(logit − row_max), the logit of the label (with the margin applied) and the sum of all
    logits. Only label smoothing needs sum_logits, so it is None when with_sum_logits is False,
    which saves one pass over each chunk. Two ranges combine as max = max(m1, m2) and
    sum_exp = s1 · exp(m1 − max) + s2 · exp(m2 − max), and the other two add.
    """
    B, D = x.shape
    row_max = torch.full((B,), -math.inf, dtype=x.dtype, device=x.device)
    sum_exp = x.new_zeros(B)
    target_logit = x.new_zeros(B)
    sum_logits = x.new_zeros(B) if with_sum_logits else None

    for start, rows in _chunks(weight, chunk_size):
        w, _ = _prepare_rows(rows, x.dtype, head.normalize)  # (n, D)
        logits, targets = _chunk_logits(x, w, labels, head, class_start + start)  # (B, n)
        if targets is not None:
            # a row's label falls in exactly one chunk of one range
            target_logit = torch.where(targets.hit, logits.gather(1, targets.cols).squeeze(1), target_logit)
        if sum_logits is not None:
            sum_logits += logits.sum(dim=1)

        # online log-sum-exp: rescale the running sum to the new maximum
        new_max = torch.maximum(row_max, logits.amax(dim=1))  # (B,)
        chunk_sum = logits.sub_(new_max[:, None]).exp_().sum(dim=1)  # (B,), reuses the logits
        sum_exp = sum_exp * torch.exp(row_max - new_max) + chunk_sum
        row_max = new_max
        del logits  # free this chunk's buffer before the next one is allocated

    return row_max, sum_exp, target_logit, sum_logits


def _partial_grads(
    x: Tensor,
    weight: Tensor,
    labels: Tensor,
    lse: Tensor,
    grad_losses: Tensor,
    *,
    head: _Head,
    label_smoothing: float,
    num_classes: int,
    chunk_size: int,
    class_start: int = 0,
    want_x: bool = True,
    want_weight: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """Compute the gradients of the per-row losses for the classes in `weight`.

    x: (B, D) as given to `_partial_stats`; lse: (B,) log-sum-exp over all `num_classes` classes;
    grad_losses: (B,) gradient of each row's loss.

    Returns (grad_x, grad_weight): grad_x (B, D) in x.dtype is this range's share, so a sharded
    head sums it over ranges; grad_weight (C_local, D) in weight.dtype. Each is None when not
    wanted.
    """
    grad_x = torch.zeros_like(x) if want_x else None
    row_factor = grad_losses * head.scale if head.scale != 1.0 else grad_losses  # (B,)
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if want_weight else None

    for start, rows in _chunks(weight, chunk_size):
        n = rows.shape[0]
        w, w_norm = _prepare_rows(rows, x.dtype, head.normalize)  # (n, D), (n, 1) or None
        logits, targets = _chunk_logits(x, w, labels, head, class_start + start)  # (B, n)

        # d loss / d logit = softmax − smoothed one-hot, times the row's incoming gradient and
        # the scale (d logit / d cos), with the margin's slope on the targets
        grad_logits = logits.sub_(lse[:, None]).exp_()  # (B, n), reuses the logits
        if label_smoothing:
            grad_logits -= label_smoothing / num_classes
        one_hot = targets.hit.to(x.dtype) * -(1.0 - label_smoothing)  # (B,), 0 where no target
        grad_logits.scatter_add_(1, targets.cols, one_hot[:, None])
        grad_logits *= row_factor[:, None]
        if head.has_margin:
            slope = torch.where(targets.hit, _margin_slope(targets.cos, head), 1.0)  # (B,)
            at_target = grad_logits.gather(1, targets.cols)  # (B, 1)
            grad_logits.scatter_(1, targets.cols, at_target * slope[:, None])

        # back through cos = x @ w.T and, for cosine heads, through w / ‖w‖
        if want_x:
            grad_x.addmm_(grad_logits, w)  # (B, D)
        if grad_weight is not None:
            _write_weight_grad(grad_weight[start : start + n], grad_logits, x, w, w_norm)
        del logits, grad_logits  # free this chunk's buffer before the next one is allocated

    return grad_x, grad_weight


# ---------------------------------------------------------------------------------------------
# helpers


def _write_weight_grad(grad_rows: Tensor, grad_logits: Tensor, x: Tensor, w: Tensor, w_norm: Tensor | None) -> None:
    """Write grad_logits.T @ x (n, D), mapped back through w / ‖w‖ for cosine heads, into grad_rows."""
    if w_norm is None and grad_rows.dtype == x.dtype:
        torch.mm(grad_logits.T, x, out=grad_rows)  # no (n, D) temporary
        return
    grad_w = grad_logits.T @ x  # (n, D)
    if w_norm is not None:
        grad_w = _normalize_backward(w, w_norm, grad_w)
    grad_rows.copy_(grad_w)


def _chunks(weight: Tensor, chunk_size: int):
    """Yield (start, rows) over consecutive blocks of at most chunk_size class rows."""
    C = weight.shape[0]
    for start in range(0, C, chunk_size):
        yield start, weight[start : start + chunk_size]  # (n, D), a view


def _prepare_rows(rows: Tensor, dtype: torch.dtype, normalize: bool) -> tuple[Tensor, Tensor | None]:
    """Cast a chunk of class rows to the compute dtype and L2-normalise it if asked.

    Returns (w, norm): w (n, D) and the clamped row norms (n, 1), or None without normalize.
    """
    w = rows.to(dtype)
    if not normalize:
        return w, None
    # The same floor on the norm as F.normalize, so results match it for tiny rows.
    norm = w.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (n, 1)
    return w / norm, norm


def _normalize_backward(unit: Tensor, norm: Tensor, grad_unit: Tensor) -> Tensor:
    """Map the gradient for u = v / ‖v‖ (row-wise) to the gradient for v."""
    radial = (unit * grad_unit).sum(dim=1, keepdim=True)  # (n, 1)
    return (grad_unit - unit * radial) / norm


@dataclass
class _Targets:
    """Positions of a batch's labels in one chunk of n classes, found without a host sync.

    cols: (B, 1) column of each row's label, clamped into [0, n) so that gather and scatter stay
    in bounds. hit: (B,) whether the label is in this chunk. cos: (B,) x · w at cols before the
    margin. Rows without a hit hold placeholder values, which callers mask with hit.
    """

    cols: Tensor
    hit: Tensor
    cos: Tensor


def _chunk_logits(
    x: Tensor, w: Tensor, labels: Tensor | None, head: _Head, chunk_start: int
) -> tuple[Tensor, _Targets | None]:
    """Compute one chunk's logits with the margin applied to the targets that fall in it.

    x: (B, D); w: (n, D) prepared by `_prepare_rows` for the classes starting at chunk_start.
    Returns (logits (B, n), targets), with targets None when labels is None.
    """
    cos = _chunk_matmul(x, w)  # (B, n)
    targets = None
    if labels is not None:
        n = w.shape[0]
        local = labels - chunk_start  # (B,)
        hit = (local >= 0) & (local < n)  # (B,)
        cols = local.clamp(0, n - 1)[:, None]  # (B, 1)
        targets = _Targets(cols=cols, hit=hit, cos=cos.gather(1, cols).squeeze(1))
        if head.has_margin:
            shifted = torch.where(hit, _apply_margin(targets.cos, head), targets.cos)  # (B,)
            cos.scatter_(1, cols, shifted[:, None])
    if head.scale != 1.0:
        cos *= head.scale
    return cos, targets


def _chunk_matmul(x: Tensor, w: Tensor) -> Tensor:
    """Return x @ w.T, shape (B, n).

    On the CPU the product is computed as w @ x.T and returned as a transposed view, because MKL
    (2024.2, in torch 2.14.1) allocates a packing buffer of about 10 MiB for each x @ w.T with
    B=256 and n=8192, and none for w @ x.T. Other devices use the plain row-major product.
    """
    if x.device.type == "cpu":
        return (w @ x.T).T  # (B, n), stored class-major as (n, B)
    return x @ w.T  # (B, n)


def _apply_margin(cos: Tensor, head: _Head) -> Tensor:
    """Return the target cosine with the margin: cos θ − m (CosFace) or cos(θ + m) (ArcFace).

    For ArcFace, where θ + m > π the value cos θ − m · sin m replaces cos(θ + m), which would
    rise again there. This is the usual fallback of public ArcFace implementations
    (`ArcMarginProduct` with easy_margin=False), and it keeps the target logit decreasing in θ.
    """
    m = head.margin
    if head.margin_type == "cosface":
        return cos - m
    sine = (1.0 - cos * cos).clamp_min(0.0).sqrt()
    shifted = cos * math.cos(m) - sine * math.sin(m)
    fallback = cos - m * math.sin(m)
    return torch.where(cos > math.cos(math.pi - m), shifted, fallback)


def _margin_slope(cos: Tensor, head: _Head) -> Tensor:
    """Return d(margin-applied cosine) / d cos θ for the target cosines."""
    if head.margin_type == "cosface":
        return torch.ones_like(cos)
    m = head.margin
    sine = (1.0 - cos * cos).clamp_min(0.0).sqrt().clamp_min(_MIN_SINE)
    slope = math.cos(m) + cos * (math.sin(m) / sine)
    return torch.where(cos > math.cos(math.pi - m), slope, torch.ones_like(cos))


def _prepare_embeddings(embeddings: Tensor, dtype: torch.dtype, normalize: bool) -> Tensor:
    x = embeddings.to(dtype)
    return F.normalize(x, dim=1) if normalize else x


def _compute_dtype(embeddings: Tensor, weight: Tensor) -> torch.dtype:
    """Return float32, or float64 when either input is float64."""
    return torch.promote_types(torch.promote_types(embeddings.dtype, weight.dtype), torch.float32)


# ---------------------------------------------------------------------------------------------
# input checks


def _check_matrices(embeddings: Tensor, weight: Tensor, chunk_size: int) -> None:
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be 2-D (B, D), got shape {tuple(embeddings.shape)}.")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (C, D), got shape {tuple(weight.shape)}.")
    if embeddings.shape[1] != weight.shape[1]:
        raise ValueError(
            f"embeddings have D={embeddings.shape[1]} but weight rows have D={weight.shape[1]}. "
            "The embedding width must match the class matrix."
        )
    for name, tensor in (("embeddings", embeddings), ("weight", weight)):
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}.")
    if embeddings.device != weight.device:
        raise ValueError(f"embeddings are on {embeddings.device} but weight is on {weight.device}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of classes, got {chunk_size}.")


def _check_inputs(embeddings: Tensor, weight: Tensor, labels: Tensor, chunk_size: int) -> None:
    _check_matrices(embeddings, weight, chunk_size)
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 class indices, got {labels.dtype}.")
    if labels.shape != (embeddings.shape[0],):
        raise ValueError(
            f"labels must have shape (B,) = ({embeddings.shape[0]},), got {tuple(labels.shape)}."
        )
    if labels.device != embeddings.device:
        raise ValueError(f"labels are on {labels.device} but embeddings are on {embeddings.device}.")


def _check_labels(labels: Tensor, num_classes: int) -> None:
    """Raise ValueError naming the first label outside [0, num_classes)."""
    # NOTE: this reads a flag back from the device, one host sync per call on CUDA.
    invalid = (labels < 0) | (labels >= num_classes)
    if labels.numel() and bool(invalid.any()):
        position = int(invalid.nonzero()[0, 0])
        value = int(labels[position])
        raise ValueError(
            f"Invalid label {value} at batch position {position}: labels must be in [0, {num_classes}) "
            f"for a class matrix of {num_classes} rows. Check that the dataset's classes match the model."
        )


def _make_head(normalize: bool, scale: float, margin_type: str, margin: float) -> _Head:
    if margin_type not in MARGIN_TYPES:
        raise ValueError(f"Invalid margin_type {margin_type!r}. Use one of {', '.join(MARGIN_TYPES)}.")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number, got {scale}.")
    if margin_type == "none" and margin != 0.0:
        raise ValueError(f"margin={margin} needs margin_type 'cosface' or 'arcface'.")
    if margin_type != "none" and not normalize:
        raise ValueError(f"margin_type {margin_type!r} works on cosines, so it needs normalize=True.")
    if margin_type == "arcface" and not 0.0 <= margin < math.pi:
        raise ValueError(f"An ArcFace margin is an angle in radians in [0, π), got {margin}.")
    if margin_type == "cosface" and not math.isfinite(margin):
        raise ValueError(f"A CosFace margin must be finite, got {margin}.")
    return _Head(normalize=normalize, scale=float(scale), margin_type=margin_type, margin=float(margin))
