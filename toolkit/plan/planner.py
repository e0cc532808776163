"""The memory plan of one training step: the size of each part, when the peak comes, and its total.

A step does not hold all of its parts at once. With `zero_grad(set_to_none=True)` the gradients
do not exist during the forward pass, and the backward pass frees each unit's saved activations
as it creates that unit's parameter gradients. The plan therefore walks the step through a
sequence of moments and reports the one with the most bytes live:

- the start of the backward pass through the loss (the tail): every saved activation, the class
  matrix gradient and the loss workspace;
- the backward pass through each residual block and the stem, last to first: the activations
  saved up to that unit, a checkpointed region's recomputed activations, the gradients flowing
  through the unit, and the parameter gradients created so far;
- the optimizer step: every gradient, plus the temporaries of the optimizers' updates.

Activation bytes come from `toolkit.plan.activations`, which measures them on the model.
Parameter, gradient and optimizer-state bytes come from the parameter shapes of the model built
on the meta device. Everything the optimizer keeps is fp32, because autocast keeps fp32 weights.

The class matrix is updated in one of the ways `toolkit train` implements:

- by torch.optim with the rest of the model, as a whole (one process) or as this rank's rows
  of a matrix split by class range (`world_size` > 1, with DistributedDataParallel);
- by `toolkit.train.head_optim.RowOptimizer`, with class sampling or the fused head update.
  With sampling, each step copies the rows it uses and gets a gradient for those only. With
  the fused update, each chunk's gradient is applied inside the loss's backward pass, so no
  gradient of the matrix exists.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, get_args

import torch

from toolkit.config import Checkpointing, HeadType, TrainConfig
from toolkit.model import ARCHS, build_model
from toolkit.plan.activations import TAIL, ActivationProfile, ProfileKey, activation_profile, unit_modules

MiB = 1024**2
FP32 = 4  # bytes per element of parameters, gradients, optimizer state and input images

# Framework overhead on top of the planned tensors, both parts estimates. On CUDA the fixed part
# covers the CUDA context with the cuBLAS and cuDNN handles, which live outside PyTorch's
# allocator. The fraction covers fragmentation: the caching allocator reserves more than the
# bytes of live tensors. On the CPU there is no context, and the fraction covers the C
# allocator's fragmentation.
# NOTE: benchmarks/gpu_check.py prints the memory outside the allocator and the reserved peak,
# the numbers to check these estimates against on a GPU.
OVERHEAD_FIXED_BYTES = {"cuda": 512 * MiB, "cpu": 0}
FRAGMENTATION = 0.10

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw", "adam")
DEVICE_TYPES = tuple(OVERHEAD_FIXED_BYTES)

# part names, in table order
BACKBONE_PARAMETERS = "backbone parameters"
BACKBONE_GRADIENTS = "backbone gradients"
BACKBONE_STATE = "backbone optimizer state"
CLASS_MATRIX = "class matrix"
CLASS_GRADIENT = "class matrix gradient"
CLASS_STATE = "class matrix optimizer state"
SAMPLED_ROWS = "sampled class rows"
INPUT_BATCH = "input batch"
SAVED_ACTIVATIONS = "saved activations"
RECOMPUTED_ACTIVATIONS = "recomputed activations"
ACTIVATION_GRADIENTS = "activation gradients"
LOSS_WORKSPACE = "loss workspace"
STEP_TEMPORARIES = "optimizer step temporaries"
PART_NAMES = (
    BACKBONE_PARAMETERS,
    BACKBONE_GRADIENTS,
    BACKBONE_STATE,
    CLASS_MATRIX,
    CLASS_GRADIENT,
    CLASS_STATE,
    SAMPLED_ROWS,
    INPUT_BATCH,
    SAVED_ACTIVATIONS,
    RECOMPUTED_ACTIVATIONS,
    ACTIVATION_GRADIENTS,
    LOSS_WORKSPACE,
    STEP_TEMPORARIES,
)
OPTIMIZER_STEP = "optimizer step"


class PlanError(ValueError):
    """Plan inputs that are invalid or do not go together; the message names the value and the fix."""


@dataclass(frozen=True)
class PlanInputs:
    """One training configuration on one kind of device, as far as memory is concerned.

    The plan is per GPU: with `world_size` ranks each one keeps the backbone and a 1/world_size
    range of the class matrix and its optimizer state. `device_type` selects torch.optim's
    implementation (foreach on CUDA, a loop over parameters on the CPU) and the overhead.
    `class_sample_rate` and `fused_head_update` are those of TrainConfig.
    """

    arch: str = "resnet50"
    num_classes: int = 1000
    embedding_dim: int = 512  # 0: no neck, the class matrix is C × F
    head: str = "linear"
    batch_size: int = 64
    image_size: int = 224
    precision: str = "bf16"
    checkpointing: str = "none"
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-5
    class_chunk: int = 8192
    grad_accum: int = 1
    world_size: int = 1
    class_sample_rate: float = 1.0
    fused_head_update: bool = False
    naive: bool = False  # full C × F linear layer with bias and F.cross_entropy on B × C logits
    device_type: str = "cuda"

    def __post_init__(self) -> None:
        _check_inputs(self)

    @property
    def autocast(self) -> bool:
        return self.precision != "fp32"

    @property
    def row_optimizer(self) -> bool:
        """Whether a RowOptimizer, not torch.optim, updates the class matrix (as in toolkit.train)."""
        return self.class_sample_rate < 1.0 or self.fused_head_update


@dataclass(frozen=True)
class Part:
    """One row of the plan: the part's full size and how much of it is live at the peak."""

    name: str
    bytes: int
    at_peak: int
    note: str = ""


