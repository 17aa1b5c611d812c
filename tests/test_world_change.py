"""Resuming epoch-boundary checkpoints with another world size (2 -> 1, 1 -> 2) or global batch."""
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest

from passl.config import load_config
from passl.engine import world_change
from passl.engine.trainer import Trainer
from passl.errors import UserError
from passl.io import checkpoint
from passl.io.metrics_log import read_metrics
from passl.models.losses.swav_queue import SwAVQueue, queue_union, shard_queue_union
from passl.solver.lr_scheduler import CosineWarmup
from passl.utils.logger import get_logger
from test_multiprocess_train import CLI, tiny_swav_config
from tiny_image_folder import write_image_folder
from toy_training import write_config

CROPS, DIM = 2, 3


def filled_queues(global_batches, world_size):
    """Push the same global batches through one queue of the whole batch and through
    ``world_size`` rank queues each fed its slice, as the distributed sampler splits them."""
    batch = global_batches[0].shape[1]
    local = batch // world_size
    whole = SwAVQueue(CROPS, 2 * batch, DIM)
    ranks = [SwAVQueue(CROPS, 2 * local, DIM) for _ in range(world_size)]
    for g in global_batches:
        whole.push(paddle.to_tensor(g))
        for r, queue in enumerate(ranks):
            queue.push(paddle.to_tensor(g[:, r * local:(r + 1) * local]))
    return whole.embeddings.numpy(), [q.embeddings.numpy() for q in ranks]


def test_queue_union_is_the_queue_of_one_process_and_shards_back():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((CROPS, 8, DIM)).astype("float32") for _ in range(3)]
    whole, two = filled_queues(batches, world_size=2)
    union = queue_union(two, local_batch=4)
    np.testing.assert_array_equal(union, whole)
    for r in (0, 1):  # 1 -> 2 and back: the same rows each rank filled itself
        shard, complete = shard_queue_union(whole, 2, r, local_batch=4, rows=8)
        np.testing.assert_array_equal(shard, two[r])
        assert complete
    # a shorter queue (global batch 4, 8 rows) keeps the newest embeddings of the union
    shard, complete = shard_queue_union(union, 1, 0, local_batch=4, rows=8)
    np.testing.assert_array_equal(shard, np.concatenate([batches[2], batches[1]], axis=1)[:, :8])
    assert complete
    # a longer one is zero-filled at the oldest end and reported incomplete
    shard, complete = shard_queue_union(union, 1, 0, local_batch=8, rows=24)
    np.testing.assert_array_equal(shard[:, :16], whole)
    assert not shard[:, 16:].any() and not complete


def test_a_global_batch_that_does_not_split_is_one_clear_error():
    state = {"world_size": 2, "global_batch_size": 6, "config": {}}
    cfg = {"dataloader": {"train": {"sampler": {"batch_size": 3}}}, "lr_scheduler": {}}
    with pytest.raises(UserError) as error:
        world_change.adapt_config(cfg, state, 4, "ckpt.pd", get_logger())
    assert str(error.value) == (
        "--resume ckpt.pd: the global batch 6 of the checkpoint cannot be split evenly over 4 "
        "processes; choose a per-process batch with -o dataloader.train.sampler.batch_size=N "
        "(the lr is then rescaled)")
    world_change.adapt_config(cfg, state, 3, "ckpt.pd", get_logger())  # 6 = 3 x 2 splits
    assert cfg["dataloader"]["train"]["sampler"]["batch_size"] == 2
    world_change.adapt_config(cfg, state, 3, "ckpt.pd", get_logger())  # now 2 x 3: no change
    assert cfg["dataloader"]["train"]["sampler"]["batch_size"] == 2 and cfg["lr_scheduler"] == {}


def launch_two(tmp_path, cfg_path, log_name, *args):
    return subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node",
                           "2", "--log_dir", str(tmp_path / log_name), CLI, "-c", cfg_path, *args],
                          capture_output=True, text=True, timeout=600)


def swav_config(data, output_dir, epochs, batch_size=4):
    cfg = tiny_swav_config(data, output_dir, hooks=[{"name": "ToyEngineDumpQueue"}])
    cfg["epochs"] = epochs
    cfg["dataloader"]["train"]["sampler"]["batch_size"] = batch_size
    return cfg


def expected_lr(iteration, global_batch, saved_global=8, base_lr=0.3, final_lr=0.003):
    scale = global_batch / saved_global
    schedule = CosineWarmup(base_lr * scale, epochs=3, iters_per_epoch=48 // global_batch,
                            global_batch_size=global_batch, final_lr=final_lr * scale)
    return schedule.table[iteration]


@pytest.fixture(scope="module")
def two_process_checkpoint(tmp_path_factory):
    """Two epochs of tiny SwAV on 2 processes x 4 images, the queue (16) full at the end."""
    tmp_path = tmp_path_factory.mktemp("two")
    data = write_image_folder(tmp_path / "images", per_class=(16, 1))
    cfg = write_config(swav_config(data, tmp_path / "run", epochs=2), tmp_path / "run.yaml")
    result = launch_two(tmp_path, cfg, "log")
    assert result.returncode == 0, open(tmp_path / "log" / "workerlog.0").read()[-2000:]
    return data, tmp_path / "run"


