"""Tests of the classifier: shapes, heads against F.cross_entropy, checkpointing, pretrained loading, memory."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint

import toolkit.model.backbone as backbone_module
from toolkit.config import TrainConfig
from toolkit.model import (
    ARCHS,
    Classifier,
    PretrainedWeightsError,
    build_backbone,
    build_model,
    checkpoint_module,
    load_pretrained,
    saved_activation_bytes,
)

NUM_CLASSES = 10
EMBEDDING_DIM = 16
IMAGE_SIZE = 32
BATCH = 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tensors this small run faster on one thread than with the cost of splitting work between two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> TrainConfig:
    # a class chunk of 4 over 10 classes gives two full chunks and a partial one
    settings = dict(arch="resnet18", embedding_dim=EMBEDDING_DIM, class_chunk=4)
    settings.update(overrides)
    return TrainConfig(**settings)


def random_batch(batch: int = BATCH, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(NUM_CLASSES, (batch,))
    return images, labels


def checkpointed_copy(model: Classifier, mode: str) -> Classifier:
    """Build a model from `tiny_config()` with checkpointing `mode` and `model`'s weights and buffers."""
    twin = build_model(tiny_config(checkpointing=mode), model.num_classes)
    twin.load_state_dict(model.state_dict())
    return twin


def make_model(**overrides) -> Classifier:
    return build_model(tiny_config(**overrides), NUM_CLASSES)


def cosine_reference_loss(embeddings, weight, labels, *, scale, margin, head):
    """Cross-entropy of CosFace or ArcFace logits built in full with plain torch."""
    cosines = F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).T  # (B, C)
    target = cosines.gather(1, labels[:, None])  # (B, 1)
    if head == "cosface":
        shifted = target - margin
    else:
        angle = torch.acos(target.clamp(-1.0, 1.0))
        assert bool((angle + margin < math.pi).all()), "test data must avoid the ArcFace fallback region"
        shifted = torch.cos(angle + margin)
    logits = scale * cosines.scatter(1, labels[:, None], shifted)
    return F.cross_entropy(logits, labels)


# ---------------------------------------------------------------------------------------------
# shapes and settings


@pytest.mark.parametrize(("arch", "feature_dim"), [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_embed_shape_per_arch(arch, feature_dim):
    model = make_model(arch=arch)
    images, labels = random_batch(batch=2)

    with torch.no_grad():
        embeddings = model.embed(images)
        loss = model(images, labels)

    assert model.feature_dim == feature_dim
    assert embeddings.shape == (2, EMBEDDING_DIM)
    assert model.head.weight.shape == (NUM_CLASSES, EMBEDDING_DIM)
    assert loss.shape == ()


def test_arch_names_match_config():
    assert ARCHS == ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def test_default_arch_resnet50():
    config = TrainConfig()
    backbone = build_backbone()

    assert config.arch == "resnet50"
    assert backbone.feature_dim == 2048
    assert len(backbone.layer3) == 6  # ResNet50 has 3, 4, 6, 3 bottleneck blocks


def test_invalid_arch_error():
    config = dataclasses.replace(tiny_config(), arch="resnet42")
    with pytest.raises(ValueError, match="resnet42.*resnet18, resnet34, resnet50, resnet101, resnet152"):
        build_model(config, NUM_CLASSES)


def test_backbone_keys_match_torchvision():
    backbone = build_backbone("resnet18", "block")
    reference = torchvision.models.resnet18(weights=None).state_dict()

    expected = [key for key in reference if not key.startswith("fc.")]
    assert list(backbone.state_dict()) == expected


def test_neck_default_shape():
    model = make_model(embedding_dim=512)

    assert isinstance(model.neck[0], nn.Linear)
    assert model.neck[0].bias is None
    assert model.neck[0].weight.shape == (512, 512)
    assert isinstance(model.neck[1], nn.BatchNorm1d)
    with torch.no_grad():
        assert model.embed(random_batch(batch=2)[0]).shape == (2, 512)


def test_neck_off_uses_features():
    model = make_model(embedding_dim=0)
    images, labels = random_batch(batch=2)

    with torch.no_grad():
        embeddings = model.embed(images)
        loss = model(images, labels)

    assert isinstance(model.neck, nn.Identity)
    assert model.embedding_dim == 512
    assert model.head.weight.shape == (NUM_CLASSES, 512)
    assert embeddings.shape == (2, 512)
    assert torch.isfinite(loss)


def test_negative_embedding_dim_error():
    with pytest.raises(ValueError, match="embedding_dim -1"):
        make_model(embedding_dim=-1)


def test_class_matrix_init():
    model = make_model()
    weight = model.head.weight

    assert weight.shape == (NUM_CLASSES, EMBEDDING_DIM)
    assert 0.005 < float(weight.detach().std()) < 0.02
    assert model.num_classes == NUM_CLASSES
    assert model.embedding_dim == EMBEDDING_DIM


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"head": "softmax"}, "invalid head 'softmax'"),
        ({"class_chunk": 0}, "invalid class_chunk 0"),
        ({"label_smoothing": 1.0}, "invalid label_smoothing 1.0"),
        ({"head": "cosface", "scale": 0.0}, "invalid scale 0.0"),
        ({"head": "arcface", "margin": 4.0}, "invalid margin 4.0"),
    ],
)
def test_invalid_head_settings(overrides, message):
    config = dataclasses.replace(tiny_config(), **overrides)
    with pytest.raises(ValueError, match=message):
        build_model(config, NUM_CLASSES)


