"""Training across processes: sharded loss and top-k, class sampling, fused head update, data and
validation across ranks, checkpoints and resume at another world size.

Two processes run on the CPU with gloo on 127.0.0.1, started by torchrun with a hard timeout, so
a hang fails the test instead of blocking. One launch of tests/dist_worker.py computes every op
case and two training runs; one launch of `toolkit train` trains with the fused head update. The
tests compare their outputs with references computed here in one process.

Tolerances: losses rtol=1e-5, atol=1e-6 and gradients rtol=1e-4, atol=1e-6, as for the chunked
loss, because the ranks add the classes in another order than one process. Training runs are
compared one step at a time, each step redone in one process from the run's own checkpoint of
the step before, with rtol=atol=1e-4. Whole runs cannot be compared: in a randomly initialised
ResNet-18 on batches of 4 images, a change of 1e-6 in the weights moves the next gradients by
2 to 6 percent, so float32 rounding differences grow step by step.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dist_worker import (
    EVAL_CONFIG,
    FUSED_SETTINGS,
    FUSED_STEPS,
    LOSS_CASES,
    LOSS_CHUNK,
    SAMPLE_RATE,
    SAMPLE_STEPS,
    TOPK,
    TRAIN_CONFIG,
    UNEVEN_ROWS,
    eval_summary,
    write_dataset,
)
from toolkit.config import ConfigError, TrainConfig
from toolkit.data import build_train_loader, normalize_batch, steps_per_epoch
from toolkit.dataset import load_dataset
from toolkit.eval import run_eval
from toolkit.model import build_model
from toolkit.model.head import ClassHead
from toolkit.model.sharded_head import ShardedClassHead, class_range
from toolkit.ops import chunked_cross_entropy
from toolkit.train import load_checkpoint, train
from toolkit.train.distributed import load_optimizer_states, rank_device, setup_distributed
from toolkit.train.head_optim import RowOptimizer, check_head_update
from toolkit.train.optim import build_optimizer, build_scheduler
from toolkit.train.precision import Precision

WORKER = Path(__file__).with_name("dist_worker.py")
LAUNCH_TIMEOUT = 900  # seconds for one torchrun launch, far above its usual time, so only a hang reaches it
WORLD_SIZE = 2
NUM_CLASSES = 5
SHARDS = {"train": [10, 10, 3], "val": [5], "test": [2]}

LOSS_TOL = {"rtol": 1e-5, "atol": 1e-6}
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-6}
WEIGHT_TOL = {"rtol": 1e-4, "atol": 1e-4}


# ---------------------------------------------------------------------------------------------
# launching ranks


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_torchrun(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run `torchrun --nproc-per-node 2 ARGS` on loopback; kill the whole process group on timeout."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(WORLD_SIZE),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--max-restarts", "0", *args,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.Popen(
        command, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"torchrun did not finish within {LAUNCH_TIMEOUT} s (a hang?):\n{output[-6000:]}")
    return process.returncode, output


def rank_results(workdir: Path, case: str) -> list[dict]:
    return [torch.load(workdir / f"{case}-rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def read_metrics(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == kind]


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    write_dataset(root / "dataset", SHARDS, NUM_CLASSES)
    return root


@pytest.fixture(scope="module")
def inputs(workdir) -> dict:
    """Tensors of every op case, written for the worker."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    def labels(count, classes):
        return torch.randint(0, classes, (count,), generator=generator)

    data = {
        "loss": {name: (randn(6, 5), randn(11, 5), labels(6, 11)) for name in LOSS_CASES},
        "topk": (randn(sum(UNEVEN_ROWS), 5), randn(11, 5)),
        "fused": (randn(6, 5), randn(11, 5) * 0.5, labels(6, 11)),
        "sampling": (randn(SAMPLE_STEPS, 4, 5), labels(SAMPLE_STEPS * 4, 40).view(SAMPLE_STEPS, 4), randn(40, 5)),
        "state": {"momentum_buffer": randn(7, 3), "step": torch.arange(7, dtype=torch.float32), "scalar": torch.tensor(3.0)},
    }
    torch.save(data, workdir / "inputs.pt")
    return data