@dataclass(frozen=True)
class Plan:
    """Memory of one training step per GPU; `peak_bytes` compares with torch.cuda.max_memory_allocated."""

    inputs: PlanInputs
    parts: tuple[Part, ...]
    peak_bytes: int  # tensor bytes live at the peak moment
    peak_moment: str  # "optimizer step", "backward through the loss" or "backward through layer1.0"
    overhead_bytes: int
    activation_bytes_per_sample: float  # saved for backward, measured
    notes: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        """Planned device memory: the peak plus the framework overhead."""
        return self.peak_bytes + self.overhead_bytes

    def part(self, name: str) -> Part:
        for part in self.parts:
            if part.name == name:
                return part
        raise KeyError(f"no part named {name!r}; parts are {', '.join(PART_NAMES)}")


# ---------------------------------------------------------------------------------------------
# inputs


def inputs_from_config(
    config: TrainConfig,
    num_classes: int,
    *,
    precision: str,
    device_type: str = "cuda",
    world_size: int = 1,
) -> PlanInputs:
    """Return the plan inputs of a training configuration; `precision` must already be resolved (not auto)."""
    return PlanInputs(
        arch=config.arch,
        num_classes=num_classes,
        embedding_dim=config.embedding_dim,
        head=config.head,
        batch_size=config.batch_size,
        image_size=config.image_size,
        precision=precision,
        checkpointing=config.checkpointing,
        optimizer=config.optimizer,
        momentum=config.momentum if config.optimizer == "sgd" else 0.0,
        weight_decay=config.weight_decay,
        class_chunk=config.class_chunk,
        grad_accum=config.grad_accum,
        world_size=world_size,
        class_sample_rate=config.class_sample_rate,
        fused_head_update=config.fused_head_update,
        device_type=device_type,
    )


def naive_inputs(inputs: PlanInputs) -> PlanInputs:
    """Return the plain run of the same backbone, classes, batch and image size.

    A plain run has the backbone's full F → C linear layer with a bias, `F.cross_entropy` on the
    whole B × C logit matrix, `torch.optim.Adam` with its defaults in fp32, no activation
    checkpointing and one GPU.
    """
    return dataclasses.replace(
        inputs,
        embedding_dim=0,
        head="linear",
        precision="fp32",
        checkpointing="none",
        optimizer="adam",
        momentum=0.0,
        weight_decay=0.0,
        grad_accum=1,
        world_size=1,
        class_sample_rate=1.0,
        fused_head_update=False,
        naive=True,
    )