def test_zero_classes_error():
    with pytest.raises(ValueError, match="num_classes must be positive"):
        build_model(tiny_config(), 0)


def test_embed_rejects_wrong_shape():
    model = make_model()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.embed(torch.randn(2, 1, IMAGE_SIZE, IMAGE_SIZE))


# ---------------------------------------------------------------------------------------------
# channels_last


def test_conv_weights_channels_last():
    model = make_model()
    convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)]

    assert len(convs) == 20
    for conv in convs:
        assert conv.weight.is_contiguous(memory_format=torch.channels_last), conv


def test_embed_same_for_either_layout():
    model = make_model().eval()
    images, _ = random_batch()

    with torch.no_grad():
        contiguous = model.embed(images.contiguous())
        channels_last = model.embed(images.contiguous(memory_format=torch.channels_last))

    torch.testing.assert_close(contiguous, channels_last)


# ---------------------------------------------------------------------------------------------
# heads


def test_linear_loss_matches_cross_entropy():
    model = make_model()
    embeddings = torch.randn(BATCH, EMBEDDING_DIM, requires_grad=True)
    labels = torch.randint(NUM_CLASSES, (BATCH,))

    loss = model.loss(embeddings, labels)
    expected = F.cross_entropy(model.logits(embeddings), labels)

    torch.testing.assert_close(loss, expected)


def test_linear_loss_gradients_match():
    model = make_model()
    embeddings = torch.randn(BATCH, EMBEDDING_DIM, requires_grad=True)
    labels = torch.randint(NUM_CLASSES, (BATCH,))
    weight = model.head.weight

    grads = torch.autograd.grad(model.loss(embeddings, labels), (embeddings, weight))
    expected = torch.autograd.grad(F.cross_entropy(embeddings @ weight.T, labels), (embeddings, weight))

    torch.testing.assert_close(grads[0], expected[0])
    torch.testing.assert_close(grads[1], expected[1])


def test_label_smoothing_passed_to_loss():
    model = make_model(label_smoothing=0.1)
    embeddings = torch.randn(BATCH, EMBEDDING_DIM)
    labels = torch.randint(NUM_CLASSES, (BATCH,))

    expected = F.cross_entropy(embeddings @ model.head.weight.T, labels, label_smoothing=0.1)

    torch.testing.assert_close(model.loss(embeddings, labels), expected)


@pytest.mark.parametrize("head", ["cosface", "arcface"])
def test_cosine_loss_matches_reference(head):
    model = make_model(head=head, scale=16.0, margin=0.3)
    embeddings = torch.randn(BATCH, EMBEDDING_DIM)
    labels = torch.randint(NUM_CLASSES, (BATCH,))
    weight = model.head.weight.detach()

    loss = model.loss(embeddings, labels)
    expected = cosine_reference_loss(embeddings, weight, labels, scale=16.0, margin=0.3, head=head)
    without_margin = F.cross_entropy(16.0 * F.normalize(embeddings) @ F.normalize(weight).T, labels)

    torch.testing.assert_close(loss, expected)
    assert float(loss.detach()) > float(without_margin)