@pytest.fixture(scope="module")
def one_process_run(workdir) -> Path:
    """Two steps in this process, copied to run-1to2 for the worker to resume on two processes."""
    run_dir = workdir / "run-1"
    train(workdir / "dataset", run_dir, replace(TRAIN_CONFIG, steps=2))
    shutil.copytree(run_dir, workdir / "run-1to2")
    return run_dir


@pytest.fixture(scope="module")
def worker(workdir, inputs, one_process_run) -> Path:
    code, output = run_torchrun([str(WORKER), str(workdir)], cwd=workdir)
    assert code == 0, output[-6000:]
    return workdir


@pytest.fixture(scope="module")
def fused_run(workdir) -> tuple[Path, str]:
    """`toolkit train --fused-head-update` on two processes."""
    run_dir = workdir / "run-fused"
    flags = [
        "--arch", TRAIN_CONFIG.arch, "--embedding-dim", str(TRAIN_CONFIG.embedding_dim),
        "--image-size", str(TRAIN_CONFIG.image_size), "--batch-size", str(TRAIN_CONFIG.batch_size),
        "--workers", "0", "--lr", str(TRAIN_CONFIG.lr), "--warmup-steps", str(TRAIN_CONFIG.warmup_steps),
        "--epochs", str(TRAIN_CONFIG.epochs), "--log-every", "1", "--class-chunk", str(TRAIN_CONFIG.class_chunk),
        "--device", "cpu", "--precision", "fp32", "--fused-head-update",
    ]
    config_file = workdir / "fused.toml"
    config_file.write_text(f"[train]\nshuffle_buffer = {TRAIN_CONFIG.shuffle_buffer}\n")
    args = ["-m", "toolkit", "train", str(workdir / "dataset"), str(run_dir), "--config", str(config_file), *flags]
    code, output = run_torchrun(args, cwd=workdir)
    assert code == 0, output[-6000:]
    return run_dir, output


# ---------------------------------------------------------------------------------------------
# sharded loss and top-k


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_sharded_loss_matches_chunked(worker, inputs, case):
    x_all, weight_all, labels_all = inputs["loss"][case]
    x = x_all.clone().requires_grad_()
    weight = weight_all.clone().requires_grad_()
    expected = chunked_cross_entropy(x, weight, labels_all, chunk_size=LOSS_CHUNK, **LOSS_CASES[case])
    grad_x, grad_weight = torch.autograd.grad(expected, (x, weight))
    with torch.no_grad():
        per_row = chunked_cross_entropy(x_all, weight_all, labels_all, chunk_size=LOSS_CHUNK, reduction="none", **LOSS_CASES[case])

    rows = x_all.shape[0] // WORLD_SIZE
    for rank, results in enumerate(rank_results(worker, "loss")):
        result = results[case]
        start, stop = class_range(weight_all.shape[0], rank, WORLD_SIZE)
        torch.testing.assert_close(result["loss"], expected.detach(), **LOSS_TOL)
        torch.testing.assert_close(result["grad_x"], grad_x[rank * rows : (rank + 1) * rows], **GRAD_TOL)
        torch.testing.assert_close(result["grad_weight"], grad_weight[start:stop], **GRAD_TOL)
        first = sum(UNEVEN_ROWS[:rank])
        torch.testing.assert_close(result["uneven"], per_row[first : first + UNEVEN_ROWS[rank]], **LOSS_TOL)


