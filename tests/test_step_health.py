"""Per-step health without per-step host reads, and float16 AMP's skipped steps."""
import math
import os
import types

import numpy as np
import paddle
import pytest

from passl.config import load_config
from passl.engine.hooks.health_hook import HealthHook, TrainingDiverged
from passl.engine.hooks.logger_hook import LoggerHook
from passl.engine.trainer import Trainer
from passl.io.metrics_log import MetricsLog, read_metrics
from toy_training import force_float16_scaler, toy_config, write_config


class Logs:
    def __init__(self):
        self.lines = []

    def info(self, message):
        self.lines.append(message)

    warning = info


def fake_trainer(tmp_path, iters_per_epoch):
    return types.SimpleNamespace(
        epoch=0, epochs=1, iter=0, inner_iter=0, iters_per_epoch=iters_per_epoch,
        world_size=1, rank=0, batch_images=2, start_epoch=0, output_dir=str(tmp_path),
        metrics=MetricsLog(str(tmp_path / "metrics.jsonl")), logger=Logs(),
        optimizer=types.SimpleNamespace(get_lr=lambda: 0.5), amp=types.SimpleNamespace(),
        model=types.SimpleNamespace(), hooks=[], outputs=None)


def test_loss_and_logs_are_read_on_the_host_only_when_a_record_is_written(tmp_path, host_reads):
    trainer = fake_trainer(tmp_path, iters_per_epoch=8)
    logger, health = LoggerHook(log_interval=4, progress_bar=False), HealthHook()
    trainer.hooks = [health, logger]
    for hook in trainer.hooks:
        hook.before_run(trainer)
        hook.before_epoch(trainer)
    losses, used = [1.0, 2.0, 3.0, 6.0, 1.5, 2.5, 3.5, 4.5], [0.25, 0.5, 0.75, 1.0] * 2
    reads_after_step = []
    for trainer.inner_iter, (loss, share) in enumerate(zip(losses, used)):
        trainer.iter = trainer.inner_iter
        trainer.outputs = {"loss": paddle.to_tensor(loss),
                           "logs": {"prototypes_used": paddle.to_tensor(share),
                                    "queue_in_use": 0.0}}
        health.after_backward(trainer)
        for hook in trainer.hooks:
            hook.after_iter(trainer)
        reads_after_step.append(len(host_reads))
    # no read in steps 1-3 and 5-7; the record steps 4 and 8 read (at most a few times)
    assert reads_after_step[0:3] == [0, 0, 0]
    assert reads_after_step[4:7] == [reads_after_step[3]] * 3
    assert 0 < reads_after_step[3] <= 4
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["iter"] for r in records] == [4, 8]
    assert [r["loss"] for r in records] == [3.0, 3.0]
    assert [r["prototypes_used"] for r in records] == [0.625, 0.625]
    assert health.check_interval == 4  # the LoggerHook's interval


def drive(hook, trainer, losses):
    trainer.iters_per_epoch = len(losses)
    hook.before_run(trainer)
    hook.before_epoch(trainer)
    for trainer.iter, loss in enumerate(losses):
        trainer.inner_iter = trainer.iter
        trainer.outputs = {"loss": paddle.to_tensor(loss), "logs": {}}
        hook.after_backward(trainer)


def test_a_non_finite_loss_is_found_at_the_next_check_and_named_by_its_iteration(tmp_path):
    trainer = fake_trainer(tmp_path, iters_per_epoch=8)
    hook = HealthHook(check_interval=4)
    with pytest.raises(TrainingDiverged) as error:
        drive(hook, trainer, [1.0, float("nan"), 1.0, 1.0, 1.0])
    assert trainer.iter == 3  # found at the 4th step's check, not at the 2nd step
    message = str(error.value)
    assert message.startswith("non-finite loss (nan) at iteration 2 (epoch 1); found at the "
                              "check of iteration 4 (HealthHook.check_interval=4)")
    event = read_metrics(str(tmp_path / "metrics.jsonl"))[-1]
    assert (event["event"], event["iter"]) == ("non_finite_loss", 2)