@pytest.mark.parametrize("head", ["cosface", "arcface"])
def test_cosine_logits_are_scaled_cosines(head):
    model = make_model(head=head, scale=16.0)
    embeddings = torch.randn(BATCH, EMBEDDING_DIM)
    weight = model.head.weight.detach()

    logits = model.logits(embeddings)
    expected = 16.0 * F.normalize(embeddings) @ F.normalize(weight).T

    assert logits.shape == (BATCH, NUM_CLASSES)
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("head", ["linear", "cosface", "arcface"])
def test_topk_matches_logits(head):
    model = make_model(head=head).eval()
    images, _ = random_batch()

    with torch.no_grad():
        embeddings = model.embed(images)
        values, indices = model.topk(embeddings, 3)
        expected_values, expected_indices = model.logits(embeddings).topk(3, dim=1)

    assert values.shape == (BATCH, 3)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(values, expected_values)


def test_topk_k_too_large_error():
    model = make_model()
    with pytest.raises(ValueError, match="k must be in"):
        model.topk(torch.randn(2, EMBEDDING_DIM), NUM_CLASSES + 1)


def test_forward_is_embed_then_loss():
    model = make_model().eval()
    images, labels = random_batch()

    with torch.no_grad():
        expected = F.cross_entropy(model.logits(model.embed(images)), labels)
        loss = model(images, labels)

    torch.testing.assert_close(loss, expected)


# ---------------------------------------------------------------------------------------------
# activation checkpointing