def _check_inputs(inputs: PlanInputs) -> None:
    choices = {
        "arch": (inputs.arch, ARCHS),
        "head": (inputs.head, get_args(HeadType)),
        "precision": (inputs.precision, PRECISIONS),
        "checkpointing": (inputs.checkpointing, get_args(Checkpointing)),
        "optimizer": (inputs.optimizer, OPTIMIZERS),
        "device type": (inputs.device_type, DEVICE_TYPES),
    }
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise PlanError(f"invalid {name} {value!r}; expected one of {', '.join(allowed)}")
    minimums = {
        "number of classes": (inputs.num_classes, 1),
        "batch size": (inputs.batch_size, 1),
        "image size": (inputs.image_size, 16),
        "embedding size": (inputs.embedding_dim, 0),
        "class chunk": (inputs.class_chunk, 1),
        "grad_accum": (inputs.grad_accum, 1),
        "world size": (inputs.world_size, 1),
    }
    for name, (value, minimum) in minimums.items():
        if value < minimum:
            raise PlanError(f"invalid {name} {value}; expected at least {minimum}")
    if not 0.0 < inputs.class_sample_rate <= 1.0:
        raise PlanError(
            f"invalid class sample rate {inputs.class_sample_rate}; expected a fraction in (0, 1], such as 0.1"
        )
    # the combinations toolkit train rejects (toolkit.train.head_optim.check_head_update)
    if inputs.fused_head_update and inputs.optimizer != "sgd":
        raise PlanError(
            "the fused head update applies SGD to the class matrix inside the loss's backward pass; "
            f"it needs --optimizer sgd, got {inputs.optimizer}"
        )
    if inputs.fused_head_update and inputs.grad_accum > 1:
        raise PlanError(f"the fused head update needs --grad-accum 1, got {inputs.grad_accum}")
    if inputs.row_optimizer and inputs.precision == "fp16":
        raise PlanError(
            "class sampling and the fused head update do not work with fp16 and its GradScaler; "
            "plan --precision bf16 or fp32"
        )


# ---------------------------------------------------------------------------------------------
# model shape


@dataclass(frozen=True)
class ModelShape:
    """Parameter sizes of a backbone and neck, per unit, from a model built on the meta device."""

    feature_dim: int
    unit_parameter_bytes: dict[str, int]
    unit_weight_elements: dict[str, int]  # conv and linear weights, which autocast copies
    tensors: tuple[tuple[int, bool], ...]  # (bytes, weight decay applies) per parameter
    buffer_bytes: int
    backbone_parameters: int
    neck_parameters: int


@functools.cache
def model_shape(arch: str, embedding_dim: int) -> ModelShape:
    """Return the parameter sizes of `arch` with an `embedding_dim` neck; nothing is allocated."""
    config = TrainConfig(arch=arch, embedding_dim=embedding_dim)
    with torch.device("meta"):
        model = build_model(config, 1)

    unit_parameter_bytes = {}
    unit_weight_elements = {}
    for name, modules in unit_modules(model).items():
        parameters = [parameter for module in modules for parameter in module.parameters()]
        unit_parameter_bytes[name] = sum(parameter.numel() * FP32 for parameter in parameters)
        unit_weight_elements[name] = sum(parameter.numel() for parameter in parameters if parameter.ndim > 1)

    # build_optimizer exempts one-dimensional parameters (norm layers, biases) from weight decay
    trunk = [*model.backbone.parameters(), *model.neck.parameters()]
    return ModelShape(
        feature_dim=model.feature_dim,
        unit_parameter_bytes=unit_parameter_bytes,
        unit_weight_elements=unit_weight_elements,
        tensors=tuple((parameter.numel() * FP32, parameter.ndim > 1) for parameter in trunk),
        buffer_bytes=sum(buffer.numel() * buffer.element_size() for buffer in model.buffers()),
        backbone_parameters=sum(parameter.numel() for parameter in model.backbone.parameters()),
        neck_parameters=sum(parameter.numel() for parameter in model.neck.parameters()),
    )


# ---------------------------------------------------------------------------------------------
# class matrix


@dataclass(frozen=True)
class ClassMatrix:
    """The class matrix as one rank stores it."""

    rows: int  # classes on this rank
    sampled_rows: int  # rows of this rank that one step uses: all, or at most this many when sampling
    width: int  # D, or F without a neck
    bias: bool
    loss_rows: int  # embeddings the loss scores: the global batch of every rank
    chunk: int  # class rows of one chunk of the loss

    @property
    def parameter_bytes(self) -> int:
        return self.rows * (self.width + self.bias) * FP32

    @property
    def sampled_bytes(self) -> int:
        return self.sampled_rows * self.width * FP32