def test_health_hook_rejects_bad_limits():
    with pytest.raises(Exception, match=r"HealthHook.max_consecutive_bad_steps: expected an "
                                        r"integer >= 1, got 0"):
        HealthHook(max_consecutive_bad_steps=0)
    with pytest.raises(Exception, match="HealthHook.check_interval"):
        HealthHook(check_interval=0)


FLOAT16 = {"enable": True, "dtype": "float16"}


def float16_trainer(tmp_path, monkeypatch, hooks, name="out", **trainer_args):
    force_float16_scaler(monkeypatch)
    cfg = toy_config(tmp_path / name, epochs=2, hooks=hooks, amp=FLOAT16)
    trainer = Trainer(load_config(write_config(cfg, tmp_path / f"{name}.yaml")), **trainer_args)
    assert trainer.amp.describe() == "float16 O1 with loss scaling"
    return trainer


def test_float16_non_finite_steps_are_skipped_counted_and_training_goes_on(tmp_path, monkeypatch):
    trainer = float16_trainer(tmp_path, monkeypatch,
                              [{"name": "ToyEngineNaN", "at_iter": 2, "until": 4}])
    trainer.train()
    assert trainer.completed
    assert all(np.isfinite(p.numpy()).all() for p in trainer.model.parameters())
    train = read_metrics(os.path.join(trainer.output_dir, "metrics.jsonl"), "train")
    assert [r["skipped_steps"] for r in train] == [0, 0, 1, 1, 0, 0, 0, 0]
    assert train[2]["loss"] == "nan" and math.isfinite(train[4]["loss"])  # all steps skipped
    assert float(trainer.amp.scaler._scale) == 2.0 ** 16 / 4  # halved per skipped step


def test_float16_too_many_bad_steps_in_a_row_stop_the_run(tmp_path, monkeypatch):
    trainer = float16_trainer(tmp_path, monkeypatch, [
        {"name": "ToyEngineNaN", "at_iter": 2},
        {"name": "HealthHook", "max_consecutive_bad_steps": 3}])
    before = None

    def remember(trainer_):
        nonlocal before
        if trainer_.iter == 2:
            before = [p.numpy().copy() for p in trainer_.model.parameters()]
    trainer.hooks[0].before_iter = remember
    with pytest.raises(TrainingDiverged) as error:
        trainer.train()
    assert str(error.value).startswith(
        "3 float16 steps in a row skipped for non-finite loss or gradients "
        "(HealthHook.max_consecutive_bad_steps=3) up to iteration 5 (epoch 2); the weights "
        "were not updated by those steps")
    for saved, param in zip(before, trainer.model.parameters()):
        np.testing.assert_array_equal(saved, param.numpy())


def saved_form(state):
    return {key: np.asarray(value).tolist() for key, value in state.items()}


def test_a_float16_run_resumes_its_loss_scale_through_the_checkpoint_file(tmp_path, monkeypatch):
    """Paddle's GradScaler.load_state_dict reads ``scale[0]``: the scaler state must go into the
    checkpoint file in that form, and the resumed run must continue exactly."""
    skipped_once = [{"name": "ToyEngineNaN", "at_iter": 1, "until": 2}]  # the scale halves
    whole = float16_trainer(tmp_path, monkeypatch, skipped_once, name="whole")
    whole.train()
    first = float16_trainer(tmp_path, monkeypatch, skipped_once, name="split")
    first.epochs = 1  # stop after epoch 1 (the schedule was built for 2)
    first.train()
    resumed = float16_trainer(tmp_path, monkeypatch, skipped_once, name="split", resume="auto")
    saved = first.amp.state_dict()
    assert saved["scale"].shape == (1,) and saved["scale"][0] == 2.0 ** 15
    assert saved_form(resumed.amp.state_dict()) == saved_form(saved)
    resumed.train()
    assert saved_form(resumed.amp.state_dict()) == saved_form(whole.amp.state_dict())
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # checkpoints written before the fix hold a 0-d scale: they resume too
    resumed.amp.set_state_dict({**saved, "scale": np.array(1024.0, dtype="float32")})
    assert resumed.amp.state_dict()["scale"].tolist() == [1024.0]


