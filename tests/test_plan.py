"""Tests of the memory planner: sizes by hand, plans against measured CPU steps, the CLI and --auto-batch."""

import dataclasses
import functools
import json
import logging
import math

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from toolkit.cli import app
from toolkit.config import TrainConfig
from toolkit.model import build_model, saved_activation_bytes
from toolkit.plan import (
    PlanError,
    PlanInputs,
    SizeError,
    check_plan,
    format_size,
    largest_batch,
    naive_inputs,
    parse_size,
    plan_memory,
    plan_training,
    suggest_changes,
)
from toolkit.plan import activations, planner, run
from toolkit.plan.measure import LiveTensorCounter, measure_training_peak

GiB = 1024**3

# Small configurations keep the activation measurement (a forward pass on the CPU) fast, and one
# embedding size lets the tests share a measured profile. The parameter parts do not depend on
# the image size.
SMALL = dict(arch="resnet18", image_size=64, embedding_dim=128, precision="fp32", device_type="cpu")


@functools.cache
def torchvision_resnet(arch: str) -> torch.nn.Module:
    return getattr(torchvision.models, arch)(weights=None)


def trunk_parameter_count(arch: str, embedding_dim: int) -> int:
    """Count backbone (torchvision without fc) and neck parameters the way the test derives them."""
    resnet = torchvision_resnet(arch)
    backbone = sum(p.numel() for name, p in resnet.named_parameters() if not name.startswith("fc."))
    features = resnet.fc.in_features
    neck = features * embedding_dim + 2 * embedding_dim if embedding_dim else 0  # Linear without bias, BatchNorm1d
    return backbone + neck


def trunk_buffer_bytes(arch: str, embedding_dim: int) -> int:
    resnet = torchvision_resnet(arch)
    buffers = sum(b.numel() * b.element_size() for b in resnet.buffers())
    neck = 2 * embedding_dim * 4 + 8 if embedding_dim else 0  # running mean and var, num_batches_tracked
    return buffers + neck


# ---------------------------------------------------------------------------------------------
# sizes


def test_parse_size_units():
    assert parse_size("11GiB") == 11 * 1024**3
    assert parse_size("11GB") == 11 * 1000**3
    assert parse_size("11000MiB") == 11000 * 1024**2
    assert parse_size("10.5 GiB") == int(10.5 * 1024**3)
    assert parse_size("11gib") == 11 * 1024**3
    assert parse_size("4096") == 4096


@pytest.mark.parametrize("text", ["eleven", "11XB", "", "-1GiB", "0GB", "GiB"])
def test_parse_size_rejects_bad(text):
    with pytest.raises(SizeError) as error:
        parse_size(text)
    assert repr(text) in str(error.value)


def test_format_size():
    assert format_size(512) == "512 B"
    assert format_size(11 * GiB) == "11.0 GiB"
    assert format_size(1536 * 1024**2) == "1.50 GiB"
    assert format_size(300 * 1024**2) == "300 MiB"


# ---------------------------------------------------------------------------------------------
# parts derived by hand


def test_parts_resnet50_sgd():
    C, D, B = 300_000, 512, 8
    plan = plan_memory(PlanInputs(arch="resnet50", num_classes=C, embedding_dim=D, batch_size=B, image_size=32))
    trunk = trunk_parameter_count("resnet50", D) * 4

    assert plan.part(planner.BACKBONE_PARAMETERS).bytes == trunk + trunk_buffer_bytes("resnet50", D)
    assert plan.part(planner.BACKBONE_GRADIENTS).bytes == trunk
    assert plan.part(planner.BACKBONE_STATE).bytes == trunk  # one momentum buffer
    assert plan.part(planner.CLASS_MATRIX).bytes == C * D * 4
    assert plan.part(planner.CLASS_GRADIENT).bytes == C * D * 4
    assert plan.part(planner.CLASS_STATE).bytes == C * D * 4
    assert plan.part(planner.INPUT_BATCH).bytes == B * 3 * 32 * 32 * 4
    # two (B, chunk) fp32 logit blocks and the (B, D) input gradient
    assert plan.part(planner.LOSS_WORKSPACE).bytes == 2 * B * 8192 * 4 + B * D * 4