def class_matrix(inputs: PlanInputs, shape: ModelShape) -> ClassMatrix:
    # class_range gives the first C mod W ranks one row more, so the largest shard has ceil(C / W)
    rows = math.ceil(inputs.num_classes / inputs.world_size)
    loss_rows = inputs.batch_size * inputs.world_size
    sampled = rows
    if inputs.class_sample_rate < 1.0:
        # sample_class_rows keeps every class of the global batch, then fills up to ceil(r × C_r)
        sampled = min(rows, max(math.ceil(inputs.class_sample_rate * rows), loss_rows))
    return ClassMatrix(
        rows=rows,
        sampled_rows=sampled,
        width=inputs.embedding_dim or shape.feature_dim,
        bias=inputs.naive,
        loss_rows=loss_rows,
        chunk=min(inputs.class_chunk, sampled),
    )


# ---------------------------------------------------------------------------------------------
# the plan


def plan_memory(inputs: PlanInputs) -> Plan:
    """Plan the memory of one training step of `inputs` on one GPU (or the CPU)."""
    shape = model_shape(inputs.arch, inputs.embedding_dim)
    profile = activation_profile(
        ProfileKey(
            arch=inputs.arch,
            image_size=inputs.image_size,
            checkpointing=inputs.checkpointing,
            autocast=inputs.autocast,
            embedding_dim=inputs.embedding_dim,
            head=inputs.head,
        )
    )
    matrix = class_matrix(inputs, shape)
    sizes = part_sizes(inputs, shape, profile, matrix)

    # the moments of the step, and the one with the most bytes live
    moments = backward_moments(inputs, shape, profile, sizes)
    moments[OPTIMIZER_STEP] = step_moment(inputs, sizes)
    peak_moment = max(moments, key=lambda name: sum(moments[name].values()))
    live = moments[peak_moment]
    peak_bytes = sum(live.values())

    notes = part_notes(inputs, shape, profile, matrix, sizes)
    parts = tuple(Part(name, sizes[name], live.get(name, 0), notes.get(name, "")) for name in PART_NAMES)
    overhead = OVERHEAD_FIXED_BYTES[inputs.device_type] + round(FRAGMENTATION * peak_bytes)
    return Plan(
        inputs=inputs,
        parts=parts,
        peak_bytes=peak_bytes,
        peak_moment=_moment_label(peak_moment),
        overhead_bytes=overhead,
        activation_bytes_per_sample=profile.per_sample_bytes(),
        notes=plan_notes(inputs),
    )


def part_sizes(inputs: PlanInputs, shape: ModelShape, profile: ActivationProfile, matrix: ClassMatrix) -> dict[str, int]:
    """Return the full size of every part, as if it were all live at once."""
    B = inputs.batch_size
    trunk_bytes = sum(shape.unit_parameter_bytes.values())
    copies = weight_copy_bytes(inputs, shape)

    return {
        BACKBONE_PARAMETERS: trunk_bytes + shape.buffer_bytes,
        # DistributedDataParallel keeps its own bucket copy of the gradients across ranks
        BACKBONE_GRADIENTS: trunk_bytes * (2 if inputs.world_size > 1 else 1),
        BACKBONE_STATE: optimizer_state_copies(inputs) * trunk_bytes,
        CLASS_MATRIX: matrix.parameter_bytes,
        CLASS_GRADIENT: class_gradient_bytes(inputs, matrix),
        CLASS_STATE: class_state_bytes(inputs, matrix),
        SAMPLED_ROWS: sampled_copy_bytes(inputs, matrix),
        INPUT_BATCH: B * 3 * inputs.image_size**2 * FP32,
        SAVED_ACTIVATIONS: profile.saved_bytes(B) + naive_saved_bytes(inputs, matrix) + sum(copies.values()),
        RECOMPUTED_ACTIVATIONS: max(
            (sum(_region_bytes(profile, copies, unit.region, B, len(profile.units))) for unit in profile.units if unit.region),
            default=0,
        ),
        ACTIVATION_GRADIENTS: max(2 * unit.largest.at(B) for unit in profile.units if unit.name != TAIL),
        LOSS_WORKSPACE: loss_workspace_bytes(inputs, matrix),
        STEP_TEMPORARIES: optimizer_temporary_bytes(inputs, shape, matrix),
    }


