import json
import math
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from toolkit.cli import app
from toolkit.config import ConfigError, TrainConfig
from toolkit.train import TrainingError, load_checkpoint, model_from_checkpoint, train
from toolkit.train.optim import build_scheduler, lr_factor, parameter_groups
from toolkit.train.precision import resolve_precision

TINY = TrainConfig(
    arch="resnet18",
    embedding_dim=32,
    image_size=32,
    batch_size=8,
    workers=0,
    lr=0.05,
    warmup_steps=2,
    epochs=2,
    log_every=1,
    save_every=1000,
    class_chunk=4,
    device="cpu",
    precision="fp32",
)


def read_metrics(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == kind]


def test_train_lowers_loss(tiny_dataset, tmp_path):
    result = train(tiny_dataset, tmp_path / "run", replace(TINY, epochs=6, lr=0.1))
    losses = [record["loss"] for record in read_metrics(tmp_path / "run", "train")]
    assert len(losses) == result["step"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    assert (tmp_path / "run" / "config.toml").is_file()


def test_checkpoint_loads_weights_only(tiny_dataset, tmp_path):
    train(tiny_dataset, tmp_path / "run", replace(TINY, epochs=1))
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    checkpoint = torch.load(path, weights_only=True)
    for key in ("model", "optimizer", "scaler", "scheduler", "step", "epoch", "rng", "classes", "config"):
        assert key in checkpoint
    model, classes, config = model_from_checkpoint(load_checkpoint(path), path)
    assert classes == [f"class_{index:05d}" for index in range(6)]
    assert config.arch == "resnet18"
    assert model.head.weight.shape == (6, 32)


def test_resume_equals_uninterrupted(tiny_dataset, tmp_path):
    config = replace(TINY, epochs=3, save_every=3)
    train(tiny_dataset, tmp_path / "whole", config)

    class Interrupt(Exception):
        pass

    def stop_at_step_7(event):
        # an epoch has 4 or 5 steps, so step 7 falls inside the second epoch, after the save at step 6
        if event.get("step") == 7 and event["kind"] in ("step", "train"):
            raise Interrupt

    with pytest.raises(Interrupt):
        train(tiny_dataset, tmp_path / "parts", config, progress=stop_at_step_7)
    interrupted = load_checkpoint(tmp_path / "parts" / "checkpoints" / "last.pt")
    assert interrupted["step"] == 6
    assert interrupted["epoch_step"] > 0
    train(tiny_dataset, tmp_path / "parts", replace(config, resume=True))

    whole = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    parts = load_checkpoint(tmp_path / "parts" / "checkpoints" / "last.pt")
    assert whole["step"] == parts["step"]
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, parts["model"][name]), name


def test_existing_run_needs_resume(tiny_dataset, tmp_path):
    train(tiny_dataset, tmp_path / "run", replace(TINY, steps=1))
    with pytest.raises(TrainingError, match="--resume"):
        train(tiny_dataset, tmp_path / "run", replace(TINY, steps=1))


def test_resume_rejects_changed_settings(tiny_dataset, tmp_path):
    train(tiny_dataset, tmp_path / "run", replace(TINY, steps=1))
    with pytest.raises(TrainingError, match="lr"):
        train(tiny_dataset, tmp_path / "run", replace(TINY, steps=2, lr=0.5, resume=True))


def test_nonfinite_loss_stops_run(tiny_dataset, tmp_path, monkeypatch):
    from toolkit.model import Classifier

    monkeypatch.setattr(Classifier, "forward", lambda self, images, labels: torch.tensor(math.nan, requires_grad=True))
    with pytest.raises(TrainingError, match="not finite for 3 steps"):
        train(tiny_dataset, tmp_path / "run", replace(TINY, max_bad_steps=3))


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, warmup_steps=4, total_steps=10, min_factor=0.0) == pytest.approx(0.25)
    assert lr_factor(3, warmup_steps=4, total_steps=10, min_factor=0.0) == pytest.approx(1.0)
    assert lr_factor(4, warmup_steps=4, total_steps=10, min_factor=0.0) == pytest.approx(1.0)
    assert lr_factor(7, warmup_steps=4, total_steps=10, min_factor=0.0) == pytest.approx(0.5)
    assert lr_factor(10, warmup_steps=4, total_steps=10, min_factor=0.1) == pytest.approx(0.1)


