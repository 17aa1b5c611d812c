"""The rank-local queue of recent embeddings that SwAV adds to small batches.

With a small global batch, B samples cannot be spread evenly over K=3000
prototypes; prepending the embeddings of the last few batches (scored with the
current prototypes) gives Sinkhorn enough columns. Only this batch's codes are
used by the loss.
"""
import numpy as np
import paddle

from passl.errors import ConfigError
from passl.utils.logger import get_logger


def queue_rows_per_rank(queue_length, global_batch_size, world_size):
    """Rows each rank holds: ``queue_length`` rounded down to whole global batches, split.

    The queue moves by one batch per step, so its length must be a multiple of
    the global batch; the rounding is logged. A queue shorter than one global
    batch is a configuration mistake.
    """
    rounded = queue_length - queue_length % global_batch_size
    if rounded <= 0:
        raise ConfigError(f"SwAVHook.queue_length {queue_length} is shorter than one global batch "
                          f"({global_batch_size} images); use queue_length: 0 (no queue) or at "
                          f"least {global_batch_size}")
    if rounded != queue_length:
        get_logger().info("SwAV queue: queue_length %d rounded down to %d, a multiple of the "
                          "global batch %d", queue_length, rounded, global_batch_size)
    return rounded // world_size


def queue_union(rank_embeddings, local_batch):
    """All ranks' queues as one newest-first sequence, ``[num_assign_crops, sum rows, dim]``.

    Order of the union: the pushed batches newest first, and within one step the ranks in
    rank order. That is the order of the global batch (the distributed batch sampler gives
    rank r the r-th slice of each global batch), so the union is the queue a single process
    would hold after the same steps with the whole global batch.

    Args:
        rank_embeddings: one ``[num_assign_crops, rows, dim]`` array per rank, in rank order.
        local_batch: images per step on each rank when the queues were filled.
    """
    arrays = [np.asarray(e) for e in rank_embeddings]
    crops, rows, dim = arrays[0].shape
    steps = rows // local_batch
    # [crops, steps, ranks, local_batch, dim]: step-major, then rank
    by_step = np.stack([a.reshape(crops, steps, local_batch, dim) for a in arrays], axis=2)
    return by_step.reshape(crops, steps * len(arrays) * local_batch, dim)


def shard_queue_union(union, world_size, rank, local_batch, rows):
    """Rank ``rank``'s ``rows`` of ``union`` (see :func:`queue_union`) in a run of
    ``world_size`` ranks with ``local_batch`` images per rank and step.

    The newest ``rows * world_size`` embeddings are kept and regrouped into global batches,
    rank ``rank`` taking slice ``rank`` of each; when the union is shorter, the oldest end is
    zero-filled (the queue then waits until it is full again). Returns ``(array, complete)``,
    ``complete`` saying that no zero-filling was needed.
    """
    crops, length, dim = union.shape
    total = rows * world_size
    kept = np.zeros((crops, total, dim), dtype=union.dtype)
    kept[:, :min(length, total)] = union[:, :total]
    steps = rows // local_batch
    shard = kept.reshape(crops, steps, world_size, local_batch, dim)[:, :, rank]
    return shard.reshape(crops, rows, dim), length >= total


class SwAVQueue:
    """Per assignment crop, the last ``rows`` embeddings of this rank, newest first.

    ``embeddings`` is ``[num_assign_crops, rows, dim]``, zero until filled.
    The queue is used from the first step at which it is full (its last row is
    non-zero) and from then on always, as in the reference.
    """

    def __init__(self, num_assign_crops, rows, dim):
        self.embeddings = paddle.zeros([num_assign_crops, rows, dim], dtype="float32")
        self._in_use = False

    def in_use(self):
        """True once the queue has been full; checked on the device until then."""
        if not self._in_use:
            self._in_use = bool((self.embeddings[:, -1] != 0).any())
        return self._in_use

    @paddle.no_grad()
    def scores(self, prototype_weight):
        """One ``[rows, K]`` score Tensor per assignment crop; ``prototype_weight`` is [dim, K]."""
        weight = prototype_weight.astype(self.embeddings.dtype)
        return list(paddle.matmul(self.embeddings, weight).unbind(0))

    @paddle.no_grad()
    def push(self, newest):
        """Put ``newest`` ``[num_assign_crops, B, dim]`` in front; the oldest B rows leave."""
        newest = newest.detach().astype(self.embeddings.dtype)
        kept = self.embeddings[:, :self.embeddings.shape[1] - newest.shape[1]]
        self.embeddings = paddle.concat([newest, kept], axis=1)

    def state_dict(self):
        return {"embeddings": self.embeddings, "in_use": self._in_use}

    def set_state_dict(self, state):
        embeddings = state["embeddings"]
        if list(embeddings.shape) != list(self.embeddings.shape):
            raise ConfigError(
                f"saved SwAV queue has shape {list(embeddings.shape)} but this run needs "
                f"{list(self.embeddings.shape)} (queue_length, batch size, number of processes "
                f"or crops_for_assign changed); resume with the same settings")
        self.embeddings = paddle.assign(embeddings).astype(self.embeddings.dtype)  # a copy
        self._in_use = bool(state.get("in_use", False))