def test_parts_adamw_doubles_state():
    C, D = 1000, SMALL["embedding_dim"]
    plan = plan_memory(PlanInputs(**SMALL, num_classes=C, optimizer="adamw", momentum=0.0))
    trunk = trunk_parameter_count("resnet18", D) * 4

    assert plan.part(planner.BACKBONE_STATE).bytes == 2 * trunk
    assert plan.part(planner.CLASS_STATE).bytes == 2 * C * D * 4


def test_naive_head_matches_headline():
    C = 300_000
    plan = plan_memory(naive_inputs(PlanInputs(arch="resnet50", num_classes=C, batch_size=2, image_size=32)))
    head = (2048 * C + C) * 4  # weight and bias

    assert plan.part(planner.CLASS_MATRIX).bytes == head
    assert plan.part(planner.CLASS_GRADIENT).bytes == head
    assert plan.part(planner.CLASS_STATE).bytes == 2 * head  # Adam's two moments
    # 614M head parameters: weights, gradient and Adam state are 9.8 GB in fp32
    assert round(4 * head / 1e9, 1) == 9.8
    assert round(3 * head / 1e9, 1) == 7.4  # the same with one SGD momentum buffer
    # the B × C log-probabilities are saved, and their gradient and the logits' gradient are workspace
    assert plan.part(planner.LOSS_WORKSPACE).bytes == 2 * 2 * C * 4 + 2 * 2048 * 4


def test_sharded_head_per_gpu():
    C, D, B, W = 300_001, SMALL["embedding_dim"], 16, 4
    plan = plan_memory(PlanInputs(**SMALL, num_classes=C, batch_size=B, world_size=W))
    rows = math.ceil(C / W)  # the first C mod W ranks hold one row more
    trunk = trunk_parameter_count("resnet18", D) * 4

    assert plan.part(planner.CLASS_MATRIX).bytes == rows * D * 4
    assert plan.part(planner.CLASS_GRADIENT).bytes == rows * D * 4
    assert plan.part(planner.CLASS_STATE).bytes == rows * D * 4
    assert plan.part(planner.BACKBONE_GRADIENTS).bytes == 2 * trunk  # with DDP's bucket copy
    # logits and input gradient of the global batch, the other ranks' gathered embeddings, and
    # the gather's clone of their gradient
    global_batch = B * W
    workspace = 2 * global_batch * 8192 * 4 + global_batch * D * 4 + (global_batch - B) * D * 4 + global_batch * D * 4
    assert plan.part(planner.LOSS_WORKSPACE).bytes == workspace


def test_class_sampling_keeps_matrix():
    C, D = 100_000, SMALL["embedding_dim"]
    full = plan_memory(PlanInputs(**SMALL, num_classes=C))
    sampled = plan_memory(PlanInputs(**SMALL, num_classes=C, class_sample_rate=0.1))

    assert sampled.part(planner.CLASS_MATRIX).bytes == full.part(planner.CLASS_MATRIX).bytes
    assert sampled.part(planner.CLASS_STATE).bytes == full.part(planner.CLASS_STATE).bytes
    assert sampled.part(planner.CLASS_GRADIENT).bytes == 10_000 * D * 4
    assert sampled.part(planner.SAMPLED_ROWS).bytes == 10_000 * D * 4  # the loss's copy of the rows


def test_class_sampling_keeps_batch_classes():
    # a step keeps every class of the batch even when that is more than the sample rate requests
    plan = plan_memory(PlanInputs(**SMALL, num_classes=10_000, batch_size=64, class_sample_rate=0.001))

    assert plan.part(planner.CLASS_GRADIENT).bytes == 64 * SMALL["embedding_dim"] * 4


def test_row_optimizer_adamw_counts_steps():
    C, D = 10_000, SMALL["embedding_dim"]
    plan = plan_memory(PlanInputs(**SMALL, num_classes=C, optimizer="adamw", momentum=0.0, class_sample_rate=0.5))

    assert plan.part(planner.CLASS_STATE).bytes == 2 * C * D * 4 + C * 4  # moments and a step per row


def test_fused_update_drops_gradient():
    C, D = 100_000, SMALL["embedding_dim"]
    plan = plan_memory(PlanInputs(**SMALL, num_classes=C, fused_head_update=True))

    assert plan.part(planner.CLASS_GRADIENT).bytes == 0
    assert plan.part(planner.CLASS_STATE).bytes == C * D * 4  # the momentum stays