def backward_moments(
    inputs: PlanInputs, shape: ModelShape, profile: ActivationProfile, sizes: dict[str, int]
) -> dict[str, dict[str, int]]:
    """Return the bytes of each part live during the backward pass through each unit, tail first."""
    B = inputs.batch_size
    units = profile.units
    copies = weight_copy_bytes(inputs, shape)
    static = {name: sizes[name] for name in (BACKBONE_PARAMETERS, BACKBONE_STATE, CLASS_MATRIX, CLASS_STATE)}
    trunk_bytes = sum(shape.unit_parameter_bytes.values())
    buckets = sizes[BACKBONE_GRADIENTS] - trunk_bytes  # DDP's bucket copy, allocated once
    # in fp32 conv1 saves the batch itself, so it is already among the saved activations
    input_bytes = sizes[INPUT_BATCH] if inputs.autocast else 0
    accumulating = inputs.grad_accum > 1  # gradients of earlier micro-batches are live throughout

    moments = {}
    for index in range(len(units) - 1, -1, -1):
        unit = units[index]
        done = units[index:]  # units whose backward has started: their gradients exist
        gradients = trunk_bytes if accumulating else sum(shape.unit_parameter_bytes[u.name] for u in done)
        saved = sum(u.saved.at(B) + (0 if u.region else copies[u.name]) for u in units[: index + 1])
        live = dict(static)
        live[BACKBONE_GRADIENTS] = buckets + gradients
        live[CLASS_GRADIENT] = sizes[CLASS_GRADIENT]
        live[SAMPLED_ROWS] = sizes[SAMPLED_ROWS]
        live[INPUT_BATCH] = input_bytes
        if unit.name == TAIL:
            live[SAVED_ACTIVATIONS] = saved + naive_saved_bytes(inputs, class_matrix(inputs, shape))
            live[LOSS_WORKSPACE] = sizes[LOSS_WORKSPACE]
        else:
            live[SAVED_ACTIVATIONS] = saved
            live[RECOMPUTED_ACTIVATIONS] = sum(_region_bytes(profile, copies, unit.region, B, index + 1)) if unit.region else 0
            live[ACTIVATION_GRADIENTS] = 2 * unit.largest.at(B)
        moments[unit.name] = live
    return moments


def step_moment(inputs: PlanInputs, sizes: dict[str, int]) -> dict[str, int]:
    """Return the bytes live during the optimizer step: every gradient and the update's temporaries."""
    names = (
        BACKBONE_PARAMETERS,
        BACKBONE_GRADIENTS,
        BACKBONE_STATE,
        CLASS_MATRIX,
        CLASS_GRADIENT,
        CLASS_STATE,
        INPUT_BATCH,
        STEP_TEMPORARIES,
    )
    return {name: sizes[name] for name in names}


def _region_bytes(profile: ActivationProfile, copies: dict[str, int], region: str | None, B: int, end: int):
    """Yield the bytes a checkpointed region keeps during its recomputation, from its units before `end`."""
    for unit in profile.units[:end]:
        if unit.region == region:
            yield unit.recomputed.at(B) + copies[unit.name]


def _moment_label(name: str) -> str:
    if name == OPTIMIZER_STEP:
        return OPTIMIZER_STEP
    if name == TAIL:
        return "backward through the loss"
    return f"backward through {name}"


# ---------------------------------------------------------------------------------------------
# part sizes


def optimizer_state_copies(inputs: PlanInputs) -> int:
    """Return how many fp32 copies of the parameters the optimizer keeps."""
    if inputs.optimizer == "sgd":
        return 1 if inputs.momentum > 0 else 0  # the momentum buffer
    return 2  # Adam's first and second moments


def class_state_bytes(inputs: PlanInputs, matrix: ClassMatrix) -> int:
    """Return the class matrix's optimizer state; a RowOptimizer with AdamW also counts steps per row."""
    state = optimizer_state_copies(inputs) * matrix.parameter_bytes
    if inputs.row_optimizer and inputs.optimizer == "adamw":
        state += matrix.rows * FP32
    return state


