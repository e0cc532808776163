"""Training on several processes started by torchrun: data-parallel backbone, class-sharded head.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for each process.
`setup_distributed` reads them and joins the process group (NCCL on CUDA, gloo on the CPU).
Without them, or with WORLD_SIZE=1, training runs in one process.

Across W ranks:

- backbone and neck are replicated and wrapped in DistributedDataParallel. Each rank's loss is
  the mean over the global batch of W × batch_size images. Each rank's backward pass computes
  only its own images' share of the backbone gradient, so DDP sums the shares over ranks
  (`sum_gradients_hook`) instead of averaging them. The result equals one process's gradient on
  the global batch, except that BatchNorm normalises each rank's images with that rank's batch
  statistics (DDP keeps rank 0's running statistics);
- the class matrix and its optimizer state are split by class range (`class_range`), and the
  loss and top-k gather every rank's embeddings (`toolkit.model.sharded_head`);
- checkpoints gather the full class matrix and the head's optimizer state on rank 0, which
  alone writes files, and a checkpoint re-splits by rows at any world size on resume.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from toolkit.config import ConfigError, TrainConfig
from toolkit.data import Batch, normalize_batch
from toolkit.eval.inference import Scored, Totals
from toolkit.eval.metrics import EvalCounts, HitCounts
from toolkit.model import Classifier
from toolkit.model.sharded_head import ShardedClassHead, class_range
from toolkit.train.precision import Precision, resolve_device

logger = logging.getLogger(__name__)

ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


# ---------------------------------------------------------------------------------------------
# process group


@dataclass(frozen=True)
class DistContext:
    """This process's place in a run of several: rank, world size, device and process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    group: dist.ProcessGroup
    owns_group: bool  # whether setup_distributed created the process group, and so tears it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_ranks() -> int:
    """Return WORLD_SIZE from the environment torchrun sets, or 1 when it is not set."""
    return _environment_int("WORLD_SIZE") if "WORLD_SIZE" in os.environ else 1


def setup_distributed(device_name: str) -> DistContext | None:
    """Join the process group that torchrun describes in the environment; None for one process.

    device_name "auto" or "cuda" gives each process cuda:LOCAL_RANK when CUDA is available, and
    "cpu" runs every rank on the CPU with gloo. A process group that is already initialised is
    used as it is.
    """
    world_size = launched_ranks()
    if world_size <= 1:
        return None
    missing = [name for name in ENVIRONMENT if name not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE is {world_size} but {', '.join(missing)} is not set; start several processes with torchrun"
        )
    rank = _environment_int("RANK")
    local_rank = _environment_int("LOCAL_RANK")
    device = rank_device(device_name, local_rank)

    # NOTE: the test suite runs gloo on the CPU only, so the NCCL path is not covered by tests.
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives use the current device
    owns_group = not dist.is_initialized()
    if owns_group:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise ConfigError(
            f"the initialized process group has rank {dist.get_rank()} of {dist.get_world_size()}, but RANK and "
            f"WORLD_SIZE in the environment are {rank} and {world_size}; start the processes with torchrun"
        )
    logger.debug("rank %d of %d on %s (%s)", rank, world_size, device, dist.get_backend())
    return DistContext(rank, world_size, local_rank, device, dist.group.WORLD, owns_group)


def teardown_distributed(ctx: DistContext | None) -> None:
    """Destroy the process group if `setup_distributed` created it."""
    if ctx is not None and ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device_name: str, local_rank: int) -> torch.device:
    """Return the device of the process with LOCAL_RANK `local_rank`."""
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = resolve_device(device_name)
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"invalid device {device_name!r} under torchrun; use auto, cpu or cuda")
    if device.index is not None:
        raise ConfigError(
            f"under torchrun each process uses cuda:LOCAL_RANK, so --device {device_name} is ambiguous; "
            "pass --device cuda or auto, and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
            "start at most that many processes per node"
        )
    return torch.device("cuda", local_rank)


def _environment_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"invalid {name}={value!r} in the environment; torchrun sets it to an integer") from None


# ---------------------------------------------------------------------------------------------
# model