def test_fused_update_needs_sgd():
    with pytest.raises(PlanError, match="sgd"):
        PlanInputs(**SMALL, optimizer="adamw", momentum=0.0, fused_head_update=True)


def test_fused_update_needs_one_micro_batch():
    with pytest.raises(PlanError, match="grad-accum 1"):
        PlanInputs(**SMALL, grad_accum=2, fused_head_update=True)


def test_row_optimizer_rejects_fp16():
    with pytest.raises(PlanError, match="fp16"):
        PlanInputs(**{**SMALL, "precision": "fp16"}, class_sample_rate=0.5)


@pytest.mark.parametrize(
    "device_type, optimizer, expected",
    [
        ("cuda", "sgd", "decayed_sum"),  # foreach copies the decayed group's gradients
        ("cuda", "adamw", "decayed_sum"),  # foreach square roots of the decayed group's moments
        ("cpu", "sgd", "twice_largest"),  # weight decay and Nesterov temporaries of one parameter
        ("cpu", "adamw", "pairs"),  # the previous quotient beside a square root and its quotient
    ],
)
def test_step_temporaries(device_type, optimizer, expected):
    C, D = 1000, SMALL["embedding_dim"]
    inputs = PlanInputs(
        **{**SMALL, "device_type": device_type},
        num_classes=C,
        optimizer=optimizer,
        momentum=0.9 if optimizer == "sgd" else 0.0,
    )
    plan = plan_memory(inputs)
    # the decayed group in parameter order: conv weights, neck weight, class matrix
    resnet = torchvision_resnet("resnet18")
    decayed = [p.numel() * 4 for n, p in resnet.named_parameters() if p.ndim > 1 and not n.startswith("fc.")]
    decayed += [512 * D * 4, C * D * 4]

    value = plan.part(planner.STEP_TEMPORARIES).bytes
    if expected == "decayed_sum":
        assert value == sum(decayed)
    elif expected == "twice_largest":
        assert value == 2 * max(decayed)
    else:
        assert value == max(previous + 2 * size for previous, size in zip([0, *decayed], decayed))


def test_sgd_without_decay_copies_nothing():
    plan = plan_memory(PlanInputs(**{**SMALL, "device_type": "cuda"}, weight_decay=0.0))

    assert plan.part(planner.STEP_TEMPORARIES).bytes == 0


def test_peak_sums_parts_at_peak():
    plan = plan_memory(PlanInputs(**SMALL, num_classes=5000, batch_size=16))

    assert plan.peak_bytes == sum(part.at_peak for part in plan.parts)
    assert plan.total_bytes == plan.peak_bytes + plan.overhead_bytes
    assert plan.overhead_bytes == round(planner.FRAGMENTATION * plan.peak_bytes)  # no CUDA context on the CPU


# ---------------------------------------------------------------------------------------------
# activation measurement


@pytest.mark.parametrize("mode", ["none", "stage", "block"])
def test_profile_matches_model_count(mode):
    config = TrainConfig(arch="resnet18", embedding_dim=16, checkpointing=mode)
    model = build_model(config, activations.PROFILE_CLASSES)
    profile = activations.measure_profile(
        activations.ProfileKey("resnet18", 32, mode, autocast=False, embedding_dim=16, head="linear")
    )

    for batch in activations.PROFILE_BATCHES:
        assert profile.saved_bytes(batch) == saved_activation_bytes(model, 32, batch_size=batch)


def test_profile_keeps_global_rng():
    state = torch.get_rng_state()
    activations.measure_profile(activations.ProfileKey("resnet18", 32, "none", False, 16, "linear"))

    assert torch.equal(torch.get_rng_state(), state)


def test_counter_tracks_frees():
    with LiveTensorCounter() as counter:
        permanent = torch.zeros(1000)  # 4000 bytes
        temporary = torch.zeros(2000)  # 8000 bytes
        view = temporary[:10]
        del temporary
        still_live = counter.live_bytes
        del view
        after = counter.live_bytes

    assert still_live == 12_000  # the view keeps the storage
    assert after == 4000
    assert counter.peak_bytes == 12_000
    assert permanent.numel() == 1000


