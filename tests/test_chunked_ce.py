"""Chunked cross-entropy and top-k checked against F.cross_entropy and torch.topk on full logits.

Tolerances: float32 comparisons use rtol=1e-5, atol=1e-6 on losses and rtol=1e-4, atol=1e-6 on
gradients, because summing the classes in chunks changes the order of float32 additions.
With logits in the hundreds, a float32 rounding of a logit moves its softmax probability by the
same relative amount, so those gradients are compared with rtol=atol=1e-4 relative to the
largest entry.
Gradients returned in bf16 are compared with rtol=atol=2e-2 relative to the largest entry,
because bf16 keeps 8 significant bits (a relative step of 2**-8 ≈ 0.004) and fp16 with
rtol=atol=2e-3 for its 11 bits.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from toolkit.ops import chunked_cross_entropy, chunked_logsumexp, chunked_topk

LOSS_TOL = {"rtol": 1e-5, "atol": 1e-6}
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-6}
LARGE_LOGIT_TOL = 1e-4


def make_inputs(B: int, D: int, C: int, *, dtype=torch.float32, spread: float = 1.0):
    x = (torch.randn(B, D, dtype=dtype) * spread).requires_grad_()
    weight = torch.randn(C, D, dtype=dtype).requires_grad_()
    labels = torch.randint(0, C, (B,))
    return x, weight, labels


def grads_of(loss: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, tensors)


def assert_close_to_max(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Compare two tensors with an absolute tolerance of tol times the largest expected entry."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale)


def margin_reference(x, weight, labels, *, scale, margin, margin_type, label_smoothing=0.0):
    """Cosine-head loss on the full (B, C) matrix: normalise, put the margin on the target, CE."""
    cos = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).T  # (B, C)
    target = cos.gather(1, labels[:, None]).squeeze(1)  # (B,)
    if margin_type == "cosface":
        shifted = target - margin
    else:
        theta = torch.acos(target.clamp(-1.0, 1.0))
        # past θ + m = π, use the linear fallback cos θ − m · sin m
        shifted = torch.where(theta + margin <= math.pi, torch.cos(theta + margin), target - margin * math.sin(margin))
    logits = cos.scatter(1, labels[:, None], shifted[:, None]) * scale
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


# ---------------------------------------------------------------------------------------------
# plain head


@pytest.mark.parametrize(
    ("B", "D", "C", "chunk"),
    [(1, 3, 5, 2), (8, 16, 100, 7), (13, 32, 257, 64), (4, 8, 50, 50), (6, 5, 31, 1000)],
)
def test_plain_matches_cross_entropy(B, D, C, chunk):
    x, weight, labels = make_inputs(B, D, C)

    loss = chunked_cross_entropy(x, weight, labels, chunk_size=chunk)
    dx, dw = grads_of(loss, x, weight)
    expected = F.cross_entropy(x @ weight.T, labels)
    ex_dx, ex_dw = grads_of(expected, x, weight)

    torch.testing.assert_close(loss, expected, **LOSS_TOL)
    torch.testing.assert_close(dx, ex_dx, **GRAD_TOL)
    torch.testing.assert_close(dw, ex_dw, **GRAD_TOL)


@pytest.mark.parametrize("smoothing", [0.1, 0.5, 1.0])
def test_label_smoothing_matches(smoothing):
    x, weight, labels = make_inputs(9, 12, 73)

    loss = chunked_cross_entropy(x, weight, labels, chunk_size=10, label_smoothing=smoothing)
    dx, dw = grads_of(loss, x, weight)
    expected = F.cross_entropy(x @ weight.T, labels, label_smoothing=smoothing)
    ex_dx, ex_dw = grads_of(expected, x, weight)

    torch.testing.assert_close(loss, expected, **LOSS_TOL)
    torch.testing.assert_close(dx, ex_dx, **GRAD_TOL)
    torch.testing.assert_close(dw, ex_dw, **GRAD_TOL)


def test_scale_matches():
    x, weight, labels = make_inputs(7, 10, 41)

    loss = chunked_cross_entropy(x, weight, labels, chunk_size=8, scale=3.5)
    dx, dw = grads_of(loss, x, weight)
    expected = F.cross_entropy(3.5 * (x @ weight.T), labels)
    ex_dx, ex_dw = grads_of(expected, x, weight)

    torch.testing.assert_close(loss, expected, **LOSS_TOL)
    torch.testing.assert_close(dx, ex_dx, **GRAD_TOL)
    torch.testing.assert_close(dw, ex_dw, **GRAD_TOL)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reduction_modes(reduction):
    x, weight, labels = make_inputs(10, 6, 29)
    # a random upstream gradient checks the per-row path of reduction="none"
    upstream = torch.rand(10) if reduction == "none" else torch.tensor(1.7)

    loss = chunked_cross_entropy(x, weight, labels, chunk_size=4, reduction=reduction, label_smoothing=0.2)
    dx, dw = torch.autograd.grad(loss, (x, weight), upstream)
    expected = F.cross_entropy(x @ weight.T, labels, reduction=reduction, label_smoothing=0.2)
    ex_dx, ex_dw = torch.autograd.grad(expected, (x, weight), upstream)

    assert loss.shape == expected.shape
    torch.testing.assert_close(loss, expected, **LOSS_TOL)
    torch.testing.assert_close(dx, ex_dx, **GRAD_TOL)
    torch.testing.assert_close(dw, ex_dw, **GRAD_TOL)


def test_chunk_size_invariance():
    x, weight, labels = make_inputs(11, 16, 97)
    results = []
    for chunk in (1, 5, 32, 97, 500):
        loss = chunked_cross_entropy(x, weight, labels, chunk_size=chunk, label_smoothing=0.1)
        results.append((loss, *grads_of(loss, x, weight)))

    first = results[0]
    for other in results[1:]:
        torch.testing.assert_close(other[0], first[0], **LOSS_TOL)
        torch.testing.assert_close(other[1], first[1], **GRAD_TOL)
        torch.testing.assert_close(other[2], first[2], **GRAD_TOL)


def test_large_logits_stay_finite():
    # logits in the thousands overflow exp() unless the log-sum-exp subtracts the maximum
    x, weight, labels = make_inputs(6, 8, 40, spread=300.0)

    loss = chunked_cross_entropy(x, weight, labels, chunk_size=6)
    dx, dw = grads_of(loss, x, weight)
    expected = F.cross_entropy(x @ weight.T, labels)
    ex_dx, ex_dw = grads_of(expected, x, weight)

    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected, **LOSS_TOL)
    assert_close_to_max(dx, ex_dx, LARGE_LOGIT_TOL)
    assert_close_to_max(dw, ex_dw, LARGE_LOGIT_TOL)


def test_frozen_weight_gives_dx_only():
    x, weight, labels = make_inputs(5, 6, 20)
    weight.requires_grad_(False)

    loss = chunked_cross_entropy(x, weight, labels, chunk_size=3)
    loss.backward()
    x_ref = x.detach().clone().requires_grad_()
    F.cross_entropy(x_ref @ weight.T, labels).backward()

    assert weight.grad is None
    torch.testing.assert_close(x.grad, x_ref.grad, **GRAD_TOL)


def test_frozen_embeddings_give_dw_only():
    x, weight, labels = make_inputs(5, 6, 20)
    x.requires_grad_(False)

    loss = chunked_cross_entropy(x, weight, labels, chunk_size=3)
    loss.backward()
    w_ref = weight.detach().clone().requires_grad_()
    F.cross_entropy(x @ w_ref.T, labels).backward()

    assert x.grad is None
    torch.testing.assert_close(weight.grad, w_ref.grad, **GRAD_TOL)


def test_gradcheck_float64():
    x, weight, labels = make_inputs(3, 4, 7, dtype=torch.float64)

    def loss_fn(x, weight):
        return chunked_cross_entropy(x, weight, labels, chunk_size=3, label_smoothing=0.3, reduction="none")

    assert torch.autograd.gradcheck(loss_fn, (x, weight))


def test_gradcheck_arcface_float64():
    x, weight, labels = make_inputs(3, 4, 7, dtype=torch.float64)

    def loss_fn(x, weight):
        return chunked_cross_entropy(
            x, weight, labels, chunk_size=2, normalize=True, scale=4.0, margin=0.3, margin_type="arcface"
        )

    assert torch.autograd.gradcheck(loss_fn, (x, weight))


# ---------------------------------------------------------------------------------------------
# cosine and margin heads


def test_cosine_head_matches():
    x, weight, labels = make_inputs(8, 12, 45)

    loss = chunked_cross_entropy(x, weight, labels, chunk_size=9, normalize=True, scale=30.0)
    dx, dw = grads_of(loss, x, weight)
    expected = F.cross_entropy(30.0 * F.normalize(x, dim=1) @ F.normalize(weight, dim=1).T, labels)
    ex_dx, ex_dw = grads_of(expected, x, weight)

    torch.testing.assert_close(loss, expected, **LOSS_TOL)
    torch.testing.assert_close(dx, ex_dx, **GRAD_TOL)
    torch.testing.assert_close(dw, ex_dw, **GRAD_TOL)


@pytest.mark.parametrize(("margin_type", "margin"), [("cosface", 0.35), ("arcface", 0.5)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_margin_head_matches(margin_type, margin, smoothing):
    x, weight, labels = make_inputs(16, 6, 37)
    # point half the rows away from their class row, so that ArcFace's θ + m > π branch is used
    with torch.no_grad():
        x[::2] = -weight[labels[::2]] + 0.05 * torch.randn(8, 6)
    options = {"scale": 30.0, "margin": margin, "margin_type": margin_type}

    loss = chunked_cross_entropy(
        x, weight, labels, chunk_size=5, normalize=True, label_smoothing=smoothing, **options
    )
    dx, dw = grads_of(loss, x, weight)
    expected = margin_reference(x, weight, labels, label_smoothing=smoothing, **options)
    ex_dx, ex_dw = grads_of(expected, x, weight)

    torch.testing.assert_close(loss, expected, **LOSS_TOL)
    torch.testing.assert_close(dx, ex_dx, **GRAD_TOL)
    torch.testing.assert_close(dw, ex_dw, **GRAD_TOL)


def test_arcface_uses_both_branches():
    # guards test_margin_head_matches: its inputs must reach both sides of θ + m = π
    x, weight, labels = make_inputs(16, 6, 37)
    with torch.no_grad():
        x[::2] = -weight[labels[::2]] + 0.05 * torch.randn(8, 6)
    cos = (F.normalize(x, dim=1) * F.normalize(weight[labels], dim=1)).sum(dim=1)
    past_pi = torch.acos(cos) + 0.5 > math.pi

    assert int(past_pi.sum()) > 0
    assert int((~past_pi).sum()) > 0


def test_margin_zero_equals_cosine_head():
    x, weight, labels = make_inputs(5, 7, 19)

    with_margin = chunked_cross_entropy(
        x, weight, labels, chunk_size=4, normalize=True, scale=16.0, margin=0.0, margin_type="arcface"
    )
    cosine = chunked_cross_entropy(x, weight, labels, chunk_size=4, normalize=True, scale=16.0)

    torch.testing.assert_close(with_margin, cosine, **LOSS_TOL)


# ---------------------------------------------------------------------------------------------
# low-precision inputs


@pytest.mark.parametrize(("amp_dtype", "tol"), [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_autocast_large_logits(amp_dtype, tol):
    B, D_in, D, C = 8, 12, 16, 300
    features = torch.randn(B, D_in)
    neck = torch.nn.Linear(D_in, D)
    weight = torch.randn(C, D, requires_grad=True)
    labels = torch.randint(0, C, (B,))

    with torch.autocast("cpu", dtype=amp_dtype):
        embeddings = neck(features) * 100.0  # (B, D) in amp_dtype, logits in the hundreds
        embeddings.retain_grad()
        loss = chunked_cross_entropy(embeddings, weight, labels, chunk_size=64)
    loss.backward()

    # fp32 reference on the same low-precision embedding values
    x_ref = embeddings.detach().float().requires_grad_()
    w_ref = weight.detach().clone().requires_grad_()
    expected = F.cross_entropy(x_ref @ w_ref.T, labels)
    expected.backward()

    assert embeddings.dtype == amp_dtype
    assert embeddings.grad.dtype == amp_dtype
    assert weight.grad.dtype == torch.float32
    assert torch.isfinite(loss)
    assert bool(torch.isfinite(embeddings.grad).all())
    assert bool(torch.isfinite(weight.grad).all())
    assert expected.item() > 10.0  # the logits really are large
    torch.testing.assert_close(loss, expected, **LOSS_TOL)
    assert_close_to_max(embeddings.grad, x_ref.grad, tol)
    assert_close_to_max(weight.grad, w_ref.grad, LARGE_LOGIT_TOL)


@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.float32])
def test_fp16_inputs_past_fp16_range(weight_dtype):
    B, D, C = 6, 8, 50
    x = (torch.randn(B, D) * 100.0).half().requires_grad_()
    weight = (torch.randn(C, D) * 100.0).to(weight_dtype).requires_grad_()
    labels = torch.randint(0, C, (B,))

    loss = chunked_cross_entropy(x, weight, labels, chunk_size=16)
    loss.backward()
    x_ref = x.detach().float().requires_grad_()
    w_ref = weight.detach().float().requires_grad_()
    logits_ref = x_ref @ w_ref.T  # (B, C)
    expected = F.cross_entropy(logits_ref, labels)
    expected.backward()

    # logits past fp16's maximum of 65504 would be inf if the matmul ran in fp16
    assert logits_ref.abs().max().item() > 65504.0
    assert torch.isfinite(loss)
    assert x.grad.dtype == torch.float16
    assert weight.grad.dtype == weight_dtype
    torch.testing.assert_close(loss, expected, **LOSS_TOL)
    assert_close_to_max(x.grad, x_ref.grad, 2e-3)
    assert_close_to_max(weight.grad, w_ref.grad, 2e-3)


# ---------------------------------------------------------------------------------------------
# memory


class _LargestOutput(TorchDispatchMode):
    """Record the largest number of elements of any tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.max_numel = max(self.max_numel, tensor.numel())
        return out


