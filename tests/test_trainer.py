"""The trainer on a tiny CPU config: metrics contract, checkpoints, evaluation, health, options."""
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import paddle
import pytest

from passl import distributed
from passl.config import load_config
from passl.engine.amp import MixedPrecision
from passl.engine.hooks.health_hook import HealthHook, TrainingDiverged
from passl.engine.trainer import Trainer
from passl.errors import ConfigError, UserError
from passl.io import checkpoint
from passl.io.metrics_log import MetricsLog, read_metrics
from passl.solver.optimizers import build_optimizer
from test_lr_scheduler import reference_swav_schedule
from toy_training import toy_config, write_config

HERE = os.path.dirname(os.path.abspath(__file__))
CONTRACT_KEYS = {"epoch", "iter", "loss", "lr", "ips"}


def make_trainer(tmp_path, name="run", **kwargs):
    trainer_args = {k: kwargs.pop(k) for k in ("resume", "pretrained", "load") if k in kwargs}
    cfg = toy_config(tmp_path / name, **kwargs)
    return Trainer(load_config(write_config(cfg, tmp_path / f"{name}.yaml")), **trainer_args)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One 3-epoch run with evaluation, keeping the last 2 checkpoints."""
    tmp_path = tmp_path_factory.mktemp("trainer")
    trainer = make_trainer(tmp_path, val=True, hooks=[
        {"name": "ToyEngineAccuracy"}, {"name": "CheckpointHook", "keep_last": 2}])
    trainer.train()
    return trainer


def test_metrics_jsonl_has_contract_keys_and_reference_lrs(finished_run):
    records = read_metrics(os.path.join(finished_run.output_dir, "metrics.jsonl"))
    train = [r for r in records if r["type"] == "train"]
    assert all(CONTRACT_KEYS <= r.keys() for r in train)
    assert [r["iter"] for r in train] == list(range(1, 13))
    assert [r["epoch"] for r in train] == [1] * 4 + [2] * 4 + [3] * 4
    np.testing.assert_allclose([r["lr"] for r in train],
                               reference_swav_schedule(1.0, 0.01, 0.1, 1, 3, 4), rtol=1e-12)
    assert all(r["ips"] > 0 and "abs_out" in r for r in train)
    assert np.mean([r["loss"] for r in train[-4:]]) < np.mean([r["loss"] for r in train[:4]])
    evals = [r for r in records if r["type"] == "eval"]
    assert [(r["epoch"], r["iter"]) for r in evals] == [(1, 4), (2, 8), (3, 12)]
    assert all(0 <= r["top1"] <= 100 for r in evals)
    summary = records[-1]
    assert summary["type"] == "summary" and summary["completed"] is True
    assert summary["iter"] == 12 and summary["mean_ips"] > 0 and summary["peak_memory_mb"] > 0


def test_checkpoints_keep_last_and_latest_pointer(finished_run):
    directory = checkpoint.checkpoint_dir(finished_run.output_dir)
    assert [e for e, _ in checkpoint.epoch_checkpoints(directory)] == [2, 3]
    latest = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(finished_run.output_dir))
    assert (latest["epoch"], latest["iter"], latest["world_size"]) == (3, 12, 1)
    for name, param in finished_run.model.state_dict().items():
        np.testing.assert_array_equal(latest["model"][name].numpy(), param.numpy())
    assert load_config(os.path.join(finished_run.output_dir, "config.yaml"))["epochs"] == 3


def test_default_hooks_are_added_once_and_config_blocks_win(finished_run):
    names = [type(h).__name__ for h in finished_run.hooks]
    assert sorted(names) == ["CheckpointHook", "HealthHook", "LoggerHook", "ToyEngineAccuracy"]
    by_name = {type(h).__name__: h for h in finished_run.hooks}
    assert by_name["CheckpointHook"].keep_last == 2      # the config's block, not the default
    assert by_name["LoggerHook"].log_interval == 1        # top-level log_interval reached it
    priorities = [h.priority for h in finished_run.hooks]
    assert priorities == sorted(priorities)


def test_load_then_evaluate_reproduces_the_last_evaluation(finished_run, tmp_path):
    latest = checkpoint.latest_checkpoint(finished_run.output_dir)
    trainer = make_trainer(tmp_path, val=True, hooks=[{"name": "ToyEngineAccuracy"}], load=latest)
    last_eval = read_metrics(os.path.join(finished_run.output_dir, "metrics.jsonl"), "eval")[-1]
    assert trainer.evaluate()["top1"] == last_eval["top1"]
    with pytest.raises(UserError, match="nothing to evaluate"):
        make_trainer(tmp_path, name="no_eval").evaluate()
    with pytest.raises(ConfigError, match="hooks: LoggerHook is listed twice"):
        make_trainer(tmp_path, name="twice", hooks=[{"name": "LoggerHook"}])


def test_pretrained_loads_the_backbone_and_refuses_mismatches(tmp_path):
    source = make_trainer(tmp_path, name="source")
    weights = tmp_path / "backbone.pdparams"
    paddle.save(source.model.backbone.state_dict(), str(weights))
    trainer = make_trainer(tmp_path, name="target", pretrained=str(weights))
    expected = source.model.backbone.state_dict()
    for name, param in trainer.model.backbone.state_dict().items():
        np.testing.assert_array_equal(param.numpy(), expected[name].numpy())
    cfg = toy_config(tmp_path / "wide")
    cfg["model"]["hidden"] = 12
    with pytest.raises(UserError, match="mismatched"):
        Trainer(load_config(write_config(cfg, tmp_path / "wide.yaml")), pretrained=str(weights))


def test_non_finite_loss_stops_before_the_update(tmp_path):
    trainer = make_trainer(tmp_path, hooks=[{"name": "ToyEngineNaN", "at_iter": 6}])
    with pytest.raises(TrainingDiverged) as error:
        trainer.train()
    message = str(error.value)
    assert "\n" not in message
    assert "iteration 7 (epoch 2)" in message and "epoch_1.pd" in message
    assert all(np.isfinite(p.numpy()).all() for p in trainer.model.parameters())
    directory = checkpoint.checkpoint_dir(trainer.output_dir)
    assert [e for e, _ in checkpoint.epoch_checkpoints(directory)] == [1]
    assert os.path.realpath(checkpoint.latest_checkpoint(trainer.output_dir)).endswith("epoch_1.pd")
    records = read_metrics(os.path.join(trainer.output_dir, "metrics.jsonl"))
    assert [r["event"] for r in records if r["type"] == "event"] == ["non_finite_loss"]
    assert records[-1]["type"] == "summary" and records[-1]["completed"] is False


def test_non_finite_loss_is_one_error_line_from_the_cli(tmp_path):
    cfg = toy_config(tmp_path / "out", hooks=[{"name": "ToyEngineNaN", "at_iter": 2}])
    result = subprocess.run([sys.executable, os.path.join(HERE, "toy_train_cli.py"),
                             "-c", write_config(cfg, tmp_path / "cfg.yaml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "non-finite loss" in error_lines[0]
    assert "no checkpoint was written yet" in error_lines[0]


class RecordingLogger:
    def __init__(self):
        self.warnings = []

    def warning(self, message):
        self.warnings.append(message)


def collapse_trainer(tmp_path, num_prototypes=10, freeze_iters=3):
    head = SimpleNamespace(prototype_weights=lambda: [paddle.zeros([4, num_prototypes])])
    return SimpleNamespace(model=SimpleNamespace(head=head),
                           hooks=[SimpleNamespace(freeze_iters=freeze_iters)],
                           logger=RecordingLogger(), metrics=MetricsLog(str(tmp_path / "m.jsonl")),
                           output_dir=str(tmp_path), epoch=0, iter=0, outputs=None,
                           world_size=1)


def drive(hook, trainer, losses, logs=None):
    hook.before_run(trainer)
    hook.before_epoch(trainer)
    trainer.iters_per_epoch = len(losses)
    for trainer.iter, loss in enumerate(losses):
        trainer.inner_iter = trainer.iter
        trainer.outputs = {"loss": paddle.to_tensor(loss), "logs": logs or {}}
        hook.after_backward(trainer)


def test_collapse_to_uniform_assignments_warns_once_after_the_freeze(tmp_path):
    trainer, ln_k = collapse_trainer(tmp_path), math.log(10)
    hook = HealthHook(collapse_window=5)
    drive(hook, trainer, [ln_k] * 3 + [ln_k * 1.005] * 12, logs={"prototypes_used": 0.1})
    assert len(trainer.logger.warnings) == 1
    warning = trainer.logger.warnings[0]
    assert "ln K = 2.303" in warning and "iteration 8" in warning
    assert "prototypes used in the last batch: 10.0%" in warning
    assert [r["event"] for r in read_metrics(trainer.metrics.path)] == ["assignments_collapsed"]


def test_no_collapse_warning_for_a_falling_loss_or_during_the_freeze(tmp_path):
    trainer, ln_k = collapse_trainer(tmp_path, freeze_iters=20), math.log(10)
    drive(HealthHook(collapse_window=5), trainer, [ln_k] * 20 + [ln_k * 0.9] * 10)
    assert trainer.logger.warnings == []


def test_amp_falls_back_on_cpu_and_rejects_bad_settings():
    amp = MixedPrecision({"enable": True, "dtype": "bfloat16"}, device="cpu")
    assert not amp.enabled and amp.scaler is None and amp.state_dict() == {}
    with pytest.raises(ConfigError, match="amp.level"):
        MixedPrecision({"enable": True, "level": "O2"}, device="gpu")
    with pytest.raises(ConfigError, match="amp.dtype"):
        MixedPrecision({"dtype": "float8"}, device="cpu")
    with pytest.raises(ConfigError, match=r"amp.enabled: unknown key \(did you mean: enable\?\)"):
        MixedPrecision({"enabled": True}, device="cpu")


def test_grad_clip_bounds_the_global_gradient_norm():
    layer = paddle.nn.Linear(4, 3)
    before = [p.numpy().copy() for p in layer.parameters()]
    optimizer = build_optimizer({"name": "SGD", "momentum": 0.0}, layer, 1.0, grad_clip=1e-3)
    (layer(paddle.ones([2, 4])) * 100).sum().backward()
    optimizer.step()
    step = np.sqrt(sum(((p.numpy() - b) ** 2).sum() for p, b in zip(layer.parameters(), before)))
    assert step == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(ConfigError, match="grad_clip"):
        build_optimizer({"name": "SGD"}, layer, 1.0, grad_clip=-1)
    with pytest.raises(ConfigError, match="optimizer.learning_rate"):
        build_optimizer({"name": "SGD", "learning_rate": 0.1}, layer, 1.0)


def test_metrics_log_truncates_for_resume_and_tolerates_a_torn_last_line(tmp_path):
    log = MetricsLog(str(tmp_path / "metrics.jsonl"))
    for step in (1, 2, 3):
        log.write({"type": "train", "iter": step, "loss": float("nan") if step == 3 else 0.5,
                   "lr": np.float32(0.1), "ips": paddle.to_tensor(2.0)})
    log.write({"type": "summary", "iter": 3})
    with open(log.path, "a") as f:
        f.write('{"type": "train", "it')            # killed while writing
    records = read_metrics(log.path)
    assert [r["iter"] for r in records] == [1, 2, 3, 3] and records[2]["loss"] == "nan"
    assert records[0]["lr"] == pytest.approx(0.1) and records[0]["ips"] == 2.0
    log.truncate_after(2)
    assert [(r["type"], r["iter"]) for r in read_metrics(log.path)] == [("train", 1), ("train", 2)]


def test_visualdl_sink_receives_the_numbers_of_every_record(tmp_path, monkeypatch):
    written = []

    class FakeLogWriter:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, tag, step, value):
            written.append((tag, step, value))

    monkeypatch.setitem(sys.modules, "visualdl", SimpleNamespace(LogWriter=FakeLogWriter))
    cfg = toy_config(tmp_path / "run", epochs=1)
    cfg["hooks"] = [{"name": "LoggerHook", "progress_bar": True, "visualdl": True,
                     "log_interval": 2}]
    trainer = Trainer(load_config(write_config(cfg, tmp_path / "run.yaml")))
    trainer.train()
    first_record = read_metrics(trainer.metrics.path, "train")[0]
    assert ("train/loss", 2, pytest.approx(first_record["loss"])) in written
    assert {tag for tag, _, _ in written} >= {"train/loss", "train/lr", "train/ips",
                                              "summary/mean_ips"}


def test_evaluate_only_builds_the_same_random_model_on_every_rank(tmp_path, monkeypatch):
    """`--evaluate-only --as-built` with several processes: no DataParallel broadcast follows,
    so each rank must draw the same initial weights (training ranks draw their own streams)."""
    def weights(rank, evaluate_only):
        monkeypatch.setattr(distributed, "get_rank", lambda: rank)
        cfg = toy_config(tmp_path / f"rank{rank}_{evaluate_only}")
        trainer = Trainer(load_config(write_config(cfg, tmp_path / "cfg.yaml")),
                          evaluate_only=evaluate_only)
        return [p.numpy() for p in trainer.model.parameters()]
    for rank0, rank1 in zip(weights(0, True), weights(1, True)):
        np.testing.assert_array_equal(rank0, rank1)
    assert not np.array_equal(weights(0, False)[0], weights(1, False)[0])
