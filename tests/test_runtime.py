import numpy as np
import paddle
import pytest

from passl import distributed, runtime
from passl.config import load_config
from passl.engine.trainer import Trainer
from passl.errors import ConfigError
from toy_training import toy_config, write_config


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


def test_cpu_under_a_launcher_that_joins_over_nccl_is_refused_in_one_line(monkeypatch, tmp_path):
    """A GPU build with cards: the launcher's NCCL backend moves each process onto its card when
    it joins, after ``device: cpu`` chose the CPU (mocked here: the place joining leaves)."""
    place = ["cpu"]
    monkeypatch.setattr(paddle, "get_device", lambda: place[0])

    def join(backend_place):
        place[0] = backend_place
        return 2
    monkeypatch.setattr(distributed, "init_process_group", lambda: join("gpu:1"))
    message = ("device: cpu, but the launcher joined the 2 processes over NCCL, which puts each "
               "on a GPU (gpu:1 here); use -o device=gpu, or train on CPUs with "
               "PADDLE_DISTRI_BACKEND=gloo set before python -m paddle.distributed.launch")
    with pytest.raises(ConfigError) as error:
        runtime.select_device_and_join("cpu")
    assert str(error.value) == message
    cfg = toy_config(tmp_path / "out", device="cpu")
    place[0] = "cpu"
    with pytest.raises(ConfigError) as error:  # the trainer checks after joining too
        Trainer(load_config(write_config(cfg, tmp_path / "cfg.yaml")))
    assert str(error.value) == message
    # gloo (a CPU build, or no card visible to the launcher) leaves the processes on the CPU
    monkeypatch.setattr(distributed, "init_process_group", lambda: join("cpu"))
    assert runtime.select_device_and_join("cpu") == ("cpu", 2)