@pytest.mark.slow
def test_sharded_loss_matches_cross_entropy(worker, inputs):
    x_all, weight_all, labels_all = inputs["loss"]["linear"]
    expected = F.cross_entropy(x_all @ weight_all.T, labels_all)
    for results in rank_results(worker, "loss"):
        torch.testing.assert_close(results["linear"]["loss"], expected, **LOSS_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("rows", ["uneven", "empty"])
@pytest.mark.parametrize("logits", ["linear", "cosine"])
def test_sharded_topk_matches_topk(worker, inputs, rows, logits):
    x_all, weight_all = inputs["topk"]
    if logits == "cosine":
        scores = F.normalize(x_all, dim=1) @ F.normalize(weight_all, dim=1).T
    else:
        scores = x_all @ weight_all.T
    values, indices = scores.topk(TOPK, dim=1)
    sizes = UNEVEN_ROWS if rows == "uneven" else (x_all.shape[0], 0)
    for rank, results in enumerate(rank_results(worker, "topk")):
        got_values, got_indices = results[f"{rows}-{logits}"]
        first = sum(sizes[:rank])
        assert got_indices.shape == (sizes[rank], TOPK)
        assert torch.equal(got_indices, indices[first : first + sizes[rank]])
        torch.testing.assert_close(got_values, values[first : first + sizes[rank]], **LOSS_TOL)


# ---------------------------------------------------------------------------------------------
# fused head update


def sgd_reference(weight: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the weight after `steps` torch.optim.SGD steps on the chunked loss, and the first step's grad x."""
    weight = weight.clone().requires_grad_()
    optimizer = torch.optim.SGD([weight], nesterov=True, **FUSED_SETTINGS)
    first_grad_x = None
    for _ in range(steps):
        x_leaf = x.clone().requires_grad_()
        loss = chunked_cross_entropy(x_leaf, weight, labels, chunk_size=LOSS_CHUNK)
        loss.backward()
        if first_grad_x is None:
            first_grad_x = x_leaf.grad
        optimizer.step()
        optimizer.zero_grad()
    return weight.detach(), first_grad_x


@pytest.mark.slow
def test_fused_update_sharded_matches_sgd(worker, inputs):
    x_all, weight_all, labels_all = inputs["fused"]
    expected, grad_x = sgd_reference(weight_all, x_all, labels_all, FUSED_STEPS)
    rows = x_all.shape[0] // WORLD_SIZE
    for rank, result in enumerate(rank_results(worker, "fused")):
        start, stop = class_range(weight_all.shape[0], rank, WORLD_SIZE)
        torch.testing.assert_close(result["weight"], expected[start:stop], **GRAD_TOL)
        torch.testing.assert_close(result["grads_x"][0], grad_x[rank * rows : (rank + 1) * rows], **GRAD_TOL)


def test_fused_update_matches_unfused():
    torch.manual_seed(1)
    x_all, labels = torch.randn(6, 5), torch.randint(0, 11, (6,))
    plain = ClassHead(11, 5, chunk_size=LOSS_CHUNK)
    fused = ShardedClassHead.from_head(plain)
    fused.weight.requires_grad_(False)
    optimizer = RowOptimizer(fused.weight, TrainConfig(optimizer="sgd", **FUSED_SETTINGS))
    fused.row_update = optimizer.update
    reference = torch.optim.SGD(plain.parameters(), nesterov=True, **FUSED_SETTINGS)
    for _ in range(FUSED_STEPS):
        x_plain = x_all.clone().requires_grad_()
        plain.loss(x_plain, labels).backward()
        reference.step()
        reference.zero_grad()
        x_fused = x_all.clone().requires_grad_()
        fused.loss(x_fused, labels).backward()
        assert fused.weight.grad is None
        torch.testing.assert_close(x_fused.grad, x_plain.grad, **GRAD_TOL)
    torch.testing.assert_close(fused.weight, plain.weight.detach(), **GRAD_TOL)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"optimizer": "adamw"}, "--optimizer sgd"),
        ({"grad_accum": 2}, "--grad-accum 1"),
        ({"clip_grad": 1.0}, "--clip-grad 0"),
    ],
)
def test_fused_update_rejects_settings(change, message):
    config = replace(TrainConfig(fused_head_update=True), **change)
    with pytest.raises(ConfigError, match=message):
        check_head_update(config, Precision("fp32", None, "cpu"))