def resume_in_this_process(tmp_path, data, saved_run, batch_size):
    run = tmp_path / "resumed"
    shutil.copytree(saved_run, run)
    cfg = swav_config(data, run, epochs=3, batch_size=batch_size)
    trainer = Trainer(load_config(write_config(cfg, tmp_path / "resumed.yaml")), resume="auto")
    return trainer, run


@pytest.mark.slow
def test_two_to_one_keeps_the_global_batch_and_the_queue_union(tmp_path, two_process_checkpoint):
    data, saved_run = two_process_checkpoint
    saved = checkpoint.load_checkpoint(str(saved_run / "checkpoints" / "epoch_2.pd"))
    ranks = [saved["per_rank"][r]["hooks"]["SwAVHook"]["queue"]["embeddings"] for r in (0, 1)]
    trainer, run = resume_in_this_process(tmp_path, data, saved_run, batch_size=4)

    assert trainer.train_loader.batch_sampler.batch_size == 8 and trainer.global_batch_size == 8
    queue = trainer.hooks[[type(h).__name__ for h in trainer.hooks].index("SwAVHook")]._queue_state
    # the union, built here by hand: per step (newest first) rank 0's 4 rows, then rank 1's
    by_hand = np.concatenate([np.concatenate([ranks[0][:, s * 4:(s + 1) * 4],
                                              ranks[1][:, s * 4:(s + 1) * 4]], axis=1)
                              for s in range(2)], axis=1)
    np.testing.assert_array_equal(queue["embeddings"], by_hand)
    assert queue["in_use"] is True
    assert trainer.lr_scheduler.last_epoch == 12
    trainer.train()
    records = read_metrics(str(run / "metrics.jsonl"), "train")
    assert [r["iter"] for r in records] == list(range(1, 19))
    assert [r["lr"] for r in records[12:]] == pytest.approx([expected_lr(i, 8) for i in range(12, 18)])
    log = open(run / "train.log").read()
    assert "resuming a 2-process checkpoint with 1 process(es): global batch 8 kept, " \
           "per-process batch 4 -> 8" in log
    assert "SwAV queue re-sharded: 16 queued embeddings per assignment crop from 2 rank(s) -> " \
           "16 on each of 1 rank(s), newest first" in log
    assert "random streams re-seeded from (seed, epoch 2, rank)" in log


@pytest.mark.slow
def test_two_to_one_with_a_new_batch_rescales_the_lr(tmp_path, two_process_checkpoint):
    data, saved_run = two_process_checkpoint
    trainer, run = resume_in_this_process(tmp_path, data, saved_run, batch_size=6)
    assert trainer.global_batch_size == 6 and trainer.iters_per_epoch == 8
    assert trainer.lr_scheduler.last_epoch == 16  # epoch 2 of this run's 8-step epochs
    assert trainer.lr_scheduler.last_lr == pytest.approx(expected_lr(16, 6))
    log = open(run / "train.log").read()
    assert "per-process batch_size changed, global batch 8 -> 6 (6 per process); lr rescaled " \
           "by 6/8 = 0.75" in log
    # a 16-row queue at global batch 6 is 12 rows: the newest 12 of the saved union
    queue = trainer.hooks[[type(h).__name__ for h in trainer.hooks].index("SwAVHook")]._queue_state
    saved = checkpoint.load_checkpoint(str(saved_run / "checkpoints" / "epoch_2.pd"))
    union = queue_union([saved["per_rank"][r]["hooks"]["SwAVHook"]["queue"]["embeddings"]
                         for r in (0, 1)], local_batch=4)
    np.testing.assert_array_equal(queue["embeddings"], union[:, :12])


@pytest.mark.slow
def test_one_to_two_splits_the_batch_and_the_queue(tmp_path):
    data = write_image_folder(tmp_path / "images", per_class=(16, 1))
    run = tmp_path / "run"
    Trainer(load_config(write_config(swav_config(data, run, epochs=2, batch_size=8),
                                     tmp_path / "one.yaml"))).train()
    saved = checkpoint.load_checkpoint(str(run / "checkpoints" / "epoch_2.pd"))
    whole = saved["per_rank"][0]["hooks"]["SwAVHook"]["queue"]["embeddings"]
    cfg = write_config(swav_config(data, run, epochs=3, batch_size=8), tmp_path / "two.yaml")
    result = launch_two(tmp_path, cfg, "log", "--resume", "auto")
    assert result.returncode == 0, open(tmp_path / "log" / "workerlog.0").read()[-2000:]

    for r in (0, 1):  # rank r holds slice r of each queued global batch, newest first
        expected = np.concatenate([whole[:, s * 8 + r * 4:s * 8 + (r + 1) * 4] for s in range(2)],
                                  axis=1)
        np.testing.assert_array_equal(np.load(run / f"queue.rank{r}.npy"), expected)
    records = read_metrics(str(run / "metrics.jsonl"), "train")
    assert [r["iter"] for r in records] == list(range(1, 19))
    assert [r["lr"] for r in records[12:]] == pytest.approx([expected_lr(i, 8)
                                                             for i in range(12, 18)])
    log = open(run / "train.log").read()
    assert "resuming a 1-process checkpoint with 2 process(es): global batch 8 kept, " \
           "per-process batch 8 -> 4" in log
    final = checkpoint.load_checkpoint(str(run / "checkpoints" / "epoch_3.pd"))
    assert final["world_size"] == 2 and final["global_batch_size"] == 8
