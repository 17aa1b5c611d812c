"""Checkpoints: atomic writes, pruning, clear resume errors, and exact resuming."""
import os
import signal
import subprocess
import sys

import numpy as np
import paddle
import pytest

from passl.config import load_config
from passl.engine.trainer import Trainer
from passl.errors import UserError
from passl.io import checkpoint
from passl.io.metrics_log import read_metrics
from toy_training import toy_config, write_config

HERE = os.path.dirname(os.path.abspath(__file__))
COMPARED = ("type", "epoch", "iter", "loss", "lr", "abs_out", "top1")


def state(epoch):
    """A checkpoint as small as a resumable one can be, marked by ``weights``."""
    return {"kind": checkpoint.KIND, "version": checkpoint.VERSION, "epoch": epoch, "iter": 0,
            "weights": paddle.full([3], float(epoch)), "model": {}, "optimizer": {},
            "lr_scheduler": {}, "world_size": 1,
            "per_rank": [{"hooks": {}, "rng": checkpoint.rng_state()}]}


def test_crash_while_saving_keeps_the_previous_latest(tmp_path, monkeypatch):
    checkpoint.save_checkpoint(state(1), str(tmp_path))

    def crash_midway(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.paddle, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(state(2), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["epoch_1.pd", "latest.pd"]
    latest = checkpoint.load_checkpoint(str(tmp_path / "latest.pd"))
    assert latest["epoch"] == 1 and latest["weights"].numpy().tolist() == [1.0] * 3


def test_keep_last_prunes_the_oldest_of_this_run(tmp_path):
    checkpoint.save_checkpoint(state(9), str(tmp_path))  # left by an earlier, longer run
    for epoch in range(1, 6):
        checkpoint.save_checkpoint(state(epoch), str(tmp_path), keep_last=2)
    assert [e for e, _ in checkpoint.epoch_checkpoints(str(tmp_path))] == [4, 5, 9]
    assert os.readlink(tmp_path / "latest.pd") == "epoch_5.pd"


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    (b"not a checkpoint", "not a file written by paddle.save"),
    ({"linear.weight": np.ones(2, "float32")}, "a weights file, not a training checkpoint"),
    ({"kind": "something-else", "model": {}}, "checkpoint kind 'something-else'"),
    ({"kind": checkpoint.KIND, "version": checkpoint.VERSION + 1}, "newer than this code"),
    ({"kind": checkpoint.KIND, "version": checkpoint.VERSION, "epoch": 1},
     r"the checkpoint has no 'model' \(damaged, or not written by tools/train.py\)"),
    ({**state(1), "epoch": -1}, r"the checkpoint's 'epoch' is -1, expected a count"),
])
def test_resume_errors_are_one_clear_line(tmp_path, content, message):
    path = tmp_path / "ckpt.pd"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        paddle.save(content, str(path))
    with pytest.raises(UserError, match=message) as error:
        checkpoint.load_checkpoint(str(path))
    assert "\n" not in str(error.value)


def toy_trainer(tmp_path, name, **kwargs):
    resume = kwargs.pop("resume", None)
    cfg = toy_config(tmp_path / name, val=True, hooks=[{"name": "ToyEngineAccuracy"}], **kwargs)
    return Trainer(load_config(write_config(cfg, tmp_path / f"{name}.yaml")), resume=resume)


def test_resume_auto_without_checkpoint(tmp_path):
    with pytest.raises(UserError, match="--resume auto: no checkpoint in .*checkpoints"):
        toy_trainer(tmp_path, "empty", resume="auto")


def final_model(output_dir, epoch=3):
    path = os.path.join(output_dir, "checkpoints", f"epoch_{epoch}.pd")
    return checkpoint.load_checkpoint(path)["model"]


def assert_same_run(reference_dir, resumed_dir, first_iter=1):
    """Same final weights (bit-exact) and the same metrics records (<= 1e-6)."""
    for name, tensor in final_model(reference_dir).items():
        np.testing.assert_array_equal(final_model(resumed_dir)[name].numpy(), tensor.numpy(),
                                      err_msg=name)
    records = [[{k: r[k] for k in COMPARED if k in r}
                for r in read_metrics(os.path.join(d, "metrics.jsonl"))
                if r["type"] in ("train", "eval") and r["iter"] >= first_iter]
               for d in (reference_dir, resumed_dir)]
    positions = [[(r["type"], r["iter"]) for r in run] for run in records]
    assert positions[0] == positions[1]
    for expected, got in zip(*records):
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-6), (key, expected, got)