def test_row_updates_reject_fp16_scaler():
    fp16 = Precision("fp16", torch.float16, "cuda")
    with pytest.raises(ConfigError, match="fp16"):
        check_head_update(TrainConfig(fused_head_update=True), fp16)
    with pytest.raises(ConfigError, match="fp16"):
        check_head_update(TrainConfig(class_sample_rate=0.5), fp16)


@pytest.mark.parametrize("rate", [0.0, 1.5])
def test_sample_rate_rejects_value(rate):
    with pytest.raises(ConfigError, match="class_sample_rate"):
        check_head_update(TrainConfig(class_sample_rate=rate), Precision("fp32", None, "cpu"))


# ---------------------------------------------------------------------------------------------
# class sampling


@pytest.mark.slow
@pytest.mark.parametrize("rate", [1.0, 0.99])
def test_sampling_keeping_all_rows_is_exact(worker, inputs, rate):
    x_all, weight_all, labels_all = inputs["loss"]["smoothing"]
    weight = weight_all.clone().requires_grad_()
    expected = chunked_cross_entropy(x_all, weight, labels_all, chunk_size=LOSS_CHUNK, label_smoothing=0.1)
    (grad_weight,) = torch.autograd.grad(expected, (weight,))
    for rank, results in enumerate(rank_results(worker, "sampling")):
        result = results[rate]
        start, stop = class_range(weight_all.shape[0], rank, WORLD_SIZE)
        assert torch.equal(result["rows"], torch.arange(stop - start))
        torch.testing.assert_close(result["loss"], expected.detach(), **LOSS_TOL)
        torch.testing.assert_close(result["grad"], grad_weight[start:stop], **GRAD_TOL)


def assert_sparse_steps(snapshots, kept, labels_steps, class_start, rows):
    """Check that each step changed only its kept rows and kept every class of its global batch."""
    keep = math.ceil(SAMPLE_RATE * rows)
    for step, kept_rows in enumerate(kept):
        before, after = snapshots[step], snapshots[step + 1]
        local = labels_steps[step] - class_start
        positives = set(local[(local >= 0) & (local < rows)].tolist())
        unused = torch.ones(rows, dtype=torch.bool)
        unused[kept_rows] = False
        assert kept_rows.numel() == max(keep, len(positives))
        assert positives <= set(kept_rows.tolist())
        assert torch.equal(after[unused], before[unused])
        assert not torch.equal(after[kept_rows], before[kept_rows])


@pytest.mark.slow
def test_sampling_leaves_unused_rows(worker, inputs):
    _, labels_steps, weight_all = inputs["sampling"]
    for rank, results in enumerate(rank_results(worker, "sampling")):
        steps = results["steps"]
        start, stop = class_range(weight_all.shape[0], rank, WORLD_SIZE)
        assert steps["class_start"] == start
        assert_sparse_steps(steps["snapshots"], steps["kept"], labels_steps, start, stop - start)


def test_sampling_one_process_leaves_unused_rows():
    torch.manual_seed(2)
    weight_all = torch.randn(40, 5)
    head = ShardedClassHead(weight_all.clone(), 40, 0, chunk_size=LOSS_CHUNK, sample_rate=SAMPLE_RATE).train()
    head.weight.requires_grad_(False)
    optimizer = RowOptimizer(head.weight, TrainConfig(optimizer="sgd", **FUSED_SETTINGS))
    labels_steps = torch.randint(0, 40, (SAMPLE_STEPS, 4))
    snapshots, kept = [head.weight.detach().clone()], []
    for step in range(SAMPLE_STEPS):
        head.seed_sampling(step)
        head.loss(torch.randn(4, 5), labels_steps[step]).backward()
        (sampled,) = head.take_sampled()
        optimizer.step([(sampled.rows, sampled.weight_rows.grad)])
        kept.append(sampled.rows)
        snapshots.append(head.weight.detach().clone())
    assert_sparse_steps(snapshots, kept, labels_steps, 0, 40)