def test_no_full_logit_matrix():
    B, D, C, chunk = 64, 8, 1000, 100
    x, weight, labels = make_inputs(B, D, C)

    with _LargestOutput() as tracker:
        loss = chunked_cross_entropy(x, weight, labels, chunk_size=chunk, label_smoothing=0.1)
        loss.backward()

    # the weight gradient (C × D = 8000) is the largest tensor, not B × C = 64000
    assert tracker.max_numel == max(C * D, B * chunk)


# ---------------------------------------------------------------------------------------------
# top-k and log-sum-exp


@pytest.mark.parametrize(("C", "chunk", "k"), [(50, 7, 1), (50, 7, 5), (50, 7, 12), (50, 7, 50), (33, 100, 4)])
def test_topk_matches(C, chunk, k):
    x = torch.randn(9, 10)
    weight = torch.randn(C, 10)

    values, indices = chunked_topk(x, weight, k, chunk_size=chunk)
    expected_values, expected_indices = torch.topk(x @ weight.T, k, dim=1)

    torch.testing.assert_close(values, expected_values, **LOSS_TOL)
    assert torch.equal(indices, expected_indices)


def test_topk_normalized_matches():
    x = torch.randn(6, 10)
    weight = torch.randn(40, 10) * torch.rand(40, 1) * 5.0  # rows of different norms

    values, indices = chunked_topk(x, weight, 3, chunk_size=9, normalize=True)
    cos = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).T
    expected_values, expected_indices = torch.topk(cos, 3, dim=1)

    torch.testing.assert_close(values, expected_values, **LOSS_TOL)
    assert torch.equal(indices, expected_indices)