def weight_copy_bytes(inputs: PlanInputs, shape: ModelShape) -> dict[str, int]:
    """Return, per unit, the 16-bit copies of conv and linear weights that autocast makes.

    The copies live as long as the convolutions that saved them. The loss casts the class
    matrix to fp32, which is its own dtype, so it makes no copy.
    """
    bytes_per_element = 2 if inputs.autocast else 0
    return {name: elements * bytes_per_element for name, elements in shape.unit_weight_elements.items()}


def class_gradient_bytes(inputs: PlanInputs, matrix: ClassMatrix) -> int:
    """Return the class matrix gradient live at the optimizer step.

    None with the fused update. With sampling, the gradient of each micro-batch's sampled rows,
    kept until the step. Otherwise the whole (shard of the) matrix.
    """
    if inputs.fused_head_update:
        return 0
    if inputs.class_sample_rate < 1.0:
        return inputs.grad_accum * matrix.sampled_bytes
    return matrix.parameter_bytes


def sampled_copy_bytes(inputs: PlanInputs, matrix: ClassMatrix) -> int:
    """Return the copies of the sampled rows that the loss uses, one per micro-batch until the step."""
    if inputs.class_sample_rate < 1.0:
        return inputs.grad_accum * matrix.sampled_bytes
    return 0


def naive_saved_bytes(inputs: PlanInputs, matrix: ClassMatrix) -> int:
    """Return the B × C log-probabilities that F.cross_entropy's log_softmax saves in a plain run."""
    return inputs.batch_size * matrix.rows * FP32 if inputs.naive else 0


def loss_workspace_bytes(inputs: PlanInputs, matrix: ClassMatrix) -> int:
    """Return the loss's temporaries at the start of its backward pass, beyond what the profile measured.

    The chunked cross-entropy holds two (rows, chunk) fp32 logit blocks (one chunk's and the
    previous one's until it is reassigned) and a (rows, D) input gradient, where rows is the
    global batch of every rank. A cosine head also holds the normalised rows of a chunk and the
    temporaries of their backward, about four (chunk, D) blocks. The fused update handles one
    chunk per call, so one logit block, and adds the chunk's input gradient, its weight gradient
    and SGD's two temporaries. Across ranks the loss saves the gathered embeddings (the profile
    counted this rank's only) and the gather's backward clones their gradient. A plain run holds
    the gradients of the B × C log-probabilities and logits.
    """
    B, D = inputs.batch_size, matrix.width
    if inputs.naive:
        return 2 * B * matrix.rows * FP32 + B * D * FP32

    rows, chunk = matrix.loss_rows, matrix.chunk
    if inputs.fused_head_update:
        workspace = rows * chunk * FP32 + 2 * rows * D * FP32 + 3 * chunk * D * FP32
    else:
        workspace = 2 * rows * chunk * FP32 + rows * D * FP32
    if inputs.head != "linear":
        workspace += 4 * chunk * D * FP32
    if inputs.world_size > 1:
        workspace += (rows - B) * D * FP32 + rows * D * FP32
    if inputs.grad_accum > 1 and not inputs.row_optimizer:
        workspace += matrix.parameter_bytes  # the new gradient before it is added to .grad
    return workspace


def optimizer_temporary_bytes(inputs: PlanInputs, shape: ModelShape, matrix: ClassMatrix) -> int:
    """Return the largest set of temporaries that the optimizer step allocates at once.

    torch.optim (2.x) updates with foreach kernels on CUDA and with a loop over parameters on the
    CPU. Per parameter group, foreach SGD copies the group's gradients when weight decay is set
    (the Nesterov term is then added in place), and foreach Adam(W) allocates the square roots
    of the second moments of the whole group. The loop allocates per parameter: SGD one tensor
    for weight decay and one for the Nesterov term, Adam(W) the square root and its quotient.
    Adam(W)'s quotient stays referenced until the next parameter's replaces it, so the loop's
    peak is one parameter's quotient beside the next one's two tensors. A RowOptimizer runs
    after torch.optim; see `row_temporary_bytes`.
    """
    tensors = list(shape.tensors)
    if not inputs.row_optimizer:
        tensors.append((matrix.rows * matrix.width * FP32, True))
        if matrix.bias:
            tensors.append((matrix.rows * FP32, False))
    if inputs.naive:
        # a plain run passes model.parameters() as one group without weight decay
        groups = [(tensors, 0.0)]
    else:
        groups = [
            ([t for t in tensors if t[1]], inputs.weight_decay),
            ([t for t in tensors if not t[1]], 0.0),
        ]

    if inputs.device_type == "cuda":
        if inputs.optimizer == "sgd":
            torch_optim = max((sum(size for size, _ in group) for group, decay in groups if decay != 0), default=0)
        else:
            torch_optim = max(sum(size for size, _ in group) for group, _ in groups)
    elif inputs.optimizer == "sgd":
        nesterov = inputs.momentum > 0
        torch_optim = max(
            (size * ((decay != 0) + nesterov) for group, decay in groups for size, _ in group),
            default=0,
        )
    else:
        torch_optim = max(
            (previous + 2 * size for group, _ in groups for (previous, _), (size, _) in zip([(0, False), *group], group)),
            default=0,
        )
    return max(torch_optim, row_temporary_bytes(inputs, matrix))