def test_bfloat16_on_a_gpu_without_it_falls_back_to_float16_and_says_so(monkeypatch, caplog):
    from passl.engine.amp import MixedPrecision
    monkeypatch.setattr(paddle.amp, "is_bfloat16_supported", lambda: False)
    monkeypatch.setattr(paddle.amp, "is_float16_supported", lambda: True)
    amp = MixedPrecision({"enable": True, "dtype": "bfloat16"}, device="gpu")
    assert (amp.enabled, amp.dtype, amp.scaler is not None) == (True, "float16", True)
    assert amp.describe() == ("float16 O1 with loss scaling (amp.dtype bfloat16 asked for, but "
                              "this GPU has no bfloat16 (compute capability 8.0+, e.g. A100, "
                              "needed))")
    monkeypatch.setattr(paddle.amp, "is_float16_supported", lambda: False)
    amp = MixedPrecision({"enable": True, "dtype": "float16"}, device="gpu")
    assert (amp.enabled, amp.scaler) == (False, None)
    assert amp.describe().startswith("off (float32) (amp.dtype float16 asked for, but this GPU")


def test_deterministic_sets_the_flags_this_build_has(monkeypatch):
    from passl import runtime
    from passl.errors import ConfigError
    set_flags = []
    monkeypatch.setattr(paddle, "set_flags", set_flags.append)
    monkeypatch.setattr(paddle.base.core, "globals",
                        lambda: {"FLAGS_cudnn_deterministic": False,
                                 "FLAGS_cudnn_exhaustive_search": True})
    assert runtime.set_deterministic(True) == {"FLAGS_cudnn_deterministic": True,
                                               "FLAGS_cudnn_exhaustive_search": False}
    assert set_flags == [{"FLAGS_cudnn_deterministic": True,
                          "FLAGS_cudnn_exhaustive_search": False}]
    assert runtime.set_deterministic(False) == {} and len(set_flags) == 1
    with pytest.raises(ConfigError, match="deterministic: expected true or false, got 'yes'"):
        runtime.set_deterministic("yes")


def test_embeddings_are_normalised_in_float32_even_from_float16(monkeypatch):
    from passl.models.necks.swav_neck import SwAVNeck
    neck = SwAVNeck(in_dim=4, hidden_dim=0, out_dim=3)
    big = np.array([[300.0, 400.0, 0.0], [1e-4, 0.0, 0.0]], "float32")  # fp16 squares overflow
    monkeypatch.setattr(neck.mlp, "forward", lambda x: paddle.to_tensor(big).astype("float16"))
    out = neck(paddle.zeros([2, 4]))
    assert out.dtype == paddle.float32
    np.testing.assert_allclose(out.numpy(), [[0.6, 0.8, 0.0], [1.0, 0.0, 0.0]], rtol=1e-3)


@pytest.mark.slow
def test_two_processes_stop_together_at_the_first_bad_iteration_of_either(tmp_path):
    """Rank 1's loss turns NaN at iteration 2; both ranks learn of it at the check of
    iteration 4 (check_interval 4) and name iteration 2."""
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    cfg = toy_config(tmp_path / "out", epochs=2, batch_size=4, hooks=[
        {"name": "ToyEngineNaN", "at_iter": 1, "rank": 1},
        {"name": "HealthHook", "check_interval": 4}])
    launch = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node",
                             "2", "--log_dir", str(tmp_path / "logs"),
                             os.path.join(here, "toy_train_cli.py"),
                             "-c", write_config(cfg, tmp_path / "cfg.yaml")],
                            capture_output=True, text=True, timeout=300)
    logs = [open(tmp_path / "logs" / f"workerlog.{r}").read() for r in (0, 1)]
    assert launch.returncode != 0
    errors = [[line for line in log.splitlines() if line.startswith("error:")] for log in logs]
    assert errors[0][0].startswith("error: non-finite loss (") and " on another process) at " \
        "iteration 2 (epoch 1); found at the check of iteration 4" in errors[0][0]
    assert errors[1][0].startswith("error: non-finite loss (nan) at iteration 2 (epoch 1); "
                                   "found at the check of iteration 4")
    event = read_metrics(str(tmp_path / "out" / "metrics.jsonl"), "event")
    assert [(e["event"], e["iter"]) for e in event] == [("non_finite_loss", 2)]
