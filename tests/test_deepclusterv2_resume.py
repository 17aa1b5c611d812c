"""DeepCluster-v2 runs that stop (SIGKILL, SIGTERM mid-epoch) and resume continue exactly as
the uninterrupted run: memory bank, assignments, weights and losses. On another number of
processes the bank is re-sharded in sample order and clustered as one bank."""
import subprocess
import sys

import numpy as np
import paddle
import pytest

from passl.io.metrics_log import read_metrics
from passl.models.losses.deepclusterv2 import cluster_banks, initial_centroid_indices
from passl.models.losses.deepclusterv2_bank import reshard_banks
from test_multiprocess_train import CLI, launch
from tiny_image_folder import TINY_RESNET, write_image_folder
from toy_training import write_config

STOPPED_STATUS = 75
SIZES = [6, 5]


def tiny_dcv2_config(data_root, output_dir, hooks=(), epochs=3, batch_size=4):
    """DeepCluster-v2 on a tiny ResNet over 48 16px images, 2 heads, 2 + 1 crops."""
    crops = {"name": "MultiCrop", "nmb_crops": [2, 1], "size_crops": [16, 8],
             "min_scale_crops": [0.5, 0.2], "max_scale_crops": [1.0, 0.5]}
    return {
        "epochs": epochs, "output_dir": str(output_dir), "seed": 3, "device": "cpu",
        "log_interval": 1, "threads": 1,
        "model": {"name": "DeepClusterV2", "backbone": dict(TINY_RESNET),
                  "neck": {"name": "SwAVNeck", "in_dim": 64, "hidden_dim": 32, "out_dim": 16},
                  "head": {"name": "SwAVPrototypes", "in_dim": 16, "num_prototypes": SIZES},
                  "loss": {"name": "DeepClusterV2Loss", "nmb_crops": [2, 1]}},
        "dataloader": {"train": {
            "dataset": {"name": "ImageFolder", "root": str(data_root / "train"),
                        "transforms": [crops]},
            "sampler": {"batch_size": batch_size}}},
        "optimizer": {"name": "LARS"},
        "lr_scheduler": {"name": "CosineWarmup", "base_lr": 0.3, "final_lr": 0.003},
        # prototypes move during epoch 1 and 2: k-means must overwrite them each epoch
        "hooks": [{"name": "DeepClusterV2Hook", "freeze_prototypes_epochs": 1,
                   "kmeans_iterations": 3},
                  {"name": "LoggerHook", "progress_bar": False}, *hooks],
    }


def run_cli(cfg_path, *args):
    return subprocess.run([sys.executable, CLI, "-c", cfg_path, *args], capture_output=True,
                          text=True, timeout=600)


def final_state(run_dir, epoch=3):
    return paddle.load(str(run_dir / "checkpoints" / f"epoch_{epoch}.pd"))