# ---------------------------------------------------------------------------------------------
# planned against measured on the CPU


def planned_and_measured(arch, image_size, batch, classes, mode, optimizer, **config):
    settings = TrainConfig(arch=arch, image_size=image_size, checkpointing=mode, optimizer=optimizer, **config)
    inputs = dataclasses.replace(
        planner.inputs_from_config(settings, classes, precision="fp32", device_type="cpu"), batch_size=batch
    )
    plan = plan_memory(inputs)
    measured = measure_training_peak(settings, classes, batch)
    return plan, measured


@pytest.mark.parametrize(
    "arch, image_size, batch, classes, mode, optimizer, config",
    [
        ("resnet18", 64, 4, 1000, "none", "sgd", {}),
        ("resnet18", 64, 8, 20000, "stage", "sgd", {}),
        ("resnet18", 64, 8, 200_000, "none", "sgd", {"class_sample_rate": 0.1}),
        ("resnet18", 64, 8, 200_000, "none", "sgd", {"fused_head_update": True}),
    ],
)
def test_plan_within_15_percent(arch, image_size, batch, classes, mode, optimizer, config):
    plan, measured = planned_and_measured(arch, image_size, batch, classes, mode, optimizer, embedding_dim=128, **config)

    assert abs(plan.peak_bytes / measured.peak_bytes - 1) <= 0.15, (plan.peak_bytes, measured)


def test_plan_activations_within_15_percent():
    # at batch 32 the backward pass, not the optimizer step, has the most bytes live, so activations decide the peak
    plan, measured = planned_and_measured("resnet18", 64, 32, 1000, "none", "sgd", embedding_dim=128)

    assert measured.forward_backward > measured.optimizer_step
    assert plan.peak_moment.startswith("backward")
    assert abs(plan.peak_bytes / measured.peak_bytes - 1) <= 0.15, (plan.peak_bytes, measured)


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, image_size, batch, classes, mode, optimizer, config",
    [
        ("resnet18", 64, 8, 1000, "block", "adamw", {}),
        ("resnet18", 128, 16, 1000, "none", "sgd", {}),
        ("resnet18", 128, 16, 1000, "stage", "adamw", {}),
        ("resnet18", 128, 16, 1000, "block", "sgd", {}),
        ("resnet18", 64, 8, 20000, "none", "adamw", {"head": "arcface"}),
        ("resnet18", 96, 24, 5000, "block", "sgd", {"embedding_dim": 0}),
        ("resnet50", 64, 8, 1000, "stage", "sgd", {}),
        ("resnet18", 64, 8, 200_000, "none", "adamw", {"class_sample_rate": 0.1}),
        ("resnet18", 64, 32, 200_000, "stage", "sgd", {"class_sample_rate": 0.05, "embedding_dim": 128}),
        ("resnet18", 64, 32, 200_000, "none", "sgd", {"fused_head_update": True, "head": "cosface"}),
    ],
)
def test_plan_within_15_percent_more(arch, image_size, batch, classes, mode, optimizer, config):
    plan, measured = planned_and_measured(arch, image_size, batch, classes, mode, optimizer, **config)

    assert abs(plan.peak_bytes / measured.peak_bytes - 1) <= 0.15, (plan.peak_bytes, measured)


@pytest.mark.slow
def test_plan_bf16_within_15_percent():
    settings = TrainConfig(arch="resnet18", image_size=64, checkpointing="stage")
    inputs = dataclasses.replace(
        planner.inputs_from_config(settings, 1000, precision="bf16", device_type="cpu"), batch_size=8
    )
    plan = plan_memory(inputs)
    measured = measure_training_peak(settings, 1000, 8, autocast_dtype=torch.bfloat16)

    assert abs(plan.peak_bytes / measured.peak_bytes - 1) <= 0.15, (plan.peak_bytes, measured)


# ---------------------------------------------------------------------------------------------
# largest batch and suggestions


def test_largest_batch_is_largest():
    inputs = PlanInputs(**SMALL, num_classes=1000, batch_size=1)
    budget = plan_memory(dataclasses.replace(inputs, batch_size=37)).total_bytes

    batch = largest_batch(inputs, budget)

    assert batch == 37
    assert plan_memory(dataclasses.replace(inputs, batch_size=batch)).total_bytes <= budget
    assert plan_memory(dataclasses.replace(inputs, batch_size=batch + 1)).total_bytes > budget