def row_temporary_bytes(inputs: PlanInputs, matrix: ClassMatrix) -> int:
    """Return the temporaries of a RowOptimizer step on the sampled rows; 0 without sampling.

    The fused update runs inside the backward pass (see `loss_workspace_bytes`). A sampled step
    copies the rows and their state out with index_select. Then SGD allocates up to two
    (rows, D) tensors, for weight decay and for the Nesterov term. AdamW allocates three, the
    scaled first moment, the square root and its quotient, two of them at a time. Micro-batches
    of one step are concatenated first.
    """
    if inputs.class_sample_rate == 1.0 or inputs.fused_head_update:
        return 0
    rows = matrix.sampled_bytes
    if inputs.optimizer == "sgd":
        copies = 1 + (inputs.momentum > 0)
        temporaries = (inputs.weight_decay != 0) + (inputs.momentum > 0)
    else:
        copies, temporaries = 3, 2
    concatenated = inputs.grad_accum * rows if inputs.grad_accum > 1 else 0
    return (copies + temporaries) * rows + concatenated


# ---------------------------------------------------------------------------------------------
# notes


def part_notes(
    inputs: PlanInputs, shape: ModelShape, profile: ActivationProfile, matrix: ClassMatrix, sizes: dict[str, int]
) -> dict[str, str]:
    """Return a short explanation per part, with the numbers behind it."""
    B = inputs.batch_size
    neck = f" and neck {shape.feature_dim}→{inputs.embedding_dim}" if inputs.embedding_dim else ""
    optimizer = {"sgd": "SGD momentum", "adamw": "AdamW moments", "adam": "Adam moments"}[inputs.optimizer]
    if inputs.optimizer == "sgd" and inputs.momentum == 0:
        optimizer = "SGD without momentum keeps no state"
    rows = f"{matrix.rows:,} × {matrix.width}"
    if inputs.world_size > 1:
        rows = f"{matrix.rows:,} of {inputs.num_classes:,} classes × {matrix.width} on each of {inputs.world_size} GPUs"
    if matrix.bias:
        rows += " with bias"

    gradients = "fp32, created during the backward pass"
    if inputs.world_size > 1:
        gradients += ", and DistributedDataParallel's bucket copy"
    class_gradient = f"{rows}, fp32"
    if inputs.fused_head_update:
        class_gradient = "none: the fused update applies each chunk's gradient inside the backward pass"
    elif inputs.class_sample_rate < 1.0:
        class_gradient = f"rows of the at most {matrix.sampled_rows:,} sampled classes"

    state = optimizer
    if inputs.row_optimizer:
        state += ", kept by the row optimizer"
    if inputs.class_sample_rate < 1.0:
        state += f"; a step updates at most {matrix.sampled_rows:,} rows, but all stay resident"

    recompute = "no checkpointing"
    if inputs.checkpointing != "none":
        recompute = f"a checkpointed {inputs.checkpointing} recomputed in the backward pass"
    dtype = "16-bit autocast" if inputs.autocast else "fp32"
    saved = f"{profile.per_sample_bytes() / MiB:.2f} MiB per image measured ({dtype}, checkpointing {inputs.checkpointing})"
    if inputs.naive:
        saved += f", plus the {B} × {matrix.rows:,} log-probabilities"

    if inputs.naive:
        loss = f"gradients of the {B} × {matrix.rows:,} log-probabilities and logits"
    else:
        loss = f"chunked cross-entropy, {matrix.loss_rows} × {matrix.chunk:,} logits per chunk"
        if inputs.fused_head_update:
            loss += ", with the fused update of each chunk"
    implementation = "foreach kernels" if inputs.device_type == "cuda" else "a loop over parameters"
    step = f"torch.optim with {implementation}"
    if inputs.row_optimizer and not inputs.fused_head_update:
        step += ", then the row optimizer on the sampled rows"

    return {
        BACKBONE_PARAMETERS: f"{inputs.arch} {shape.backbone_parameters / 1e6:.1f}M{neck}, fp32, with BatchNorm buffers",
        BACKBONE_GRADIENTS: gradients,
        BACKBONE_STATE: optimizer,
        CLASS_MATRIX: f"{rows}, fp32",
        CLASS_GRADIENT: class_gradient,
        CLASS_STATE: state,
        SAMPLED_ROWS: "the loss's copy of the sampled rows" if inputs.class_sample_rate < 1.0 else "no class sampling",
        INPUT_BATCH: f"{B} × 3 × {inputs.image_size} × {inputs.image_size} fp32",
        SAVED_ACTIVATIONS: saved,
        RECOMPUTED_ACTIVATIONS: recompute,
        ACTIVATION_GRADIENTS: "gradients flowing through one unit, twice its largest saved tensor",
        LOSS_WORKSPACE: loss,
        STEP_TEMPORARIES: step,
    }