def train_step(model: Classifier, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    model.train()
    model.zero_grad()
    loss = model(images, labels)
    loss.backward()
    return loss.detach()


@pytest.fixture(scope="module")
def plain_step():
    """A model without checkpointing, a copy of its start state, and its loss after one training step."""
    torch.manual_seed(1)
    model = make_model()
    start = {key: value.clone() for key, value in model.state_dict().items()}
    images, labels = random_batch()
    loss = train_step(model, images, labels)
    return model, start, images, labels, loss


@pytest.fixture(scope="module", params=["stage", "block"])
def checkpointed_step(request, plain_step):
    """A checkpointed model that starts from the plain model's weights, and its loss after the same step."""
    _, start, images, labels, _ = plain_step
    model = build_model(tiny_config(checkpointing=request.param), NUM_CLASSES)
    model.load_state_dict(start)
    loss = train_step(model, images, labels)
    return model, loss


def test_checkpointing_loss_matches(plain_step, checkpointed_step):
    torch.testing.assert_close(checkpointed_step[1], plain_step[4], rtol=0, atol=0)


def test_checkpointing_gradients_match(plain_step, checkpointed_step):
    plain, checkpointed = plain_step[0], checkpointed_step[0]

    gradients = dict(checkpointed.named_parameters())
    assert len(gradients) == 60 + 3 + 1  # ResNet18 trunk, neck (linear, BatchNorm1d), class matrix
    for name, parameter in plain.named_parameters():
        assert gradients[name].grad is not None, name
        torch.testing.assert_close(gradients[name].grad, parameter.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_checkpointing_batch_norm_stats_match(plain_step, checkpointed_step):
    plain, checkpointed = plain_step[0], checkpointed_step[0]

    buffers = dict(checkpointed.named_buffers())
    assert len(buffers) == 3 * 21  # 20 BatchNorm2d in ResNet18 and one BatchNorm1d in the neck
    for name, buffer in plain.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert int(buffers[name]) == 1, name
        torch.testing.assert_close(buffers[name], buffer, rtol=1e-6, atol=1e-7, msg=name)


def test_plain_checkpoint_counts_batch_twice():
    # torch's checkpoint alone reruns BatchNorm during backward; checkpoint_module must not
    images = torch.randn(2, 8, 4, 4, requires_grad=True)
    plain_block = torchvision.models.resnet.BasicBlock(8, 8)
    guarded_block = torchvision.models.resnet.BasicBlock(8, 8)
    guarded_block.load_state_dict(plain_block.state_dict())

    checkpoint(plain_block, images, use_reentrant=False).sum().backward()
    checkpoint_module(guarded_block, images).sum().backward()

    assert int(plain_block.bn1.num_batches_tracked) == 2
    assert int(guarded_block.bn1.num_batches_tracked) == 1
    assert int(guarded_block.bn2.num_batches_tracked) == 1


def test_checkpoint_second_backward_keeps_stats():
    # each backward recomputes the block, so the guard must restore the statistics every time
    images = torch.randn(2, 8, 4, 4, requires_grad=True)
    plain_block = torchvision.models.resnet.BasicBlock(8, 8)
    guarded_block = torchvision.models.resnet.BasicBlock(8, 8)
    guarded_block.load_state_dict(plain_block.state_dict())

    plain_output = plain_block(images).square().sum()
    guarded_output = checkpoint_module(guarded_block, images).square().sum()
    for output in (plain_output, guarded_output):
        output.backward(retain_graph=True)
        output.backward()

    assert int(guarded_block.bn1.num_batches_tracked) == 1
    guarded_buffers = dict(guarded_block.named_buffers())
    for name, buffer in plain_block.named_buffers():
        torch.testing.assert_close(guarded_buffers[name], buffer, rtol=0, atol=0, msg=name)
    guarded_parameters = dict(guarded_block.named_parameters())
    for name, parameter in plain_block.named_parameters():
        torch.testing.assert_close(guarded_parameters[name].grad, parameter.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_eval_outputs_identical_across_modes(plain_step):
    # after one step the BatchNorm statistics differ from their initial values
    images = plain_step[2]
    plain = checkpointed_copy(plain_step[0], "none").eval()

    with torch.no_grad():
        expected = plain.embed(images)
    for mode in ("stage", "block"):
        model = checkpointed_copy(plain, mode).eval()
        assert torch.equal(model.embed(images), expected), mode


@pytest.mark.parametrize(("mode", "expected_calls"), [("stage", 4), ("block", 8)])
def test_checkpoint_calls_per_mode(monkeypatch, mode, expected_calls):
    # ResNet18 has 4 stages of 2 blocks, and checkpointing runs only when a backward pass can follow
    calls = []
    real_checkpoint = backbone_module.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(backbone_module, "checkpoint", counting_checkpoint)
    model = make_model(checkpointing=mode)
    images, labels = random_batch()

    model.eval()
    model(images, labels)
    model.train()
    with torch.no_grad():
        model(images, labels)
    assert calls == []

    model(images, labels)
    assert len(calls) == expected_calls


def test_checkpointing_mode_invalid():
    backbone = build_backbone("resnet18")
    with pytest.raises(ValueError, match="invalid checkpointing mode 'layer'"):
        backbone.checkpointing = "layer"


# ---------------------------------------------------------------------------------------------
# pretrained weights


@pytest.fixture
def resnet18_state():
    torch.manual_seed(123)  # different from the model's own random initialisation
    return torchvision.models.resnet18(weights=None).state_dict()


def assert_backbone_equals(model: Classifier, state: dict) -> None:
    loaded = model.backbone.state_dict()
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("layout", ["plain", "no_fc", "state_dict", "model", "module_prefix"])
def test_pretrained_loads_layouts(tmp_path, resnet18_state, layout):
    content = {
        "plain": resnet18_state,
        "no_fc": {key: value for key, value in resnet18_state.items() if not key.startswith("fc.")},
        "state_dict": {"state_dict": resnet18_state, "epoch": 3},
        "model": {"model": resnet18_state},
        "module_prefix": {f"module.{key}": value for key, value in resnet18_state.items()},
    }[layout]
    path = tmp_path / "resnet18.pth"
    torch.save(content, path)

    model = make_model(pretrained=path)

    assert_backbone_equals(model, resnet18_state)


def test_pretrained_report_lists_fc(tmp_path, resnet18_state):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18_state, path)
    backbone = build_backbone("resnet18")

    report = load_pretrained(backbone, path)

    assert report.ignored == ["fc.weight", "fc.bias"]
    assert report.missing == []
    assert report.unexpected == []
    assert len(report.loaded) == len(resnet18_state) - 2


def test_pretrained_from_classifier_state(tmp_path):
    source = make_model()
    path = tmp_path / "classifier.pt"
    torch.save({"model": source.state_dict()}, path)

    model = make_model(pretrained=path)

    assert_backbone_equals(model, source.backbone.state_dict())
    assert not torch.equal(model.head.weight, source.head.weight)


def test_pretrained_missing_file_error(tmp_path):
    path = tmp_path / "absent.pth"
    with pytest.raises(PretrainedWeightsError, match="not found: .*absent.pth"):
        make_model(pretrained=path)


@pytest.mark.parametrize("content", [b"not a checkpoint\n", b""])
def test_pretrained_unreadable_file_error(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(PretrainedWeightsError, match="cannot read pretrained weights from .*weights.pth"):
        make_model(pretrained=path)


def test_pretrained_tensor_file_error(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.ones(3), path)
    with pytest.raises(PretrainedWeightsError, match="tensor.pth contains a Tensor, not a state dict"):
        make_model(pretrained=path)


def test_pretrained_no_matching_keys_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.ones(2, 2)}, path)
    with pytest.raises(PretrainedWeightsError, match="no key in .*other.pth matches the backbone"):
        make_model(pretrained=path)


def test_pretrained_shape_mismatch_error(tmp_path, resnet18_state):
    resnet18_state["conv1.weight"] = torch.zeros(32, 3, 7, 7)
    path = tmp_path / "narrow.pth"
    torch.save(resnet18_state, path)
    with pytest.raises(PretrainedWeightsError, match=r"narrow.pth.*conv1.weight: file \(32, 3, 7, 7\)"):
        make_model(pretrained=path)


def test_pretrained_other_depth_error(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match="resnet34.pth.*unexpected keys .*layer1.2"):
        make_model(pretrained=path)


def test_pretrained_partial_load_not_strict(tmp_path, resnet18_state):
    partial = {key: value for key, value in resnet18_state.items() if not key.startswith("layer4.")}
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    backbone = build_backbone("resnet18")
    before = backbone.layer4[0].conv1.weight.detach().clone()

    with pytest.raises(PretrainedWeightsError, match="missing keys"):
        load_pretrained(backbone, path)
    report = load_pretrained(backbone, path, strict=False)

    assert "layer4.0.conv1.weight" in report.missing
    assert torch.equal(backbone.layer4[0].conv1.weight, before)
    assert torch.equal(backbone.conv1.weight, resnet18_state["conv1.weight"])


# ---------------------------------------------------------------------------------------------
# saved activation bytes


def test_saved_bytes_grows_with_batch():
    model = make_model()

    two = saved_activation_bytes(model, IMAGE_SIZE, batch_size=2)
    four = saved_activation_bytes(model, IMAGE_SIZE, batch_size=4)

    assert two > 0
    assert 1.8 < four / two < 2.2


def test_saved_bytes_smaller_with_checkpointing():
    plain = make_model()
    sizes = {
        mode: saved_activation_bytes(checkpointed_copy(plain, mode), IMAGE_SIZE)
        for mode in ("none", "stage", "block")
    }

    assert sizes["block"] < sizes["none"]
    assert sizes["stage"] < sizes["none"]


def test_saved_bytes_excludes_parameters():
    model = make_model()
    parameter_bytes = sum(parameter.nbytes for parameter in model.parameters())

    size = saved_activation_bytes(model, IMAGE_SIZE, batch_size=2)

    # conv1 saves the fp32 input images, while ResNet18's weights (about 45 MB) must not count
    assert size > 2 * 3 * IMAGE_SIZE * IMAGE_SIZE * 4
    assert size < parameter_bytes / 10


def test_saved_bytes_keeps_model_state():
    model = make_model().eval()
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    rng_state = torch.get_rng_state()

    saved_activation_bytes(model, IMAGE_SIZE)

    assert not model.training
    assert not any(module.training for module in model.modules())
    assert torch.equal(torch.get_rng_state(), rng_state)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name


def test_saved_bytes_under_bf16():
    model = make_model()

    full = saved_activation_bytes(model, IMAGE_SIZE, batch_size=4)
    half = saved_activation_bytes(model, IMAGE_SIZE, batch_size=4, autocast_dtype=torch.bfloat16)
    half_two = saved_activation_bytes(model, IMAGE_SIZE, batch_size=2, autocast_dtype=torch.bfloat16)

    assert half < full
    # the bf16 copies of the weights (22 MB for ResNet18) would break this ratio if they counted
    assert 1.8 < half / half_two < 2.2


def test_saved_bytes_batch_one_error():
    with pytest.raises(ValueError, match="invalid batch_size 1"):
        saved_activation_bytes(make_model(), IMAGE_SIZE, batch_size=1)
