"""DeepCluster-v2's memory bank: per process, the dataset index and the embeddings of the
assignment crops of every image this process trained on in the last epoch.

Rows are written in step order (row ``step * B + b`` is image b of step ``step``), as the
reference's ``local_memory_index`` / ``local_memory_embeddings``; k-means clusters them at
the start of the next epoch. Memory per process: ``rows x (8 + 4 x A x D)`` bytes for A
assignment crops of D-dim embeddings (ImageNet on 64 processes: 20,016 rows x 2 x 128 ->
20.6 MB).
"""
import numpy as np
import paddle


class MemoryBank:
    """``indices [N]`` int64 and ``embeddings [A, N, D]`` float32 of this process."""

    def __init__(self, num_crops, rows, dim):
        self.indices = paddle.full([rows], -1, dtype="int64")
        self.embeddings = paddle.zeros([num_crops, rows, dim], dtype="float32")

    @property
    def rows(self):
        return self.indices.shape[0]

    @paddle.no_grad()
    def write(self, start, indices, embeddings):
        """Rows ``start:start + B`` become ``indices [B]`` and ``embeddings [A, B, D]``."""
        stop = start + indices.shape[0]
        if stop > self.rows:
            raise ValueError(f"memory bank: rows {start}:{stop} beyond its {self.rows} rows")
        self.indices[start:stop] = indices.astype("int64")
        self.embeddings[:, start:stop] = embeddings.astype("float32")

    def state_dict(self):
        return {"indices": self.indices, "embeddings": self.embeddings}

    def set_state_dict(self, state):
        self.indices = paddle.to_tensor(np.asarray(state["indices"], dtype=np.int64))
        self.embeddings = paddle.to_tensor(np.asarray(state["embeddings"], dtype=np.float32))


def reshard_banks(rank_states, world_size, rank):
    """Rank ``rank``'s bank (a state dict) when the saved banks of ``rank_states`` (one per
    saving rank, in rank order) are spread over ``world_size`` ranks.

    The union of the saved rows is put in global sample order (by dataset index; a sample
    held twice, as the sampler's padding repeats a few, is kept once; rows never written,
    index -1, are dropped) and cut into ``world_size`` contiguous parts, the first ones one
    row longer when it does not divide evenly.
    """
    indices = np.concatenate([np.asarray(s["indices"]) for s in rank_states])
    embeddings = np.concatenate([np.asarray(s["embeddings"]) for s in rank_states], axis=1)
    written = indices >= 0
    unique, first = np.unique(indices[written], return_index=True)  # sorted by index
    rows = np.flatnonzero(written)[first]
    part = np.array_split(np.arange(len(unique)), world_size)[rank]
    return {"indices": indices[rows[part]], "embeddings": embeddings[:, rows[part]]}