class Embedder(nn.Module):
    """Backbone and neck: the part of the classifier of which every rank keeps a whole copy."""

    def __init__(self, backbone: nn.Module, neck: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        images = images.contiguous(memory_format=torch.channels_last)
        return self.neck(self.backbone(images))  # (B, D)


class DistributedClassifier(nn.Module):
    """The classifier across ranks: DDP-wrapped backbone and neck, and this rank's head rows.

    Offers the methods of `Classifier` that training and validation use. In training every rank
    must call `forward` together with a batch of the same size. In eval mode the embedder runs
    outside DDP, so ranks may run different numbers of batches through `embed`, but `loss` and
    `topk` remain collective.
    """

    def __init__(self, classifier: Classifier, head: ShardedClassHead, ctx: DistContext) -> None:
        super().__init__()
        embedder = Embedder(classifier.backbone, classifier.neck)
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        self.embedder = DistributedDataParallel(embedder, device_ids=device_ids, process_group=ctx.group)
        self.embedder.register_comm_hook(ctx.group, sum_gradients_hook)
        self.head = head
        self.feature_dim = classifier.feature_dim
        self.embedding_dim = classifier.embedding_dim
        self.num_classes = classifier.num_classes

    def embed(self, images: Tensor) -> Tensor:
        """Return the (B, D) embeddings of (B, 3, H, W) images."""
        if self.training:
            return self.embedder(images)
        return self.embedder.module(images)

    def loss(self, embeddings: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
        return self.head.loss(embeddings, labels, reduction)

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        return self.loss(self.embed(images), labels)

    def topk(self, embeddings: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return self.head.topk(embeddings, k)

    def replicated_state_dict(self) -> dict[str, Tensor]:
        """Return the backbone and neck state under the keys a Classifier uses ("backbone.", "neck.")."""
        return self.embedder.module.state_dict()


def sum_gradients_hook(group, bucket):
    """Sum a DDP gradient bucket (dist.GradBucket) over the ranks of `group` instead of averaging it.

    Each rank's loss is already the mean over the global batch, so each rank's gradient is its
    images' share of the global gradient and the shares add up. Returns a Future of the summed
    bucket. The parameters carry no annotations because DDP compares them with dist.GradBucket,
    and this module's postponed annotations would be strings.
    """
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def build_model_shard(
    build: Callable[[], Classifier], config: TrainConfig, ctx: DistContext | None
) -> tuple[Classifier, ShardedClassHead | None]:
    """Build the model on the CPU and keep this rank's rows of its class matrix.

    Returns (model, sharded head). In one process without class sampling or the fused head
    update the model is returned as `build` made it, with no sharded head. Otherwise the model's
    head becomes a ShardedClassHead, holding every row in one process.

    `build` must give every rank the same model (the same seed), so the split matrix starts as
    one process's would. It creates the whole class matrix (C × D × 4 bytes), so the ranks on one
    node take turns. Only one whole matrix then exists on a node at a time, at the price of
    building LOCAL_WORLD_SIZE times in a row.
    """
    row_updates = config.class_sample_rate < 1.0 or config.fused_head_update
    if ctx is None and not row_updates:
        return build(), None
    if ctx is None:
        return _keep_rows(build(), config, None)

    turns = _environment_int("LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in os.environ else ctx.world_size
    shard = None
    for turn in range(turns):
        if turn == ctx.local_rank:
            shard = _keep_rows(build(), config, ctx)
        dist.barrier(group=ctx.group)
    return shard


def _keep_rows(model: Classifier, config: TrainConfig, ctx: DistContext | None) -> tuple[Classifier, ShardedClassHead]:
    rank, world_size = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    group = ctx.group if ctx is not None else None
    head = ShardedClassHead.from_head(
        model.head, rank=rank, world_size=world_size, group=group, sample_rate=config.class_sample_rate
    )
    model.head = head  # drops the whole matrix
    if config.class_sample_rate < 1.0 or config.fused_head_update:
        # a RowOptimizer updates the rows, so autograd computes no gradient of the shard
        head.weight.requires_grad_(False)
    return model, head


def wrap_model(
    model: Classifier, head: ShardedClassHead | None, ctx: DistContext | None, device: torch.device
) -> nn.Module:
    """Move the model to `device`; across ranks, wrap it in a DistributedClassifier."""
    model.to(device)
    if ctx is None:
        return model
    return DistributedClassifier(model, head, ctx)


def no_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    """Return DDP's no_sync() for a DistributedClassifier, which skips the gradient all-reduce of a micro-batch."""
    if isinstance(model, DistributedClassifier):
        return model.embedder.no_sync()
    return contextlib.nullcontext()


def broadcast_buffers(model: nn.Module, ctx: DistContext | None) -> None:
    """Copy rank 0's BatchNorm running statistics to every rank before validation.

    DDP broadcasts them at the start of each training forward pass, so after the last one each
    rank's statistics also count its own last batch.
    """
    if ctx is None or not isinstance(model, DistributedClassifier):
        return
    for buffer in model.embedder.module.buffers():
        dist.broadcast(buffer, src=0, group=ctx.group)


# ---------------------------------------------------------------------------------------------
# gradients


def clip_grad_norm(
    replicated: Iterable[Tensor], sharded: Iterable[Tensor], max_norm: float, ctx: DistContext | None
) -> Tensor:
    """Clip gradients to a total norm of `max_norm`, as torch.nn.utils.clip_grad_norm_ does.

    replicated: gradients equal on every rank (backbone and neck after DDP's all-reduce).
    sharded: this rank's gradients of its class rows. Their squared norms add over ranks.
    Returns the total norm before clipping.
    """
    replicated = list(replicated)
    sharded = list(sharded)
    first = (replicated + sharded)[0]
    squares = torch.zeros((), dtype=torch.float32, device=first.device)
    for grad in replicated:
        squares += grad.float().pow(2).sum()
    shard_squares = torch.zeros((), dtype=torch.float32, device=first.device)
    for grad in sharded:
        shard_squares += grad.float().pow(2).sum()
    if ctx is not None:
        dist.all_reduce(shard_squares, op=dist.ReduceOp.SUM, group=ctx.group)
    total = (squares + shard_squares).sqrt()
    factor = (max_norm / (total + 1e-6)).clamp(max=1.0)  # the same 1e-6 as torch
    for grad in replicated + sharded:
        grad.mul_(factor.to(grad.dtype))
    return total


def agree_on_overflow(shard_grads: list[Tensor], ctx: DistContext) -> None:
    """Make every rank's GradScaler see an inf when any rank's class rows have one.

    Backbone gradients are equal on every rank after DDP, but each rank checks its own class rows.
    Without this step one rank could skip an fp16 step that another takes. Call before
    GradScaler.unscale_ or step.
    """
    finite = torch.ones((), dtype=torch.int32, device=ctx.device)
    for grad in shard_grads:
        finite &= torch.isfinite(grad).all().to(torch.int32)
    agreed = finite.clone()
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=ctx.group)
    if bool(agreed) or not bool(finite) or not shard_grads:
        return
    # another rank found an inf: put one here too, so this rank's scaler also skips the step
    grad = shard_grads[0]
    grad[(0,) * grad.dim()] = float("inf")


def reduce_counts(values: list[int], ctx: DistContext | None) -> list[int]:
    """Return the sums over ranks of integer counters; the values themselves in one process."""
    if ctx is None:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64, device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=ctx.group)
    return [int(value) for value in tensor.tolist()]


# ---------------------------------------------------------------------------------------------
# validation


@torch.no_grad()
def evaluate_sharded(
    model: DistributedClassifier,
    loader: Iterable[Batch],
    device: torch.device,
    precision: Precision,
    ctx: DistContext,
    k: int = 5,
) -> dict[str, float | int]:
    """Return samples, top-1, top-5, mean loss and skipped samples over every rank's loader.

    Each rank's loader covers its own part of the split, so each sample counts once. The ranks
    step through their batches together because the head's loss and top-k are collective. A rank
    whose batches run out passes empty batches until every rank is done. The model must be in
    eval mode.
    """
    k = min(k, model.num_classes)
    totals = Totals()
    for batch in _batches_in_step(loader, ctx):
        images, labels = _device_batch(batch, device)
        with precision.autocast():
            embeddings = model.embed(images) if images is not None else _no_embeddings(model, device)
            losses = model.loss(embeddings, labels, reduction="none")  # (B,)
        _, indices = model.topk(embeddings.float(), k)  # (B, k)
        if batch is not None:
            totals.add(Scored(batch=batch, topk=indices.cpu(), loss_sum=float(losses.sum())))
    return reduce_totals(totals, ctx).as_dict()


def reduce_totals(totals: Totals, ctx: DistContext) -> Totals:
    """Return the sums of every rank's Totals."""
    counts = reduce_counts([totals.samples, totals.top1, totals.top5, totals.skipped], ctx)
    loss = torch.tensor([totals.loss_sum], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(loss, op=dist.ReduceOp.SUM, group=ctx.group)
    samples, top1, top5, skipped = counts
    return Totals(samples=samples, top1=top1, top5=top5, loss_sum=float(loss), skipped=skipped)


def reduce_eval_counts(counts: EvalCounts, ctx: DistContext) -> EvalCounts:
    """Return the sums of every rank's EvalCounts of `toolkit eval`: overall, per class, per shard, skipped."""
    totals = EvalCounts(num_classes=counts.num_classes)
    samples, top1, top5 = reduce_counts([counts.overall.samples, counts.overall.top1_hits, counts.overall.top5_hits], ctx)
    totals.overall = HitCounts(samples=samples, top1_hits=top1, top5_hits=top5)
    loss = torch.tensor([counts.loss_sum], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(loss, op=dist.ReduceOp.SUM, group=ctx.group)
    totals.loss_sum = float(loss)
    for name in ("class_samples", "class_top1", "class_top5"):
        tensor = getattr(counts, name).to(ctx.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=ctx.group)
        setattr(totals, name, tensor.cpu())

    # shard counts and skipped samples are Python objects, so they travel pickled
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, (counts.shards, counts.skipped), group=ctx.group)
    for shards, skipped in gathered:
        for name, hits in shards.items():
            total = totals.shards.setdefault(name, HitCounts())
            total.samples += hits.samples
            total.top1_hits += hits.top1_hits
            total.top5_hits += hits.top5_hits
        totals.skipped.extend(skipped)
    return totals


def _batches_in_step(loader: Iterable[Batch], ctx: DistContext) -> Iterator[Batch | None]:
    """Yield this rank's batches, then None while another rank still has batches."""
    batches = iter(loader)
    while True:
        batch = next(batches, None)
        more = torch.tensor([int(batch is not None)], dtype=torch.int32, device=ctx.device)
        dist.all_reduce(more, op=dist.ReduceOp.MAX, group=ctx.group)
        if not bool(more):
            return
        yield batch


def _device_batch(batch: Batch | None, device: torch.device) -> tuple[Tensor | None, Tensor]:
    if batch is None or len(batch) == 0:
        return None, torch.empty(0, dtype=torch.int64, device=device)
    images = normalize_batch(batch.images, device)
    return images, batch.labels.to(device, non_blocking=True)


def _no_embeddings(model: DistributedClassifier, device: torch.device) -> Tensor:
    return torch.zeros((0, model.embedding_dim), device=device)


# ---------------------------------------------------------------------------------------------
# checkpoints: full tensors on rank 0, rows re-split on load


def gather_rows_to_main(shard: Tensor, total_rows: int, ctx: DistContext | None) -> Tensor | None:
    """Assemble a tensor split by `class_range` rows into one CPU tensor on rank 0.

    Each rank sends its rows to rank 0 in turn, so rank 0's device receives one shard at a time.
    Returns the full (total_rows, ...) tensor on rank 0 and None on the other ranks; in one
    process, the shard itself on the CPU.
    """
    if ctx is None:
        return shard.detach().cpu()
    shard = shard.detach().contiguous()
    if not ctx.is_main:
        dist.send(shard, dst=0, group=ctx.group)
        return None

    full = torch.empty((total_rows, *shard.shape[1:]), dtype=shard.dtype)
    for rank in range(ctx.world_size):
        start, stop = class_range(total_rows, rank, ctx.world_size)
        if rank == 0:
            full[start:stop].copy_(shard)
            continue
        received = torch.empty((stop - start, *shard.shape[1:]), dtype=shard.dtype, device=shard.device)
        dist.recv(received, src=rank, group=ctx.group)
        full[start:stop].copy_(received)
    return full


def rows_of(full: Tensor, total_rows: int, ctx: DistContext | None) -> Tensor:
    """Return this rank's `class_range` rows of a full tensor; the tensor itself in one process."""
    if ctx is None:
        return full
    start, stop = class_range(total_rows, ctx.rank, ctx.world_size)
    return full[start:stop]


def gather_head_state(state: dict[str, Any], shard_rows: int, total_rows: int, ctx: DistContext | None) -> dict[str, Any]:
    """Gather an optimizer state of the class rows into full tensors on rank 0.

    Tensors whose first dimension is the shard's row count are split by rows. Any other value,
    such as AdamW's scalar step, is the same on every rank and kept as it is. Every rank must
    pass the same names in the same order. Other ranks get an empty dict.
    """
    full: dict[str, Any] = {}
    for name in sorted(state):
        value = state[name]
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == shard_rows:
            value = gather_rows_to_main(value, total_rows, ctx)
        elif isinstance(value, Tensor):
            value = value.detach().cpu()
        if ctx is None or ctx.is_main:
            full[name] = value
    return full


def split_head_state(full: dict[str, Any], total_rows: int, ctx: DistContext | None) -> dict[str, Any]:
    """Return copies of this rank's rows of a full head optimizer state written by `gather_head_state`."""
    split = {}
    for name, value in full.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == total_rows:
            value = rows_of(value, total_rows, ctx).clone()  # a copy, not a view of a memory-mapped file
        split[name] = value
    return split


def full_model_state(model: nn.Module, ctx: DistContext | None) -> dict[str, Tensor] | None:
    """Return the Classifier state dict with the full class matrix on rank 0; None on other ranks."""
    if not isinstance(model, DistributedClassifier):
        return model.state_dict()
    state = model.replicated_state_dict()
    weight = gather_rows_to_main(model.head.weight, model.num_classes, ctx)
    if not ctx.is_main:
        return None
    state["head.weight"] = weight
    return state


def load_model_state(model: nn.Module, state: dict[str, Tensor], ctx: DistContext | None) -> None:
    """Load a Classifier state dict, keeping this rank's rows of the class matrix."""
    if not isinstance(model, DistributedClassifier):
        model.load_state_dict(state)
        return
    state = dict(state)
    weight = state.pop("head.weight")
    model.embedder.module.load_state_dict(state)
    with torch.no_grad():
        model.head.weight.copy_(rows_of(weight, model.num_classes, ctx))


def optimizer_head_index(optimizer: torch.optim.Optimizer, weight: Tensor) -> int | None:
    """Return the index the optimizer's state dict gives the class matrix, or None when it does not hold it."""
    index = 0
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if parameter is weight:
                return index
            index += 1
    return None


def full_optimizer_states(
    optimizer: torch.optim.Optimizer,
    head_weight: Tensor,
    total_rows: int,
    row_optimizer: Any | None,
    ctx: DistContext | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (optimizer state without the class matrix, the class matrix's state with full rows).

    The class matrix's state comes from torch.optim when it holds the matrix and from the
    RowOptimizer otherwise. Its full tensors are on rank 0 only.
    """
    state = optimizer.state_dict()
    index = optimizer_head_index(optimizer, head_weight)
    if index is not None:
        head_state = state["state"].pop(index, {})
    else:
        head_state = row_optimizer.state_dict() if row_optimizer is not None else {}
    return state, gather_head_state(head_state, head_weight.shape[0], total_rows, ctx)


def load_optimizer_states(
    optimizer: torch.optim.Optimizer,
    head_weight: Tensor,
    total_rows: int,
    row_optimizer: Any | None,
    optimizer_state: dict[str, Any],
    head_state: dict[str, Any] | None,
    ctx: DistContext | None,
) -> None:
    """Load the states `full_optimizer_states` returned, re-split for this rank's rows.

    head_state None reads the class matrix's state from inside optimizer_state, where
    checkpoints kept it before it had an entry of its own.
    """
    index = optimizer_head_index(optimizer, head_weight)
    states = dict(optimizer_state["state"])
    if head_state is None:
        head_state = states.pop(index, {}) if index is not None else {}
    rows = split_head_state(head_state, total_rows, ctx)
    if index is not None and rows:
        states[index] = rows
    optimizer.load_state_dict({**optimizer_state, "state": states})
    if index is None and row_optimizer is not None and rows:
        row_optimizer.load_state_dict(rows)


__all__ = [
    "DistContext",
    "DistributedClassifier",
    "Embedder",
    "agree_on_overflow",
    "broadcast_buffers",
    "clip_grad_norm",
    "evaluate_sharded",
    "full_model_state",
    "full_optimizer_states",
    "gather_head_state",
    "gather_rows_to_main",
    "launched_ranks",
    "load_model_state",
    "load_optimizer_states",
    "no_sync",
    "optimizer_head_index",
    "reduce_counts",
    "reduce_eval_counts",
    "reduce_totals",
    "rank_device",
    "rows_of",
    "build_model_shard",
    "setup_distributed",
    "split_head_state",
    "sum_gradients_hook",
    "teardown_distributed",
    "wrap_model",
]
