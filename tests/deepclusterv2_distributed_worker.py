"""One rank of tests/test_deepclusterv2_distributed.py: DeepCluster-v2's clustering of this
rank's part of a seeded global bank.

Run as ``python -m paddle.distributed.launch --nproc_per_node N
deepclusterv2_distributed_worker.py OUT``. Every rank rebuilds the same global bank
(``global_bank``), takes its block of rows and saves its centroids, local assignments and
gathered table to ``OUT/rank{R}.npz``.
"""
import os
import sys

import numpy as np

os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROWS_PER_RANK = 150
DIM = 12
CROPS = 2
SIZES = [9, 6, 11]
DATASET_SIZE = 400
ITERATIONS = 10


def global_bank(world_size):
    """``[A, world * rows, D]`` unit embeddings around 8 directions, and distinct indices."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, DIM))
    x = centres[rng.integers(8, size=(CROPS, world_size * ROWS_PER_RANK))]
    x = x + 0.5 * rng.normal(size=x.shape)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    indices = rng.permutation(DATASET_SIZE)[:world_size * ROWS_PER_RANK]
    return x.astype(np.float32), indices


def starts():
    """Initial centroids: rows of rank 0's bank (the first block of the global one)."""
    from passl.models.losses.deepclusterv2 import initial_centroid_indices
    return [initial_centroid_indices(5, 2, h, ROWS_PER_RANK, k) for h, k in enumerate(SIZES)]


def main(out_dir):
    import paddle
    from passl import distributed
    from passl.models.losses.deepclusterv2 import cluster_banks, spherical_kmeans

    world_size = distributed.init_process_group()
    rank = distributed.get_rank()
    bank, indices = global_bank(world_size)
    rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    local_bank, local_indices = bank[:, rows], indices[rows]
    centroids, table = cluster_banks(paddle.to_tensor(local_bank), paddle.to_tensor(local_indices),
                                     SIZES, DATASET_SIZE, ITERATIONS, starts())
    _, local = spherical_kmeans(paddle.to_tensor(local_bank[0]), starts()[0], ITERATIONS)
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), world_size=world_size, table=table,
             local=local.numpy(), **{f"centroids{h}": c.numpy() for h, c in enumerate(centroids)})


if __name__ == "__main__":
    main(sys.argv[1])