def test_fused_sampled_matches_unfused_sampled():
    torch.manual_seed(4)
    weight_all = torch.randn(40, 5)
    heads, optimizers = [], []
    for fused in (False, True):
        head = ShardedClassHead(weight_all.clone(), 40, 0, chunk_size=LOSS_CHUNK, sample_rate=SAMPLE_RATE).train()
        head.weight.requires_grad_(False)
        optimizer = RowOptimizer(head.weight, TrainConfig(optimizer="sgd", **FUSED_SETTINGS))
        if fused:
            head.row_update = optimizer.update
        heads.append(head)
        optimizers.append(optimizer)
    for step in range(SAMPLE_STEPS):
        x, labels = torch.randn(4, 5), torch.randint(0, 40, (4,))
        for head, optimizer in zip(heads, optimizers):
            head.seed_sampling(step)
            head.loss(x.clone().requires_grad_(), labels).backward()
            (sampled,) = head.take_sampled()
            if head.row_update is None:
                optimizer.step([(sampled.rows, sampled.weight_rows.grad)])
            else:
                assert sampled.weight_rows.grad is None
    torch.testing.assert_close(heads[1].weight, heads[0].weight, **GRAD_TOL)
    assert not torch.equal(heads[1].weight, weight_all)


def test_sampled_rows_sum_repeated_gradients():
    weight = torch.zeros(4, 2)
    optimizer = RowOptimizer(weight, TrainConfig(optimizer="sgd", lr=1.0, momentum=0.0, weight_decay=0.0))
    blocks = [(torch.tensor([0, 2]), torch.ones(2, 2)), (torch.tensor([2, 3]), torch.ones(2, 2))]
    optimizer.step(blocks)
    assert torch.equal(weight, torch.tensor([[-1.0, -1.0], [0.0, 0.0], [-2.0, -2.0], [-1.0, -1.0]]))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_row_optimizer_matches_torch(name):
    torch.manual_seed(3)
    config = TrainConfig(optimizer=name, lr=0.1, weight_decay=0.01)
    weight = torch.randn(6, 3)
    parameter = weight.clone().requires_grad_()
    optimizer = RowOptimizer(weight, config)
    if name == "sgd":
        reference = torch.optim.SGD([parameter], lr=0.1, momentum=config.momentum, nesterov=True, weight_decay=0.01)
    else:
        reference = torch.optim.AdamW([parameter], lr=0.1, weight_decay=0.01)
    for _ in range(3):
        grad = torch.randn(6, 3)
        optimizer.update(slice(0, 2), grad[:2])
        optimizer.update(torch.tensor([2, 3, 4, 5]), grad[2:])
        parameter.grad = grad
        reference.step()
    torch.testing.assert_close(weight, parameter.detach(), **GRAD_TOL)


# ---------------------------------------------------------------------------------------------
# class ranges and launch settings


def test_class_range_covers_classes():
    ranges = [class_range(11, rank, 3) for rank in range(3)]
    assert ranges == [(0, 4), (4, 8), (8, 11)]


def test_class_range_rejects_few_classes():
    with pytest.raises(ValueError, match="at most as many processes as classes"):
        class_range(2, 0, 3)


def test_setup_without_torchrun_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert setup_distributed("cpu") is None


def test_setup_rejects_missing_rank(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="RANK"):
        setup_distributed("cpu")


def test_rank_device_rejects_cuda_index():
    with pytest.raises(ConfigError, match="cuda"):
        rank_device("cuda:1", 0)


# ---------------------------------------------------------------------------------------------
# training runs


def assert_state_close(actual: dict, expected: dict, where: str) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        difference = (actual[name].float() - tensor.float()).abs().max().item()
        assert torch.allclose(actual[name].float(), tensor.float(), **WEIGHT_TOL), f"{where}: {name} differs by {difference}"


