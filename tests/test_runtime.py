import numpy as np
import paddle
import pytest

from passl import runtime
from passl.errors import ConfigError


def test_auto_threads_split_the_cores_between_launched_processes(monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("PADDLE_LOCAL_SIZE", raising=False)
    monkeypatch.delenv("PADDLE_TRAINERS_NUM", raising=False)
    assert runtime.threads_per_process("auto") == 8
    monkeypatch.setenv("PADDLE_LOCAL_SIZE", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the launcher's value is ignored
    assert runtime.threads_per_process("auto") == 2
    monkeypatch.setenv("PADDLE_LOCAL_SIZE", "16")
    assert runtime.threads_per_process("auto") == 1


def test_user_threads_win_outside_the_launcher(monkeypatch):
    monkeypatch.delenv("PADDLE_LOCAL_SIZE", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.threads_per_process("auto") == 3
    assert runtime.threads_per_process(5) == 5
    with pytest.raises(ConfigError, match="threads: expected a positive integer or 'auto'"):
        runtime.threads_per_process(0)


def test_device_choice_errors_name_the_fix():
    with pytest.raises(ConfigError, match="device: expected one of auto, cpu, gpu, got 'tpu'"):
        runtime.select_device("tpu")
    if not paddle.is_compiled_with_cuda():
        with pytest.raises(ConfigError, match="paddlepaddle-gpu or use -o device=cpu"):
            runtime.select_device("gpu")
        assert runtime.select_device("auto") == "cpu"


def test_seed_everything_repeats_streams_and_ranks_differ():
    draws = []
    for rank in (0, 0, 1):
        runtime.seed_everything(7, rank)
        draws.append((np.random.rand(), paddle.rand([1]).item()))
    assert draws[0] == draws[1] and draws[0] != draws[2]


def test_gpu_is_the_card_the_launcher_selected_not_the_local_rank(monkeypatch):
    """`launch --gpus 3` with one process: FLAGS_selected_gpus=3, PADDLE_LOCAL_RANK=0."""
    chosen = []
    monkeypatch.setattr(paddle, "is_compiled_with_cuda", lambda: True)
    monkeypatch.setattr(paddle.base.core, "is_compiled_with_cuda", lambda: True)
    monkeypatch.setattr(paddle.device.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(paddle, "set_device", chosen.append)
    monkeypatch.setenv("FLAGS_selected_gpus", "3")
    monkeypatch.setenv("PADDLE_LOCAL_RANK", "0")
    assert runtime.select_device("gpu") == "gpu"
    assert chosen == ["gpu:3"]