def test_scheduler_steps_per_optimizer_step():
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = build_scheduler(optimizer, replace(TINY, lr=1.0, warmup_steps=2), total_steps=6)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:2] == pytest.approx([0.5, 1.0])
    assert rates[2] == pytest.approx(1.0)
    assert rates[5] < rates[3]


def test_no_weight_decay_on_norm_and_bias():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    assert [tuple(p.shape) for p in decay["params"]] == [(4, 3)]
    assert len(no_decay["params"]) == 3
    assert no_decay["weight_decay"] == 0.0


def test_precision_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_precision("bf16", cpu).dtype == torch.bfloat16
    assert resolve_precision("fp32", cpu).dtype is None
    assert resolve_precision("auto", cpu).name in ("bf16", "fp32")
    with pytest.raises(ConfigError, match="fp16"):
        resolve_precision("fp16", cpu)


def test_bf16_autocast_step_on_cpu(tiny_dataset, tmp_path):
    result = train(tiny_dataset, tmp_path / "run", replace(TINY, steps=2, precision="bf16"))
    assert result["step"] == 2
    assert math.isfinite(read_metrics(tmp_path / "run", "train")[-1]["loss"])


def test_cli_config_and_flags(tiny_dataset, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        '[train]\narch = "resnet18"\nembedding_dim = 16\nimage_size = 32\nbatch_size = 4\n'
        'workers = 0\nsteps = 50\ndevice = "cpu"\nprecision = "fp32"\nclass_chunk = 4\n'
    )
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(tiny_dataset), str(run_dir), "--config", str(recipe), "--steps", "2"])
    assert result.exit_code == 0, result.output
    saved = (run_dir / "config.toml").read_text()
    assert "steps = 2\n" in saved
    assert "embedding_dim = 16\n" in saved


def test_cli_resume_reads_run_config(tiny_dataset, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        '[train]\narch = "resnet18"\nembedding_dim = 16\nimage_size = 32\nbatch_size = 4\n'
        'workers = 0\nsteps = 2\ndevice = "cpu"\nprecision = "fp32"\nclass_chunk = 4\n'
    )
    run_dir = tmp_path / "run"
    first = CliRunner().invoke(app, ["train", str(tiny_dataset), str(run_dir), "--config", str(recipe)])
    assert first.exit_code == 0, first.output

    # neither the recipe nor its options again: the run's config.toml supplies them
    resumed = CliRunner().invoke(app, ["train", str(tiny_dataset), str(run_dir), "--resume", "--steps", "3"])
    assert resumed.exit_code == 0, resumed.output
    assert "finished at step 3" in resumed.output
    assert "steps = 3\n" in (run_dir / "config.toml").read_text()


def test_cli_rejects_unknown_key(tiny_dataset, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[train]\nbatchsize = 4\n")
    result = CliRunner().invoke(app, ["train", str(tiny_dataset), str(tmp_path / "run"), "--config", str(recipe)])
    assert result.exit_code == 1
    assert "batchsize" in result.output


def test_grad_accum_and_clipping_step_count(tiny_dataset, tmp_path):
    plain = train(tiny_dataset, tmp_path / "plain", replace(TINY, batch_size=4, epochs=1))
    accumulated = train(tiny_dataset, tmp_path / "accum", replace(TINY, batch_size=4, epochs=1, grad_accum=2, clip_grad=1.0))
    # two micro-batches make one optimizer step, so an epoch has half the steps (rounded down)
    assert accumulated["step"] == plain["step"] // 2
    losses = [record["loss"] for record in read_metrics(tmp_path / "accum", "train")]
    assert len(losses) == accumulated["step"]
    assert all(math.isfinite(loss) for loss in losses)


def test_clipping_bounds_update(tiny_dataset, tmp_path):
    # with a tiny clip norm and plain SGD without momentum, one step moves the weights by at most lr * clip
    config = replace(TINY, steps=1, clip_grad=1e-3, lr=1.0, momentum=0.0, warmup_steps=0, weight_decay=0.0)
    torch.manual_seed(config.seed)
    from toolkit.model import build_model

    initial = build_model(config, 6).state_dict()
    train(tiny_dataset, tmp_path / "run", config)
    final = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    squared = sum(float((final[name].float() - initial[name].float()).pow(2).sum()) for name in initial if initial[name].is_floating_point() and "running" not in name)
    assert math.sqrt(squared) <= 1e-3 * 1.0 + 1e-6