def test_largest_batch_none_fits():
    inputs = PlanInputs(**SMALL, num_classes=1000)
    budget = plan_memory(dataclasses.replace(inputs, batch_size=1)).total_bytes - 1

    assert largest_batch(inputs, budget) == 0


def test_suggestions_fit_in_cost_order():
    # 32 px keeps the measurements of the other precision and checkpointing modes quick
    inputs = PlanInputs(
        **{**SMALL, "embedding_dim": 512, "image_size": 32},
        num_classes=2_000_000,
        batch_size=64,
        optimizer="adamw",
        momentum=0.0,
    )
    budget = 4 * GiB
    assert plan_memory(inputs).total_bytes > budget

    suggestions = list(suggest_changes(inputs, budget))
    options = [suggestion.option for suggestion in suggestions]

    assert options == ["--embedding-dim 64", "--world-size 8"]
    for suggestion in suggestions:
        assert suggestion.total_bytes <= budget
    # single changes that are not listed do not fit
    assert plan_memory(dataclasses.replace(inputs, optimizer="sgd", momentum=0.9)).total_bytes > budget
    assert plan_memory(dataclasses.replace(inputs, embedding_dim=128)).total_bytes > budget
    assert plan_memory(dataclasses.replace(inputs, world_size=4)).total_bytes > budget


# ---------------------------------------------------------------------------------------------
# command line


def invoke(*args):
    return CliRunner().invoke(app, ["plan", *args])


@pytest.mark.slow
def test_cli_naive_reference_does_not_fit():
    # the reference case: ResNet50 at 224 px, 300,000 classes, one GPU with 11 GiB
    args = ["--classes", "300000", "--gpu-memory", "11GiB", "--naive"]

    text = invoke(*args)
    data = invoke(*args, "--json")

    assert text.exit_code == 1
    assert "does not fit" in text.stdout
    assert "batch 1 does not fit" in text.stdout
    assert data.exit_code == 1
    plan = json.loads(data.stdout)
    assert plan["fits"] is False
    assert plan["largest_batch"] == 0
    assert plan["inputs"]["naive"] is True
    assert plan["inputs"]["arch"] == "resnet50"
    assert plan["inputs"]["image_size"] == 224
    assert plan["total_bytes"] > 11 * GiB


def test_cli_naive_does_not_fit():
    # the reference case at 32 px, so that the activation measurement is quick. The parameters,
    # gradient and Adam state of the 2048 × 300,000 layer alone exceed 11 GiB.
    args = ["--classes", "300000", "--gpu-memory", "11GiB", "--naive", "--image-size", "32"]

    text = invoke(*args)
    data = invoke(*args, "--json")

    assert text.exit_code == 1
    assert "does not fit" in text.stdout
    assert "batch 1 does not fit" in text.stdout
    assert data.exit_code == 1
    plan = json.loads(data.stdout)
    assert plan["fits"] is False
    assert plan["largest_batch"] == 0
    assert plan["suggestions"] == []


def test_cli_json_parts_in_bytes(tiny_dataset):
    result = invoke(str(tiny_dataset), "--gpu-memory", "8GiB", "--arch", "resnet18", "--image-size", "64", "--json")

    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["inputs"]["num_classes"] == 6
    assert plan["fits"] is True
    assert plan["gpu_memory_bytes"] == 8 * GiB
    assert plan["peak_bytes"] == sum(part["at_peak"] for part in plan["parts"])
    assert plan["total_bytes"] == plan["peak_bytes"] + plan["overhead_bytes"]
    assert plan["largest_batch"] >= plan["inputs"]["batch_size"]
    assert [part["name"] for part in plan["parts"]] == list(planner.PART_NAMES)


def test_cli_reads_train_and_plan_tables(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        '[train]\narch = "resnet18"\nimage_size = 64\nembedding_dim = 128\nclass_sample_rate = 0.5\n\n'
        '[plan]\ngpu_memory = "8GiB"\nworld_size = 2\n'
    )

    result = invoke("--classes", "1000", "--config", str(recipe), "--json")

    assert result.exit_code == 0, result.output
    inputs = json.loads(result.stdout)["inputs"]
    assert inputs["arch"] == "resnet18"
    assert inputs["class_sample_rate"] == 0.5
    assert inputs["world_size"] == 2


