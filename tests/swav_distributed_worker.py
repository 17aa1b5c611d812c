"""One rank of tests/test_swav_distributed.py: SwAV on this rank's share of a seeded batch.

Run as ``python -m paddle.distributed.launch --nproc_per_node N swav_distributed_worker.py OUT``.
Every rank rebuilds the same global data (see ``global_data``), takes its rows,
and saves its Sinkhorn codes, loss and all-reduced gradients to ``OUT/rank{R}.npz``.
"""
import os
import sys

import numpy as np

os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
os.environ.setdefault("OMP_NUM_THREADS", "1")

NMB_CROPS = [2, 2]
CROPS_FOR_ASSIGN = [0, 1]
BATCH_PER_RANK = 6
QUEUE_PER_RANK = 12
DIM = 5
NUM_PROTOTYPES = 7


def global_data(world_size):
    """Crop-major features [V, world*B, D], prototypes [D, K], queues [world, A, L, D]."""
    rng = np.random.RandomState(0)
    features = rng.randn(sum(NMB_CROPS), world_size * BATCH_PER_RANK, DIM)
    prototypes = rng.randn(DIM, NUM_PROTOTYPES)
    queues = rng.randn(world_size, len(CROPS_FOR_ASSIGN), QUEUE_PER_RANK, DIM)
    queues /= np.linalg.norm(queues, axis=-1, keepdims=True)
    return features.astype(np.float32), prototypes.astype(np.float32), queues.astype(np.float32)


def rank_rows(features, rank):
    """This rank's images, all crops, flattened crop-major: [V*B, D]."""
    part = features[:, rank * BATCH_PER_RANK:(rank + 1) * BATCH_PER_RANK]
    return part.reshape(-1, DIM)


def loss_and_grads(features, prototypes, queue=None):
    """SwAVLoss through both L2 normalisations; returns (loss, d features, d prototypes)."""
    import paddle
    import paddle.nn.functional as F

    from passl.models.losses.swav import SwAVLoss
    from passl.models.losses.swav_queue import SwAVQueue

    x = paddle.to_tensor(features, stop_gradient=False)
    w = paddle.to_tensor(prototypes, stop_gradient=False)
    z = F.normalize(x, axis=1)
    W = F.normalize(w, axis=0)
    criterion = SwAVLoss(NMB_CROPS, CROPS_FOR_ASSIGN)
    if queue is not None:
        criterion.queue = SwAVQueue(queue.shape[0], queue.shape[1], queue.shape[2])
        criterion.queue.embeddings = paddle.to_tensor(queue)
    loss = criterion(z, [z @ W], [W], features.shape[0] // sum(NMB_CROPS))
    loss.backward()
    return loss, x.grad, w.grad


def main(out_dir):
    import paddle

    from passl import distributed
    from passl.models.losses.swav import distributed_sinkhorn

    world_size = distributed.init_process_group()
    rank = distributed.get_rank()
    features, prototypes, queues = global_data(world_size)
    mine = rank_rows(features, rank)
    scores = paddle.to_tensor(mine[:BATCH_PER_RANK] @ prototypes)  # crop 0 of this rank
    queue_scores = paddle.to_tensor(queues[rank, 0] @ prototypes)
    result = {
        "world_size": world_size,
        "codes": distributed_sinkhorn(scores, 0.05, 3).numpy(),
        "codes_with_queue": distributed_sinkhorn(paddle.concat([queue_scores, scores]),
                                                 0.05, 3).numpy(),
    }
    for suffix, queue in (("", None), ("_with_queue", queues[rank])):
        loss, grad_features, grad_prototypes = loss_and_grads(mine, prototypes, queue)
        # what DataParallel does: average the prototype gradient over ranks
        grad_prototypes = distributed.all_reduce(grad_prototypes, "sum") / world_size
        result["loss" + suffix] = loss.numpy()
        result["grad_features" + suffix] = grad_features.numpy()
        result["grad_prototypes" + suffix] = grad_prototypes.numpy()
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **result)


if __name__ == "__main__":
    main(sys.argv[1])