def plan_notes(inputs: PlanInputs) -> tuple[str, ...]:
    notes = []
    if inputs.naive:
        notes.append(
            "a plain run: full linear layer with bias, F.cross_entropy over all logits, "
            "fp32 Adam, no checkpointing, one GPU"
        )
    if inputs.class_sample_rate < 1.0:
        notes.append(
            "class sampling shrinks the class gradient and the loss work to the sampled rows; "
            "the class matrix and its optimizer state stay whole on the GPUs"
        )
    if inputs.world_size > 1:
        notes.append(
            f"planned per GPU of {inputs.world_size}; the loss scores the global batch of "
            f"{inputs.batch_size * inputs.world_size} images on every GPU"
        )
    return tuple(notes)


def describe(inputs: PlanInputs) -> str:
    """Return one line naming what the plan is of."""
    parts = [
        f"{inputs.arch}",
        f"{inputs.num_classes:,} classes",
        f"D={inputs.embedding_dim}" if inputs.embedding_dim else "no neck",
        f"{inputs.head} head",
        f"batch {inputs.batch_size}",
        f"{inputs.image_size} px",
        inputs.precision,
        f"checkpointing {inputs.checkpointing}",
        {"sgd": "SGD", "adamw": "AdamW", "adam": "Adam"}[inputs.optimizer],
    ]
    if inputs.grad_accum > 1:
        parts.append(f"{inputs.grad_accum} micro-batches per step")
    if inputs.world_size > 1:
        parts.append(f"{inputs.world_size} GPUs")
    if inputs.class_sample_rate < 1.0:
        parts.append(f"class sample rate {inputs.class_sample_rate:g}")
    if inputs.fused_head_update:
        parts.append("fused head update")
    return ", ".join(parts)


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """Return the plan as JSON-ready data; every size is in bytes."""
    return {
        "inputs": dataclasses.asdict(plan.inputs),
        "parts": [dataclasses.asdict(part) for part in plan.parts],
        "peak_bytes": plan.peak_bytes,
        "peak_moment": plan.peak_moment,
        "overhead_bytes": plan.overhead_bytes,
        "total_bytes": plan.total_bytes,
        "activation_bytes_per_sample": round(plan.activation_bytes_per_sample),
        "notes": list(plan.notes),
    }


__all__ = [
    "FRAGMENTATION",
    "OVERHEAD_FIXED_BYTES",
    "PART_NAMES",
    "ClassMatrix",
    "ModelShape",
    "Part",
    "Plan",
    "PlanError",
    "PlanInputs",
    "class_matrix",
    "describe",
    "inputs_from_config",
    "model_shape",
    "naive_inputs",
    "plan_memory",
    "plan_to_dict",
]
