"""Two CPU processes (gloo) give the same Sinkhorn codes and loss gradients as one process."""
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

import swav_distributed_worker as worker
from passl.models.losses.swav import distributed_sinkhorn

WORLD_SIZE = 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the worker under paddle.distributed.launch; returns each rank's saved results."""
    out_dir = tmp_path_factory.mktemp("swav_dist")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node",
               str(WORLD_SIZE), "--log_dir", str(out_dir / "logs"),
               os.path.join(ROOT, "tests", "swav_distributed_worker.py"), str(out_dir)]
    run = subprocess.run(command, env=env, cwd=str(out_dir), capture_output=True, text=True,
                         timeout=300)
    logs = "".join(p.read_text() for p in sorted((out_dir / "logs").glob("*")) if p.is_file())
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + logs[-4000:]
    return [dict(np.load(out_dir / f"rank{r}.npz")) for r in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def data():
    return worker.global_data(WORLD_SIZE)


def test_each_rank_gets_its_rows_of_the_one_process_codes(ranks, data):
    assert [int(r["world_size"]) for r in ranks] == [WORLD_SIZE] * WORLD_SIZE
    features, prototypes, _ = data
    everyone = np.concatenate([worker.rank_rows(features, r)[:worker.BATCH_PER_RANK]
                               for r in range(WORLD_SIZE)])
    expected = distributed_sinkhorn(paddle.to_tensor(everyone @ prototypes), 0.05, 3).numpy()
    b = worker.BATCH_PER_RANK
    for rank, result in enumerate(ranks):
        assert np.abs(result["codes"] - expected[rank * b:(rank + 1) * b]).max() <= 1e-6


def test_each_rank_gets_its_rows_with_queue(ranks, data):
    features, prototypes, queues = data
    b, q = worker.BATCH_PER_RANK, worker.QUEUE_PER_RANK
    blocks = [np.concatenate([queues[r, 0], worker.rank_rows(features, r)[:b]])
              for r in range(WORLD_SIZE)]
    expected = distributed_sinkhorn(paddle.to_tensor(np.concatenate(blocks) @ prototypes),
                                    0.05, 3).numpy()
    for rank, result in enumerate(ranks):
        rows = expected[rank * (q + b):(rank + 1) * (q + b)]
        assert np.abs(result["codes_with_queue"] - rows).max() <= 1e-6


@pytest.mark.parametrize("suffix", ["", "_with_queue"])
def test_averaged_gradients_equal_the_one_process_gradients(ranks, data, suffix):
    features, prototypes, queues = data
    everyone = features.reshape(-1, worker.DIM)  # crop-major over the global batch
    # one process holds both ranks' queues; row order within a queue does not matter
    queue = np.concatenate(list(queues), axis=1) if suffix else None
    loss, grad_features, grad_prototypes = worker.loss_and_grads(everyone, prototypes, queue)

    assert abs(np.mean([r["loss" + suffix] for r in ranks]) - loss.item()) <= 1e-6
    for result in ranks:
        got = result["grad_prototypes" + suffix]
        assert np.abs(got - grad_prototypes.numpy()).max() <= 1e-6 * np.abs(got).max() + 1e-7
    # a rank's input gradient is its share of the one-process gradient, times the world size
    grad_features = grad_features.numpy().reshape(features.shape)
    b = worker.BATCH_PER_RANK
    for rank, result in enumerate(ranks):
        expected = WORLD_SIZE * grad_features[:, rank * b:(rank + 1) * b].reshape(-1, worker.DIM)
        got = result["grad_features" + suffix]
        assert np.abs(got - expected).max() <= 1e-6 * np.abs(expected).max() + 1e-7