def test_cli_rejects_unknown_plan_key(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[plan]\ngpu_mem = "8GiB"\n')

    result = invoke("--classes", "1000", "--config", str(recipe))

    assert result.exit_code == 1
    assert "gpu_mem" in result.output


def test_cli_needs_classes_or_dataset():
    result = invoke("--gpu-memory", "8GiB")

    assert result.exit_code == 1
    assert "--classes" in result.output


def test_cli_rejects_bad_size():
    result = invoke("--classes", "1000", "--gpu-memory", "eleven")

    assert result.exit_code == 1
    assert "'eleven'" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default comes from the CUDA device here")
def test_cli_without_cuda_needs_gpu_memory():
    result = invoke("--classes", "1000")

    assert result.exit_code == 1
    assert "--gpu-memory" in result.output


# ---------------------------------------------------------------------------------------------
# training integration


def small_train_config(**overrides):
    settings = dict(arch="resnet18", image_size=64, embedding_dim=16, class_chunk=4, precision="fp32", device="cpu")
    settings.update(overrides)
    return TrainConfig(**settings)


def test_training_warns_when_too_big(monkeypatch, caplog):
    config = small_train_config(batch_size=8)
    needed = check_plan(config, 6, torch.device("cpu")).plan.total_bytes
    monkeypatch.setattr(run, "device_memory_bytes", lambda device: needed - 1)

    with caplog.at_level(logging.WARNING, logger="toolkit.plan.run"):
        returned = plan_training(config, 6, torch.device("cpu"))

    assert returned == config
    assert "may run out of memory" in caplog.text


def test_training_auto_batch_picks_largest(monkeypatch):
    config = small_train_config(batch_size=2, auto_batch=True)
    inputs = planner.inputs_from_config(config, 6, precision="fp32", device_type="cpu")
    budget = plan_memory(dataclasses.replace(inputs, batch_size=5)).total_bytes
    monkeypatch.setattr(run, "device_memory_bytes", lambda device: budget)

    chosen = plan_training(config, 6, torch.device("cpu")).batch_size

    assert chosen == 5
    assert plan_memory(dataclasses.replace(inputs, batch_size=chosen)).total_bytes <= budget
    assert plan_memory(dataclasses.replace(inputs, batch_size=chosen + 1)).total_bytes > budget


def test_training_auto_batch_none_fits(monkeypatch):
    monkeypatch.setattr(run, "device_memory_bytes", lambda device: 1)

    with pytest.raises(PlanError, match="no batch"):
        plan_training(small_train_config(auto_batch=True), 6, torch.device("cpu"))


@pytest.mark.slow
def test_train_cli_auto_batch(tiny_dataset, tmp_path, monkeypatch):
    config = small_train_config(batch_size=2)
    inputs = planner.inputs_from_config(config, 6, precision="fp32", device_type="cpu")
    budget = plan_memory(dataclasses.replace(inputs, batch_size=5)).total_bytes
    monkeypatch.setattr(run, "device_memory_bytes", lambda device: budget)
    run_dir = tmp_path / "run"

    result = CliRunner().invoke(
        app,
        [
            "train", str(tiny_dataset), str(run_dir), "--auto-batch", "--arch", "resnet18", "--image-size", "64",
            "--embedding-dim", "16", "--class-chunk", "4", "--precision", "fp32", "--device", "cpu",
            "--workers", "0", "--steps", "1", "--batch-size", "2",
        ],
    )

    assert result.exit_code == 0, result.output
    saved = (run_dir / "config.toml").read_text()
    assert "batch_size = 5\n" in saved
    assert "auto_batch = true\n" in saved


def test_available_ram_reads_meminfo(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000 kB\nMemFree:         2000 kB\nMemAvailable:    5000 kB\n")
    monkeypatch.setattr(run, "MEMINFO", meminfo)

    assert run.available_ram_bytes() == 5000 * 1024
    assert run.device_memory_bytes(torch.device("cpu")) == 5000 * 1024
