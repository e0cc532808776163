"""The class matrix's own optimizer, for sampled classes and the fused head update.

`RowOptimizer` applies SGD (momentum, Nesterov, weight decay) or AdamW to chosen rows of a class
matrix (or of one rank's shard of it) and reads and writes only those rows and their state. It
serves two options of `toolkit train`:

- `--class-sample-rate r < 1`: each step uses some rows, and only those rows and their optimizer
  state change. Rows a step does not use keep their weights, momentum and Adam moments. A dense
  torch.optim step would move them by momentum and weight decay.
- `--fused-head-update`: the loss's backward pass hands each chunk's weight gradient to
  `update` at once, so no weight gradient of the whole class matrix is kept.

The update matches torch.optim.SGD (dampening 0, Nesterov when momentum > 0, as
`build_optimizer` sets it) and torch.optim.AdamW (betas 0.9 and 0.999, eps 1e-8) up to float32
rounding. A row's first update starts from zero momentum, which equals torch's first step. AdamW
counts steps per row, so a row's bias correction follows the number of updates it received.
"""

from __future__ import annotations

import torch
from torch import Tensor

from toolkit.config import ConfigError, TrainConfig
from toolkit.train.precision import Precision

ADAM_BETAS = (0.9, 0.999)  # torch.optim.AdamW defaults, which build_optimizer uses
ADAM_EPS = 1e-8


class RowOptimizer:
    """SGD or AdamW on chosen rows of a (C_r, D) class matrix shard; other rows are not touched.

    `lr` is the learning rate of the next update, which the training loop copies from the
    schedule. State tensors have the shard's rows, so a checkpoint can gather and re-split them
    by rows. SGD with momentum keeps "momentum_buffer" (C_r, D). AdamW keeps "exp_avg" and
    "exp_avg_sq" (C_r, D) and "step" (C_r,).
    """

    def __init__(self, weight: Tensor, config: TrainConfig) -> None:
        if config.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"invalid optimizer {config.optimizer!r}; expected 'sgd' or 'adamw'")
        self.weight = weight
        self.kind = config.optimizer
        self.lr = config.lr
        self.weight_decay = config.weight_decay
        self.momentum = config.momentum if config.optimizer == "sgd" else 0.0
        self.state: dict[str, Tensor] = {}
        rows = weight.shape[0]
        with torch.no_grad():
            if self.kind == "sgd" and self.momentum > 0:
                self.state["momentum_buffer"] = torch.zeros_like(weight)
            elif self.kind == "adamw":
                self.state["exp_avg"] = torch.zeros_like(weight)
                self.state["exp_avg_sq"] = torch.zeros_like(weight)
                self.state["step"] = torch.zeros(rows, dtype=torch.float32, device=weight.device)

    @torch.no_grad()
    def update(self, rows: slice | Tensor, grad: Tensor) -> None:
        """Apply one update to `rows` (a slice or int64 indices, no repeats) with their gradient (n, D)."""
        grad = grad.to(self.weight.dtype)
        if isinstance(rows, slice):
            # views: the update writes in place
            weight = self.weight[rows]
            state = {name: tensor[rows] for name, tensor in self.state.items()}
            self._apply(weight, state, grad)
            return

        # copies of the indexed rows, written back after the update
        weight = self.weight.index_select(0, rows)
        state = {name: tensor.index_select(0, rows) for name, tensor in self.state.items()}
        self._apply(weight, state, grad)
        self.weight.index_copy_(0, rows, weight)
        for name, tensor in state.items():
            self.state[name].index_copy_(0, rows, tensor)

    def step(self, blocks: list[tuple[Tensor, Tensor]]) -> None:
        """Apply the gradients of sampled steps: (rows, grad (n, D)) pairs, summed where rows repeat."""
        if not blocks:
            return
        if len(blocks) == 1:
            rows, grad = blocks[0]
            self.update(rows, grad)
            return

        # micro-batches of one step used overlapping rows: sum their gradients per row
        rows = torch.cat([rows for rows, _ in blocks])
        grads = torch.cat([grad for _, grad in blocks])  # (sum n, D)
        unique, inverse = torch.unique(rows, return_inverse=True)
        summed = grads.new_zeros((unique.shape[0], grads.shape[1]))  # (U, D)
        summed.index_add_(0, inverse, grads)
        self.update(unique, summed)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Copy state tensors of this shard's shape in, raising ValueError on a missing or misshapen one."""
        for name, tensor in self.state.items():
            if name not in state:
                raise ValueError(f"the head optimizer state has no {name!r}; it was saved with another optimizer")
            if tuple(state[name].shape) != tuple(tensor.shape):
                raise ValueError(
                    f"the head optimizer's {name!r} has shape {tuple(state[name].shape)}, expected {tuple(tensor.shape)}"
                )
            tensor.copy_(state[name])

    def _apply(self, weight: Tensor, state: dict[str, Tensor], grad: Tensor) -> None:
        if self.kind == "sgd":
            self._sgd(weight, state, grad)
        else:
            self._adamw(weight, state, grad)

    def _sgd(self, weight: Tensor, state: dict[str, Tensor], grad: Tensor) -> None:
        # the order of operations of torch.optim.SGD's single-tensor step
        step = grad.add(weight, alpha=self.weight_decay) if self.weight_decay else grad
        if self.momentum > 0:
            buffer = state["momentum_buffer"]
            buffer.mul_(self.momentum).add_(step)
            step = step.add(buffer, alpha=self.momentum)  # Nesterov
        weight.add_(step, alpha=-self.lr)

    def _adamw(self, weight: Tensor, state: dict[str, Tensor], grad: Tensor) -> None:
        # the order of operations of torch.optim.AdamW's single-tensor step, with per-row steps
        beta1, beta2 = ADAM_BETAS
        steps = state["step"].add_(1)  # (n,)
        weight.mul_(1 - self.lr * self.weight_decay)
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - torch.pow(beta1, steps.double())  # (n,)
        bias_correction2 = 1 - torch.pow(beta2, steps.double())  # (n,)
        step_size = (self.lr / bias_correction1).to(weight.dtype)[:, None]  # (n, 1)
        denominator = (state["exp_avg_sq"].sqrt() / bias_correction2.sqrt().to(weight.dtype)[:, None]).add_(ADAM_EPS)
        weight.addcdiv_(state["exp_avg"] * step_size, denominator, value=-1.0)