def test_resume_in_the_same_process_continues_exactly(tmp_path):
    """A second trainer in one process has other Paddle tensor names: state must still match."""
    reference = toy_trainer(tmp_path, "reference")
    reference.train()
    epoch_1 = os.path.join(reference.output_dir, "checkpoints", "epoch_1.pd")
    resumed = toy_trainer(tmp_path, "resumed", resume=epoch_1)
    assert (resumed.start_epoch, resumed.iter) == (1, 4)
    resumed.train()
    assert_same_run(reference.output_dir, resumed.output_dir, first_iter=5)


def run_cli(cfg_path, *args):
    return subprocess.run([sys.executable, os.path.join(HERE, "toy_train_cli.py"), "-c", cfg_path,
                           *args], capture_output=True, text=True, timeout=300)


def test_sigkill_then_resume_auto_ends_like_an_uninterrupted_run(tmp_path):
    hooks = [{"name": "ToyEngineAccuracy"}]
    whole = toy_config(tmp_path / "whole", val=True, hooks=hooks)
    killed = toy_config(tmp_path / "killed", val=True, hooks=hooks + [
        {"name": "ToyEngineKill", "epoch": 1, "inner_iter": 2}])   # mid-epoch 2, after epoch_1.pd
    assert run_cli(write_config(whole, tmp_path / "whole.yaml")).returncode == 0
    killed_cfg = write_config(killed, tmp_path / "killed.yaml")
    first = run_cli(killed_cfg)
    assert first.returncode == -signal.SIGKILL
    logged = read_metrics(str(tmp_path / "killed" / "metrics.jsonl"), "train")
    assert logged[-1]["iter"] == 6  # steps past the checkpoint were logged, then lost
    second = run_cli(killed_cfg, "--resume", "auto")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout
    assert_same_run(str(tmp_path / "whole"), str(tmp_path / "killed"))


class _FakeGenerator:
    def __init__(self, seed):
        self.state = f"state of card {seed}"

    def get_state(self):
        return self.state

    def set_state(self, state):
        self.state = state


class _FakeCUDAPlace:
    def __init__(self, device_id):
        self.device_id = device_id


def _pretend_gpu(monkeypatch, visible, current):
    """A GPU build as Paddle sees it: ``visible`` cards, this process on card ``current``."""
    generators = [_FakeGenerator(i) for i in range(visible)]
    monkeypatch.setattr(paddle, "get_device", lambda: f"gpu:{current}")
    monkeypatch.setattr(paddle, "CUDAPlace", _FakeCUDAPlace)
    monkeypatch.setattr(paddle.framework, "_current_expected_place_",
                        lambda: _FakeCUDAPlace(current))
    monkeypatch.setattr(paddle.base.core, "get_cuda_device_count", lambda: visible, raising=False)
    monkeypatch.setattr(paddle.base.core, "default_cuda_generator", lambda i: generators[i],
                        raising=False)
    return generators


def test_rng_state_holds_only_this_process_card_and_resumes_with_fewer_visible(monkeypatch):
    """Trained seeing 8 cards on card 1, resumed with CUDA_VISIBLE_DEVICES=0,1,2,3."""
    trained = _pretend_gpu(monkeypatch, visible=8, current=1)
    trained[1].state = "card 1 after training"
    saved = checkpoint.rng_state()
    assert saved["paddle_device"] == "card 1 after training"
    resumed = _pretend_gpu(monkeypatch, visible=4, current=1)
    checkpoint.set_rng_state(saved)
    assert [g.state for g in resumed] == ["state of card 0", "card 1 after training",
                                          "state of card 2", "state of card 3"]


def test_older_checkpoints_with_every_card_state_restore_this_card(monkeypatch):
    cards = _pretend_gpu(monkeypatch, visible=2, current=1)
    state = {**checkpoint.rng_state(), "paddle_device": ["old card 0", "old card 1", "old 2"]}
    checkpoint.set_rng_state(state)
    assert [g.state for g in cards] == ["state of card 0", "old card 1"]


def test_cpu_rng_state_round_trip_repeats_the_draws():
    saved = checkpoint.rng_state()
    assert "paddle_device" not in saved
    first = (np.random.rand(), paddle.rand([3]).numpy().tolist())
    checkpoint.set_rng_state(saved)
    assert (np.random.rand(), paddle.rand([3]).numpy().tolist()) == first


def test_resume_with_parameter_groups_continues_exactly(tmp_path):
    """Fine-tuning's per-group lr multipliers survive a resume (they are config, not state)."""
    optimizer = {"name": "Momentum", "momentum": 0.9,
                 "param_groups": [{"prefix": "backbone", "lr_mult": 0.1}]}
    reference = toy_trainer(tmp_path, "reference", optimizer=optimizer)
    reference.train()
    epoch_1 = os.path.join(reference.output_dir, "checkpoints", "epoch_1.pd")
    resumed = toy_trainer(tmp_path, "resumed", resume=epoch_1, optimizer=optimizer)
    resumed.train()
    assert_same_run(reference.output_dir, resumed.output_dir, first_iter=5)