def assert_same_run(reference_dir, resumed_dir, ranks=1):
    final = [final_state(d) for d in (reference_dir, resumed_dir)]
    for name, tensor in final[0]["model"].items():
        np.testing.assert_array_equal(final[1]["model"][name].numpy(), tensor.numpy(),
                                      err_msg=name)
    for rank in range(ranks):
        states = [f["per_rank"][rank]["hooks"]["DeepClusterV2Hook"] for f in final]
        assert states[0]["clustered_epoch"] == states[1]["clustered_epoch"] == 2
        if rank == 0:  # the table every process holds is saved once
            np.testing.assert_array_equal(states[1]["assignments"], states[0]["assignments"])
        else:
            assert "assignments" not in states[0] and "assignments" not in states[1]
        for key in ("indices", "embeddings"):
            np.testing.assert_array_equal(states[1]["bank"][key], states[0]["bank"][key])
    losses = [[r["loss"] for r in read_metrics(str(d / "metrics.jsonl"), "train")]
              for d in (reference_dir, resumed_dir)]
    assert len(losses[0]) == 36  # 3 epochs x 12 steps of 4 images
    np.testing.assert_allclose(losses[1], losses[0], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dcv2_resume")
    data = write_image_folder(tmp / "images", per_class=(16, 1))
    cfg = write_config(tiny_dcv2_config(data, tmp / "whole"), tmp / "whole.yaml")
    done = run_cli(cfg)
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp, data


def test_the_bank_holds_the_epochs_samples_and_the_loss_falls(whole_run):
    tmp, _ = whole_run
    state = final_state(tmp / "whole")["per_rank"][0]["hooks"]["DeepClusterV2Hook"]
    assert sorted(state["bank"]["indices"].tolist()) == list(range(48))  # 12 steps x 4
    assert state["bank"]["embeddings"].shape == (2, 48, 16)
    np.testing.assert_allclose(np.linalg.norm(state["bank"]["embeddings"], axis=2), 1, atol=1e-5)
    assert state["assignments"].shape == (2, 48) and state["assignments"].min() >= 0
    log = open(tmp / "whole" / "train.log").read()
    assert log.count("k-means of 2 head(s) on 48 bank rows") == 3
    losses = [r["loss"] for r in read_metrics(str(tmp / "whole" / "metrics.jsonl"), "train")]
    assert np.mean(losses[-12:]) < np.mean(losses[:12])


def test_sigkill_then_resume_auto_matches_the_uninterrupted_run(whole_run):
    tmp, data = whole_run
    cfg = write_config(tiny_dcv2_config(data, tmp / "killed", hooks=[
        {"name": "ToyEngineKill", "epoch": 1, "inner_iter": 5}]), tmp / "killed.yaml")
    assert run_cli(cfg).returncode != 0
    resumed = run_cli(cfg, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(tmp / "whole", tmp / "killed")


def test_sigterm_mid_epoch_then_resume_auto_matches_the_uninterrupted_run(whole_run):
    tmp, data = whole_run
    cfg = write_config(tiny_dcv2_config(data, tmp / "stopped", hooks=[
        {"name": "ToyEngineKill", "epoch": 2, "inner_iter": 7, "signal": "SIGTERM"}]),
        tmp / "stopped.yaml")
    stopped = run_cli(cfg)
    assert stopped.returncode == STOPPED_STATUS, stopped.stderr[-2000:]
    mid = paddle.load(str(tmp / "stopped" / "checkpoints" / "epoch_3_step_8.pd"))
    assert mid["per_rank"][0]["hooks"]["DeepClusterV2Hook"]["clustered_epoch"] == 2
    resumed = run_cli(cfg, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "memory bank of" not in open(tmp / "stopped" / "train.log").read().split("resumed")[-1]
    assert_same_run(tmp / "whole", tmp / "stopped")


@pytest.mark.slow
def test_two_processes_killed_or_stopped_mid_epoch_resume_as_uninterrupted(whole_run):
    """SIGKILL (resumes from the epoch checkpoint and clusters the saved banks again) and
    SIGTERM to rank 1 only (resumes mid-epoch; rank 0's saved assignments are broadcast)."""
    tmp, data = whole_run
    whole = write_config(tiny_dcv2_config(data, tmp / "whole2", batch_size=2), tmp / "w2.yaml")
    assert launch(tmp, whole, "log_whole2").returncode == 0
    for name, kill, status in (
            ("killed2", {"epoch": 1, "inner_iter": 4}, None),
            ("stopped2", {"epoch": 2, "inner_iter": 6, "signal": "SIGTERM", "rank": 1},
             STOPPED_STATUS)):
        cfg = write_config(tiny_dcv2_config(data, tmp / name, batch_size=2, hooks=[
            {"name": "ToyEngineKill", **kill}]), tmp / f"{name}.yaml")
        first = launch(tmp, cfg, f"log_{name}")
        assert first.returncode != 0 if status is None else first.returncode == status
        resumed = launch(tmp, cfg, f"log_{name}_resumed", "--resume", "auto")
        assert resumed.returncode == 0, \
            open(tmp / f"log_{name}_resumed" / "workerlog.0").read()[-2000:]
        assert_same_run(tmp / "whole2", tmp / name, ranks=2)


@pytest.mark.slow
def test_two_process_epoch_checkpoint_resumes_on_one_process_with_the_union_bank(whole_run):
    """2 -> 1: the bank of both ranks, in sample order, is what k-means clusters next."""
    tmp, data = whole_run
    cfg = tiny_dcv2_config(data, tmp / "n2m", epochs=2, batch_size=2)
    two = write_config(cfg, tmp / "n2m_two.yaml")
    assert launch(tmp, two, "log_n2m").returncode == 0
    one = write_config({**cfg, "epochs": 3}, tmp / "n2m_one.yaml")
    resumed = run_cli(one, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "48 rows from 2 process(es) -> 48 on this one" in open(tmp / "n2m" / "train.log").read()

    saved = final_state(tmp / "n2m", epoch=2)
    banks = [r["hooks"]["DeepClusterV2Hook"]["bank"] for r in saved["per_rank"]]
    union = reshard_banks(banks, 1, 0)
    assert union["indices"].tolist() == list(range(48))
    starts = [initial_centroid_indices(3, 2, h, 48, k) for h, k in enumerate(SIZES)]
    _, expected = cluster_banks(paddle.to_tensor(union["embeddings"]),
                                paddle.to_tensor(union["indices"]), SIZES, 48, 3, starts)
    state = final_state(tmp / "n2m")["per_rank"][0]["hooks"]["DeepClusterV2Hook"]
    assert state["clustered_epoch"] == 2
    np.testing.assert_array_equal(state["assignments"], expected)
