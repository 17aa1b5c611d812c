"""Two CPU processes (gloo) through ``paddle.distributed.launch``, against one process."""
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

from passl.io.metrics_log import read_metrics
from tiny_image_folder import TINY_RESNET, write_image_folder
from toy_training import toy_config, write_config

HERE = os.path.dirname(os.path.abspath(__file__))
CLI = os.path.join(HERE, "toy_train_cli.py")


def deterministic_config(output_dir, batch_size):
    """No dropout and no data noise: the two runs see the same numbers, split differently."""
    cfg = toy_config(output_dir, batch_size=batch_size, sync_bn=True,
                     hooks=[{"name": "ToyEngineDumpParams"}])
    cfg["model"]["dropout"] = 0.0
    cfg["dataloader"]["train"]["dataset"]["noise"] = 0.0
    return cfg


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    one = write_config(deterministic_config(tmp_path / "one", batch_size=8), tmp_path / "one.yaml")
    two = write_config(deterministic_config(tmp_path / "two", batch_size=4), tmp_path / "two.yaml")
    single = subprocess.run([sys.executable, CLI, "-c", one], capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    launch = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node",
                             "2", "--log_dir", str(tmp_path / "launch"), CLI, "-c", two],
                            capture_output=True, text=True, timeout=300)
    logs = "".join(open(tmp_path / "launch" / f"workerlog.{r}").read()[-1500:] for r in (0, 1))
    assert launch.returncode == 0, logs

    rank0, rank1 = (np.load(tmp_path / "two" / f"params.rank{r}.npz") for r in (0, 1))
    reference = np.load(tmp_path / "one" / "params.rank0.npz")
    for name in reference:
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)  # kept in sync
        np.testing.assert_allclose(rank0[name], reference[name], atol=1e-5, err_msg=name)

    losses = [[r["loss"] for r in read_metrics(str(tmp_path / d / "metrics.jsonl"), "train")]
              for d in ("one", "two")]
    assert len(losses[0]) == len(losses[1]) == 12
    np.testing.assert_allclose(losses[1], losses[0], atol=1e-5)
    train_log = open(tmp_path / "two" / "train.log").read()
    assert "global batch 8 = 4 per process x 2 process(es)" in train_log
    assert "no SyncBatchNorm on CPU" in train_log
    assert os.path.isfile(tmp_path / "two" / "train.rank1.log")
    assert not [n for n in os.listdir(tmp_path / "two" / "checkpoints") if n.endswith(".tmp")]


def tiny_swav_config(data_root, output_dir, hooks=()):
    """SwAV on a tiny ResNet over 48 16px images: 2 x 4 images per step, queue from epoch 1."""
    crops = {"name": "MultiCrop", "nmb_crops": [2, 2], "size_crops": [16, 8],
             "min_scale_crops": [0.5, 0.2], "max_scale_crops": [1.0, 0.5]}
    return {
        "epochs": 3, "output_dir": str(output_dir), "seed": 3, "device": "cpu", "log_interval": 1,
        "model": {"name": "SwAV", "backbone": dict(TINY_RESNET),
                  "neck": {"name": "SwAVNeck", "in_dim": 64, "hidden_dim": 32, "out_dim": 16},
                  "head": {"name": "SwAVPrototypes", "in_dim": 16, "num_prototypes": 10},
                  "loss": {"name": "SwAVLoss", "nmb_crops": [2, 2]}},
        "dataloader": {"train": {
            "dataset": {"name": "ImageFolder", "root": str(data_root / "train"),
                        "transforms": [crops]},
            "sampler": {"batch_size": 4}}},
        "optimizer": {"name": "LARS"},
        "lr_scheduler": {"name": "CosineWarmup", "base_lr": 0.3, "final_lr": 0.003},
        "hooks": [{"name": "SwAVHook", "freeze_prototypes_epochs": 1, "queue_length": 16,
                   "epoch_queue_starts": 1},
                  {"name": "LoggerHook", "progress_bar": False}, *hooks],
    }


def launch(tmp_path, cfg_path, log_name, *args):
    return subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node",
                           "2", "--log_dir", str(tmp_path / log_name), CLI, "-c", cfg_path, *args],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_process_swav_killed_and_resumed_matches_uninterrupted(tmp_path):
    """Per-rank SwAV queues, BatchNorm buffers and RNG streams survive a SIGKILL exactly."""
    data = write_image_folder(tmp_path / "images", per_class=(16, 1))
    whole = write_config(tiny_swav_config(data, tmp_path / "whole"), tmp_path / "whole.yaml")
    killed = write_config(tiny_swav_config(data, tmp_path / "killed", hooks=[
        {"name": "ToyEngineKill", "epoch": 1, "inner_iter": 3}]), tmp_path / "killed.yaml")
    assert launch(tmp_path, whole, "log_whole").returncode == 0
    assert launch(tmp_path, killed, "log_killed").returncode != 0
    resumed = launch(tmp_path, killed, "log_resumed", "--resume", "auto")
    assert resumed.returncode == 0, open(tmp_path / "log_resumed" / "workerlog.0").read()[-2000:]

    assert_same_two_process_swav_run(tmp_path / "whole", tmp_path / "killed")


def assert_same_two_process_swav_run(reference_dir, resumed_dir):
    """Same final weights and per-rank queues (bit-exact), same 18 losses (<= 1e-6)."""
    final = [paddle.load(str(d / "checkpoints" / "epoch_3.pd"))
             for d in (reference_dir, resumed_dir)]
    for name, tensor in final[0]["model"].items():
        np.testing.assert_array_equal(final[1]["model"][name].numpy(), tensor.numpy(), err_msg=name)
    for rank in (0, 1):
        queues = [f["per_rank"][rank]["hooks"]["SwAVHook"]["queue"]["embeddings"] for f in final]
        assert queues[0].any()
        np.testing.assert_array_equal(queues[1], queues[0])
    losses = [[r["loss"] for r in read_metrics(str(d / "metrics.jsonl"), "train")]
              for d in (reference_dir, resumed_dir)]
    assert len(losses[0]) == 18
    np.testing.assert_allclose(losses[1], losses[0], atol=1e-6)