def uses_row_optimizer(config: TrainConfig) -> bool:
    """Return whether the class matrix is updated by a RowOptimizer instead of torch.optim."""
    return config.class_sample_rate < 1.0 or config.fused_head_update


def check_head_update(config: TrainConfig, precision: Precision) -> None:
    """Raise ConfigError for class sampling or fused head update settings that do not go together.

    The fused update applies the step during backward, so it needs plain SGD and one
    micro-batch per step. It cannot clip, because the gradient norm is known only after the
    update, and it rejects the fp16 GradScaler, whose gradients are still scaled and may contain
    inf. The RowOptimizer does not unscale fp16 gradients, so class sampling rejects the
    GradScaler too.
    """
    rate = config.class_sample_rate
    if not 0.0 < rate <= 1.0:
        raise ConfigError(f"invalid class_sample_rate {rate}; expected a fraction in (0, 1], such as 0.1 (1 samples no classes)")
    if precision.uses_scaler and uses_row_optimizer(config):
        option = "--fused-head-update" if config.fused_head_update else "--class-sample-rate < 1"
        raise ConfigError(
            f"{option} does not work with fp16 and its GradScaler; use --precision bf16 or fp32, or drop {option}"
        )
    if not config.fused_head_update:
        return
    if config.optimizer != "sgd":
        raise ConfigError(
            f"--fused-head-update applies SGD inside the loss's backward pass, but the optimizer is {config.optimizer!r}; "
            "use --optimizer sgd or drop --fused-head-update"
        )
    if config.grad_accum > 1:
        raise ConfigError(
            f"--fused-head-update updates the class matrix once per backward pass, so it needs --grad-accum 1, "
            f"got {config.grad_accum}; drop one of the two"
        )
    if config.clip_grad > 0:
        raise ConfigError(
            "--fused-head-update applies the class matrix's update before the gradient norm is known, so it "
            f"cannot clip gradients (--clip-grad {config.clip_grad}); use --clip-grad 0 or drop --fused-head-update"
        )


__all__ = ["RowOptimizer", "check_head_update", "uses_row_optimizer"]