def test_logsumexp_matches():
    x = torch.randn(7, 10) * 20.0
    weight = torch.randn(61, 10)

    lse = chunked_logsumexp(x, weight, chunk_size=8, scale=2.0)
    expected = torch.logsumexp(2.0 * (x @ weight.T), dim=1)

    torch.testing.assert_close(lse, expected, **LOSS_TOL)


# ---------------------------------------------------------------------------------------------
# invalid input


@pytest.mark.parametrize("bad", [-1, 20, 1000])
def test_invalid_label_raises(bad):
    x, weight, labels = make_inputs(4, 3, 20)
    labels[2] = bad

    with pytest.raises(ValueError, match=rf"Invalid label {bad} at batch position 2"):
        chunked_cross_entropy(x, weight, labels)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"margin_type": "cosface", "margin": 0.2}, "needs normalize=True"),
        ({"margin": 0.2}, "needs margin_type"),
        ({"margin_type": "sphereface", "normalize": True}, "Invalid margin_type"),
        ({"margin_type": "arcface", "margin": 4.0, "normalize": True}, r"in \[0, π\)"),
        ({"reduction": "max"}, "Invalid reduction"),
        ({"label_smoothing": 1.5}, "label_smoothing"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"scale": 0.0}, "scale"),
    ],
)
def test_invalid_option_raises(options, message):
    x, weight, labels = make_inputs(4, 3, 20)

    with pytest.raises(ValueError, match=message):
        chunked_cross_entropy(x, weight, labels, **options)


def test_invalid_shapes_raise():
    x, weight, labels = make_inputs(4, 3, 20)

    with pytest.raises(ValueError, match="D=3 but weight rows have D=5"):
        chunked_cross_entropy(x, torch.randn(20, 5), labels)
    with pytest.raises(ValueError, match="labels must be int64"):
        chunked_cross_entropy(x, weight, labels.int())
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(4,\)"):
        chunked_cross_entropy(x, weight, labels[:3])
    with pytest.raises(ValueError, match=r"k must be in \[1, 20\]"):
        chunked_topk(x, weight, 21)
