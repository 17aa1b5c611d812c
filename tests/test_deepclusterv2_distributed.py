"""DeepCluster-v2's k-means on 2 CPU processes (gloo) equals one process on the
concatenated bank with the same initial centroid indices, and the NumPy reference."""
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

import deepclusterv2_distributed_worker as worker
import deepclusterv2_numpy_reference as reference
from passl.models.losses.deepclusterv2 import cluster_banks

WORLD_SIZE = 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dcv2_dist")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node",
               str(WORLD_SIZE), "--log_dir", str(out_dir / "logs"),
               os.path.join(ROOT, "tests", "deepclusterv2_distributed_worker.py"), str(out_dir)]
    run = subprocess.run(command, env=env, cwd=str(out_dir), capture_output=True, text=True,
                         timeout=300)
    logs = "".join(p.read_text() for p in sorted((out_dir / "logs").glob("*")) if p.is_file())
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + logs[-4000:]
    return [dict(np.load(out_dir / f"rank{r}.npz")) for r in range(WORLD_SIZE)]


def test_two_processes_give_the_one_process_clustering_of_the_concatenated_bank(ranks):
    assert [int(r["world_size"]) for r in ranks] == [WORLD_SIZE] * WORLD_SIZE
    bank, indices = worker.global_bank(WORLD_SIZE)
    centroids, table = cluster_banks(paddle.to_tensor(bank), paddle.to_tensor(indices),
                                     worker.SIZES, worker.DATASET_SIZE, worker.ITERATIONS,
                                     worker.starts())
    for result in ranks:
        np.testing.assert_array_equal(result["table"], table)
        for h, expected in enumerate(centroids):
            np.testing.assert_allclose(result[f"centroids{h}"], expected.numpy(), atol=2e-6)
    # each rank's local assignments are its rows of the one-process ones (head 0 = bank 0)
    np.testing.assert_array_equal(
        np.concatenate([r["local"] for r in ranks]),
        table[0][indices])


def test_two_processes_match_the_reference_over_two_simulated_ranks(ranks):
    bank, indices = worker.global_bank(WORLD_SIZE)
    rows = worker.ROWS_PER_RANK
    rank_banks = [bank[:, r * rows:(r + 1) * rows] for r in range(WORLD_SIZE)]
    rank_indices = [indices[r * rows:(r + 1) * rows] for r in range(WORLD_SIZE)]
    centroids, table = reference.cluster_memory(rank_banks, rank_indices, worker.SIZES,
                                                worker.DATASET_SIZE, worker.ITERATIONS,
                                                worker.starts())
    for result in ranks:
        np.testing.assert_array_equal(result["table"], table)
        for h, expected in enumerate(centroids):
            np.testing.assert_allclose(result[f"centroids{h}"], expected, atol=2e-6)