def reference_step(dataset, checkpoint: dict | None, step: int) -> dict[str, torch.Tensor]:
    """Redo optimizer step `step` (1-based) of a two-rank run in one process, from the checkpoint of the step before.

    The step embeds rank 0's and rank 1's batch separately, as each rank's BatchNorm does, takes
    the mean loss over both and keeps the running statistics after rank 0's batch, which DDP
    broadcasts from rank 0. checkpoint None starts from the initial weights.
    """
    config = TRAIN_CONFIG
    epoch_steps = steps_per_epoch(dataset, config, WORLD_SIZE)
    torch.manual_seed(config.seed)
    model = build_model(config, dataset.num_classes).train()
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, config.epochs * epoch_steps)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        load_optimizer_states(
            optimizer, model.head.weight, dataset.num_classes, None, checkpoint["optimizer"], checkpoint["head_optimizer"], None
        )
        scheduler.load_state_dict(checkpoint["scheduler"])

    epoch, index = divmod(step - 1, epoch_steps)
    loaders = [build_train_loader(dataset, config, epoch, rank, WORLD_SIZE) for rank in range(WORLD_SIZE)]
    batches = [list(loader)[index] for loader in loaders]
    embeddings = []
    for rank, batch in enumerate(batches):
        embeddings.append(model.embed(normalize_batch(batch.images, torch.device("cpu"))))
        if rank == 0:
            rank0_buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    loss = model.loss(torch.cat(embeddings), torch.cat([batch.labels for batch in batches]))
    loss.backward()
    # after backward, which reads the running statistics that BatchNorm saved
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(rank0_buffers[name])
    optimizer.step()
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.mark.slow
def test_two_processes_match_one(worker):
    dataset = load_dataset(worker / "dataset")
    steps = [load_checkpoint(worker / "steps-dense" / f"step{step}.pt") for step in (1, 2, 3)]
    steps.append(load_checkpoint(worker / "run-dense" / "checkpoints" / "last.pt"))
    assert [checkpoint["step"] for checkpoint in steps] == [1, 2, 3, 4]
    assert steps[-1]["world_size"] == WORLD_SIZE
    for step, checkpoint in enumerate(steps, start=1):
        before = steps[step - 2] if step > 1 else None
        assert_state_close(checkpoint["model"], reference_step(dataset, before, step), f"step {step}")


@pytest.mark.slow
def test_fused_run_matches_unfused(worker, fused_run):
    fused = load_checkpoint(fused_run[0] / "checkpoints" / "last.pt")
    dense = load_checkpoint(worker / "run-dense" / "checkpoints" / "last.pt")
    assert_state_close(fused["model"], dense["model"], "step 4")
    torch.testing.assert_close(fused["head_optimizer"]["momentum_buffer"], dense["head_optimizer"]["momentum_buffer"], **WEIGHT_TOL)
    assert fused["head_optimizer"]["momentum_buffer"].shape == (NUM_CLASSES, TRAIN_CONFIG.embedding_dim)


@pytest.mark.slow
def test_uneven_shards_finish(worker):
    run_dir = worker / "run-dense"
    records = read_metrics(run_dir, "train")
    per_epoch_left_out = sum(SHARDS["train"]) - 2 * TRAIN_CONFIG.batch_size * WORLD_SIZE
    assert [record["step"] for record in records] == [1, 2, 3, 4]
    assert records[-1]["left_out_samples"] == TRAIN_CONFIG.epochs * per_epoch_left_out
    assert records[-1]["repeated_samples"] == 0
    assert records[-1]["skipped_samples"] == 0


@pytest.mark.slow
def test_one_val_shard_counts_samples_once(worker, fused_run):
    for run_dir in (worker / "run-dense", fused_run[0]):
        records = read_metrics(run_dir, "val")
        assert [record["step"] for record in records] == [2, 4]
        assert [record["samples"] for record in records] == [sum(SHARDS["val"])] * 2


