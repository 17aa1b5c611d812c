"""``TarShards``: images packed by ``tools/make_shards.py``, read shard by shard.

Many small files cost one open (and, on network file systems, one metadata round trip)
per image; shards replace them with a few large files read by seek + read. Format:
:mod:`passl.io.tar_shards`.

Order of an epoch (training; :func:`epoch_order`, a pure function of seed, epoch, rank and
world size):

1. the shards in a permutation drawn from ``(seed, epoch)``, each shard's samples in a
   permutation drawn from ``(seed, epoch, shard)``, concatenated: every sample once;
2. padded to a multiple of the world size by repeating its first samples (only when the
   world size does not divide the sample count), and cut into one contiguous share per rank,
   so a rank reads about 1/world of the shards;
3. within a rank's share, samples shuffled inside windows of ``shuffle_window`` samples
   (drawn from ``(seed, epoch, rank, world size)``), which mixes a few shards per batch.

Loader workers decode whole batches (Paddle hands batch k of a rank to worker
k mod num_workers), so the order does not depend on the number of workers. With
``drop_last`` the last incomplete batch of each rank's share is not used. Augmentations are
drawn per (seed, epoch, sample number) as in :mod:`passl.data.datasets`.

Resuming mid-epoch: :meth:`ShardBatchSampler.start_epoch_at` starts an epoch after the
first ``offset`` samples of this rank's share (steps done x per-process batch).
"""
import numpy as np
from paddle.io import BatchSampler

from passl import distributed
from passl.data.datasets import ImageDataset, _existing_dir
from passl.data.image_io import DataError, decode_image
from passl.data.registry import DATASETS
from passl.errors import ConfigError
from passl.io.tar_shards import ShardReader, read_index


def epoch_order(shard_of, seed, epoch, rank, world_size, shuffle_window, shuffle=True):
    """Sample numbers of ``rank``'s share of ``epoch`` (see the module docstring).

    Only the shards that overlap this rank's share are permuted, so the work and memory are
    about 1/world of the dataset plus one entry per shard.

    Args:
        shard_of: shard number of every sample, non-decreasing (the index's ``shard``).
    """
    count = len(shard_of)
    starts = np.searchsorted(shard_of, np.arange(shard_of[-1] + 2))  # shard s: starts[s:s+2]
    sizes = np.diff(starts)
    shards = np.random.default_rng([seed, epoch]).permutation(len(sizes)) if shuffle \
        else np.arange(len(sizes))
    ends = np.cumsum(sizes[shards])  # where each shard ends in the epoch's order

    def order_between(lo, hi):
        """Positions [lo, hi) of the epoch's order, 0 <= lo <= hi <= count."""
        parts = []
        for k in range(int(np.searchsorted(ends, lo, side="right")), len(shards)):
            shard, begin = shards[k], ends[k] - sizes[shards[k]]
            if begin >= hi:
                break
            within = np.random.default_rng([seed, epoch, shard]).permutation(sizes[shard]) \
                if shuffle else np.arange(sizes[shard])
            parts.append(starts[shard] + within[max(lo - begin, 0):min(hi, ends[k]) - begin])
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    per_rank = -(-count // world_size)
    parts, position = [], rank * per_rank
    while position < (rank + 1) * per_rank:  # the padded order repeats the order
        base = position - position % count
        stop = min((rank + 1) * per_rank, base + count)
        parts.append(order_between(position - base, stop - base))
        position = stop
    share = np.concatenate(parts)
    if shuffle and shuffle_window > 1:
        rng = np.random.default_rng([seed, epoch, rank, world_size])
        share = np.concatenate([rng.permutation(share[i:i + shuffle_window])
                                for i in range(0, per_rank, shuffle_window)])
    return share


class ShardBatchSampler(BatchSampler):
    """This rank's batches of :func:`epoch_order`; ``set_epoch`` as DistributedBatchSampler."""

    def __init__(self, dataset, batch_size, shuffle=True, drop_last=True, rank=None,
                 world_size=None):
        self.dataset, self.batch_size = dataset, batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rank = distributed.get_rank() if rank is None else rank
        self.world_size = distributed.get_world_size() if world_size is None else world_size
        self.epoch, self.offset = 0, 0

    def set_epoch(self, epoch):
        self.start_epoch_at(epoch, 0)

    def start_epoch_at(self, epoch, offset):
        """Iterate ``epoch`` from sample ``offset`` of this rank's share (0: the whole epoch)."""
        self.epoch, self.offset = int(epoch), int(offset)

    def order(self):
        """This rank's remaining sample numbers of the epoch, in reading order."""
        d = self.dataset
        return epoch_order(d.shard_of, d.seed, self.epoch, self.rank, self.world_size,
                           d.shuffle_window, self.shuffle)[self.offset:]

    def __iter__(self):
        order = self.order()
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        for i in range(0, stop, self.batch_size):
            yield order[i:i + self.batch_size].tolist()

    def __len__(self):
        remaining = -(-len(self.dataset) // self.world_size) - self.offset
        return remaining // self.batch_size if self.drop_last else -(-remaining // self.batch_size)


@DATASETS.register()
class TarShards(ImageDataset):
    """Images from a ``tools/make_shards.py`` directory.

    Config keys: ``root`` (the shard directory), ``transforms``, ``shuffle_window`` (samples
    shuffled together within a rank's share, default 2048), ``skip_corrupt``, ``seed``
    (the trainer passes the config's seed). A missing or truncated shard is a one-line
    error at start; one truncated later is one when it is read.
    """

    def __init__(self, root, transforms=None, shuffle_window=2048, skip_corrupt=False, seed=0):
        root = _existing_dir(root, type(self).__name__)
        if not isinstance(shuffle_window, int) or shuffle_window < 1:
            raise ConfigError(f"TarShards.shuffle_window: expected a positive integer, got "
                              f"{shuffle_window!r}")
        index = read_index(root)
        super().__init__(root, [], index["label"], transforms, skip_corrupt, seed)
        self.classes = [str(c) for c in index["classes"]]
        self.shard_of = index["shard"]
        self.shuffle_window = shuffle_window
        self.reader = ShardReader(root, index)

    def path(self, index):
        return self.reader.where(index)

    def read(self, index):
        try:
            return decode_image(self.reader.read(index))
        except ValueError as e:
            raise DataError(f"{self.path(index)}: {e}; re-create the shards from a good copy, "
                            f"or set skip_corrupt: true in the dataset block") from None

    def batch_sampler(self, batch_size, shuffle, drop_last):
        """The training sampler that reads in shard order (used by passl.data.loader)."""
        return ShardBatchSampler(self, batch_size, shuffle, drop_last)