@pytest.mark.slow
def test_eval_counts_samples_once(worker):
    expected = eval_summary(run_eval(worker / "run-dense" / "checkpoints" / "last.pt", worker / "dataset", EVAL_CONFIG))
    for result in rank_results(worker, "eval"):
        assert result["overall"] == expected["overall"]
        assert result["overall"][0] == sum(SHARDS["val"])
        assert torch.equal(result["class_samples"], expected["class_samples"])
        assert torch.equal(result["class_top1"], expected["class_top1"])
        assert result["shards"] == expected["shards"]
        torch.testing.assert_close(result["loss_sum"], expected["loss_sum"], **LOSS_TOL)


@pytest.mark.slow
def test_cli_output_from_rank_zero(fused_run):
    run_dir, output = fused_run
    assert output.count("finished at step 4") == 1
    assert len(read_metrics(run_dir, "train")) == 4
    assert "fused_head_update = true" in (run_dir / "config.toml").read_text()


def assert_same_checkpoint(actual: dict, expected: dict) -> None:
    """Compare the states that a resume re-splits: model, both optimizers and schedule."""
    assert sorted(actual["model"]) == sorted(expected["model"])
    for name, tensor in expected["model"].items():
        assert torch.equal(actual["model"][name], tensor), name
    assert sorted(actual["head_optimizer"]) == sorted(expected["head_optimizer"])
    for name, tensor in expected["head_optimizer"].items():
        assert torch.equal(actual["head_optimizer"][name], tensor), name
    assert actual["optimizer"]["param_groups"] == expected["optimizer"]["param_groups"]
    assert sorted(actual["optimizer"]["state"]) == sorted(expected["optimizer"]["state"])
    for index, state in expected["optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(actual["optimizer"]["state"][index][name], tensor), (index, name)
    assert actual["scheduler"] == expected["scheduler"]


@pytest.mark.slow
def test_resume_one_to_two(worker, one_process_run):
    original = load_checkpoint(one_process_run / "checkpoints" / "last.pt")
    resaved = load_checkpoint(worker / "resaved-1to2.pt")
    assert original["world_size"] == 1
    assert resaved["world_size"] == WORLD_SIZE
    assert_same_checkpoint(resaved, original)
    assert original["head_optimizer"]["momentum_buffer"].shape == (NUM_CLASSES, TRAIN_CONFIG.embedding_dim)

    final = load_checkpoint(worker / "run-1to2" / "checkpoints" / "last.pt")
    assert final["step"] == 4
    assert final["model"]["head.weight"].shape == (NUM_CLASSES, TRAIN_CONFIG.embedding_dim)
    assert [record["step"] for record in read_metrics(worker / "run-1to2", "train")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_resume_two_to_one(fused_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(fused_run[0], run_dir)
    original = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    resume = replace(TRAIN_CONFIG, fused_head_update=True, resume=True)

    train(Path(fused_run[0]).parent / "dataset", run_dir, replace(resume, steps=4))
    resaved = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert original["world_size"] == WORLD_SIZE
    assert resaved["world_size"] == 1
    assert_same_checkpoint(resaved, original)

    result = train(Path(fused_run[0]).parent / "dataset", run_dir, replace(resume, steps=5))
    assert result["step"] == 5
    assert math.isfinite(read_metrics(run_dir, "train")[-1]["loss"])


def test_sampled_run_one_process(tmp_path):
    dataset = write_dataset(tmp_path / "dataset", {"train": [8], "val": [2]}, num_classes=6)
    config = replace(TRAIN_CONFIG, steps=2, class_sample_rate=0.4)
    result = train(dataset, tmp_path / "run", config)
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert result["step"] == 2
    assert checkpoint["model"]["head.weight"].shape == (6, TRAIN_CONFIG.embedding_dim)
    assert sorted(checkpoint["head_optimizer"]) == ["momentum_buffer"]
    assert all(math.isfinite(record["loss"]) for record in read_metrics(tmp_path / "run", "train"))
