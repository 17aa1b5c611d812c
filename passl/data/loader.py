"""Paddle DataLoaders from the config's ``dataloader.train`` / ``dataloader.val`` blocks.

Each block has three parts::

    dataset: {name: ImageFolder, root: ..., transforms: [...]}   # DATASETS block
    sampler: {batch_size: 64, shuffle: true, drop_last: true}    # batch_size is per process
    loader:  {num_workers: 4, use_shared_memory: true}

Batches are ``(inputs, labels)``: ``inputs`` a float32 Tensor ``[B, 3, H, W]`` or, for
multi-crop datasets, a list with one such Tensor per crop (crops of equal size
consecutive); ``labels`` int64 ``[B]`` (-1 when unlabelled). With ``with_indices``
(:func:`build_dataloader`, for a model that keeps per-sample state) a third element,
``indices`` int64 ``[B]``, gives each image's index in the dataset.

Before each epoch call :func:`set_loader_epoch`: it reshuffles the sampler and selects
the dataset's augmentations for that epoch, and, for a run resumed mid-epoch, skips the
batches already trained on. Workers are not persistent, so each epoch's workers start from
the dataset as it is when iteration begins.
"""
import atexit
import itertools
import multiprocessing.util  # noqa: F401  (registers its exit function before close_all's)
import queue
import signal
import threading
import weakref

import cv2
import numpy as np
import paddle
from paddle.io import BatchSampler, DataLoader, DistributedBatchSampler, Sampler

from passl import distributed
from passl.data.registry import DATASETS
from passl.errors import ConfigError, ResumableError, UserError
from passl.preemption import ignore_stop_signals
from passl.registry import check_keys, key_path_of, source_of

MODES = ("train", "val")
#: Accepted keys of the ``sampler`` block and their defaults per mode (None = required).
SAMPLER_DEFAULTS = {
    "train": {"batch_size": None, "shuffle": True, "drop_last": True},
    "val": {"batch_size": None, "shuffle": False, "drop_last": False},
}
#: Accepted keys of the ``loader`` block (paddle.io.DataLoader arguments) and defaults.
LOADER_DEFAULTS = {"num_workers": 0, "use_shared_memory": True, "prefetch_factor": 2, "timeout": 0}


def _block_options(cfg, key, defaults, parent):
    """``defaults`` updated with ``cfg[key]``; unknown or missing keys are ConfigErrors."""
    block = cfg.get(key) or {}
    path = f"{parent}.{key}"
    if not isinstance(block, dict):
        raise ConfigError(f"{path}{source_of(cfg)}: expected a mapping, got {block!r}")
    check_keys(block, defaults, path, source_of(cfg))
    options = {**defaults, **block}
    for name, value in options.items():
        if value is None:
            raise ConfigError(f"{path}{source_of(cfg)}: missing {name!r}; add it to the block")
    return options


def collate_batch(batch):
    """[(sample, label)] -> (stacked samples, int64 labels); a multi-crop sample (a list of
    crops) becomes a list with one ``[B, 3, H, W]`` array per crop. The DataLoader turns
    the arrays into Tensors (through shared memory when collated in a worker).
    [(sample, label, index)] (:class:`WithIndices`) adds the int64 indices."""
    samples, labels, *indices = zip(*batch)
    labels = np.asarray(labels, dtype=np.int64)
    extra = tuple(np.asarray(values, dtype=np.int64) for values in indices)
    if isinstance(samples[0], (list, tuple)):
        crops = [np.stack([crops[v] for crops in samples]) for v in range(len(samples[0]))]
        return (crops, labels) + extra
    return (np.stack(samples), labels) + extra


class WithIndices(paddle.io.Dataset):
    """A dataset whose items carry their index: ``(sample, label, index)``.

    For methods that keep per-sample state across steps (DeepCluster-v2's memory bank and
    cluster assignments). The index is the one the sampler asked for, so it is the position
    in ``dataset`` (a subset's own numbering, a TarShards sample number) whatever the
    sampler, rank or worker. Other attributes (``set_epoch``, ``transform``, ...) are the
    wrapped dataset's.
    """

    def __init__(self, dataset):
        super().__init__()
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        sample, label = self.dataset[index]
        return sample, label, int(index)

    def __getattr__(self, name):
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def single_threaded_opencv(worker_id=None):
    """OpenCV's own thread pool fights Paddle's OpenMP threads for the same cores (a
    training step measured 1.32 s with it, 0.77 s without): use one OpenCV thread."""
    cv2.setNumThreads(1)


def init_worker(worker_id):
    """Set-up of each loader worker process: one OpenCV thread, and no stop signals (the
    training process finishes its step, then stops its workers itself: see
    :meth:`_WorkerUserErrors.close`)."""
    single_threaded_opencv()
    ignore_stop_signals()


class RankShard(Sampler):
    """This rank's share of the dataset in order (indices rank, rank + world, ...).

    Unlike DistributedBatchSampler it does not pad the dataset to a multiple of the
    world size, so an evaluation over all ranks counts every sample exactly once.
    """

    def __init__(self, dataset):
        super().__init__(dataset)
        self.size = len(dataset)
        self.rank, self.world_size = distributed.get_rank(), distributed.get_world_size()

    def __iter__(self):
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self):
        return len(range(self.rank, self.size, self.world_size))


class ResumableBatchSampler(DistributedBatchSampler):
    """DistributedBatchSampler that can start an epoch after its first ``skip`` batches.

    The batches are those of the full epoch (the permutation depends only on the epoch), so
    a run resumed mid-epoch sees exactly the batches the uninterrupted run saw next; the
    skipped ones are never sent to the dataset, so their images are not loaded. ``len()``
    stays the full epoch's. The skip applies to the next iteration only.
    """

    skip = 0

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return itertools.islice(super().__iter__(), skip, None)


def build_batch_sampler(dataset, mode, batch_size, shuffle, drop_last):
    """Training: :class:`ResumableBatchSampler` (a new permutation per epoch, the same on
    every rank), or the dataset's own ``batch_sampler`` when it has one (TarShards).
    Ordered evaluation: :class:`RankShard` batches, without padding."""
    if mode == "val" and not shuffle:
        return BatchSampler(sampler=RankShard(dataset), batch_size=batch_size, drop_last=drop_last)
    if hasattr(dataset, "batch_sampler"):  # a dataset with its own reading order (TarShards)
        return dataset.batch_sampler(batch_size, shuffle, drop_last)
    return ResumableBatchSampler(dataset, batch_size=batch_size, shuffle=shuffle,
                                 drop_last=drop_last)


class DataWorkerDied(ResumableError):
    """A loader worker process died (usually killed by the out-of-memory killer)."""


def worker_death(workers):
    """The :class:`DataWorkerDied` naming the first of ``workers`` (a Paddle iterator's
    worker processes) killed by a signal, or None when none was."""
    for index, worker in enumerate(workers):
        if worker.exitcode is not None and worker.exitcode < 0:
            return DataWorkerDied(
                f"data-loader worker {index} (pid {worker.pid}) was killed by "
                f"{signal.Signals(-worker.exitcode).name}; usually the out-of-memory killer: "
                f"lower dataloader.train.loader.num_workers or "
                f"dataloader.train.sampler.batch_size")
    return None


class _WorkerUserErrors:
    """Brings a loader worker's UserError (e.g. a corrupt image) or death back to the main
    thread as one clear error.

    Paddle re-raises a worker's exception in its prefetch thread, where Python only
    prints it, and the main thread then fails with "SystemError: Blocking queue is
    killed". A ``threading.excepthook`` keeps UserErrors from that thread (chaining to
    the previous hook for anything else), and the iterator raises the kept error in
    place of the SystemError, so the user sees the one line naming the file. A worker
    that died (SIGKILL from the out-of-memory killer) ends in the same SystemError: that
    becomes :class:`DataWorkerDied` (:func:`worker_death`).

    Workers ignore SIGTERM (:func:`init_worker`), and SIGTERM is how multiprocessing stops
    the workers still running when the process exits (then waits for them): every Paddle
    iterator still open at exit (its prefetch thread keeps it alive) is closed first
    (:meth:`close_all`, an ``atexit`` function).
    """

    WAIT_SECONDS = 2.0  # the prefetch thread raises right after killing the queue
    CLOSE_SECONDS = 5.0  # for the workers to stop before they are killed
    errors = queue.SimpleQueue()
    previous_hook = None
    open_iterators = weakref.WeakSet()

    @classmethod
    def install(cls):
        # compare functions: every cls.hook access is a new bound method
        if getattr(threading.excepthook, "__func__", None) is not cls.hook.__func__:
            cls.previous_hook, threading.excepthook = threading.excepthook, cls.hook

    @classmethod
    def hook(cls, args):
        thread_name = args.thread.name if args.thread is not None else ""
        if isinstance(args.exc_value, UserError) and "_thread_loop" in thread_name:
            cls.errors.put(args.exc_value)
        else:
            cls.previous_hook(args)

    def __init__(self, iterator):
        self.iterator = iterator
        while not self.errors.empty():  # left over from an earlier loader
            self.errors.get_nowait()
        self.open_iterators.add(iterator)

    @classmethod
    def close(cls, iterator):
        """Stop the workers of a Paddle ``iterator`` with Paddle's own shutdown; SIGKILL
        those still alive after CLOSE_SECONDS."""
        getattr(iterator, "_try_shutdown_all", lambda timeout: None)(cls.CLOSE_SECONDS)
        for worker in getattr(iterator, "_workers", ()):
            if worker.is_alive():
                worker.kill()

    @classmethod
    def close_all(cls):
        for iterator in list(cls.open_iterators):
            cls.close(iterator)

    def __iter__(self):
        return self

    def __len__(self):
        return len(self.iterator)

    def __next__(self):
        try:
            return next(self.iterator)
        except SystemError as system_error:
            died = worker_death(getattr(self.iterator, "_workers", ()))
            if died is not None:
                thread = getattr(self.iterator, "_thread", None)
                if thread is not None:  # it logs Paddle's own warning first, then ends
                    thread.join(self.WAIT_SECONDS)
                self.close(self.iterator)
                raise died from None
            try:
                error = self.errors.get(timeout=self.WAIT_SECONDS)
            except queue.Empty:
                raise system_error from None
            self.close(self.iterator)  # now, not at exit
            raise error from None


# registered after multiprocessing's own exit function (imported above), so it runs first
atexit.register(_WorkerUserErrors.close_all)


class PasslDataLoader(DataLoader):
    """paddle.io.DataLoader whose data errors reach the caller as themselves.

    Without workers, batches are read in the calling thread: Paddle's single-process
    iterator reads them in a helper thread that, when the dataset raises, dies without
    waking the consumer, which then waits forever (Paddle 3.3).
    """

    def __iter__(self):
        if self.num_workers == 0:
            return self._read_in_this_thread()
        iterator = super().__iter__()
        # Paddle's SIGCHLD handler raises a dead worker's SystemError in the main thread
        # wherever it is: inside a logging call (which swallows it and prints a traceback) or
        # a checkpoint write. Its prefetch thread notices the death as well (within 5 s), and
        # then the next batch fails where _WorkerUserErrors reports it.
        if threading.current_thread() is threading.main_thread():  # where signals can be set
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        return _WorkerUserErrors(iterator)

    def _read_in_this_thread(self):
        for indices in self.batch_sampler:
            inputs, *rest = self.collate_fn([self.dataset[i] for i in indices])
            inputs = [paddle.to_tensor(crop) for crop in inputs] \
                if isinstance(inputs, list) else paddle.to_tensor(inputs)
            yield (inputs, *(paddle.to_tensor(values) for values in rest))


def build_dataloader(cfg, mode="train", seed=0, with_indices=False):
    """A paddle.io.DataLoader over a DistributedBatchSampler for ``cfg`` (a
    ``dataloader.train``/``val`` block); ``seed`` is the config's seed, passed to the
    dataset for its per-sample augmentation generators. ``with_indices``: batches are
    ``(inputs, labels, indices)`` with each image's dataset index (:class:`WithIndices`),
    for a model that asks for them (``needs_sample_indices``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    path = key_path_of(cfg, f"dataloader.{mode}")
    if not isinstance(cfg, dict) or "dataset" not in cfg:
        raise ConfigError(f"{path}{source_of(cfg)}: needs a 'dataset' block "
                          "(plus 'sampler' and 'loader')")
    check_keys(cfg, ("dataset", "sampler", "loader"), path, source_of(cfg))
    sampler_options = _block_options(cfg, "sampler", SAMPLER_DEFAULTS[mode], path)
    loader_options = _block_options(cfg, "loader", LOADER_DEFAULTS, path)
    batch_size = sampler_options["batch_size"]
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"{path}.sampler.batch_size{source_of(cfg)}: expected a positive int, "
                          f"got {batch_size!r}")

    single_threaded_opencv()
    dataset = DATASETS.build(cfg["dataset"], seed=seed)
    sampler = build_batch_sampler(dataset, mode, **sampler_options)
    if len(sampler) == 0:
        raise ConfigError(
            f"{path}.sampler.batch_size{source_of(cfg)}: {batch_size} per process leaves no full batch "
            f"of the {len(dataset)} samples on each of {distributed.get_world_size()} process(es); "
            "lower it")
    _WorkerUserErrors.install()
    if with_indices:
        dataset = WithIndices(dataset)
    return PasslDataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch,
                           worker_init_fn=init_worker, persistent_workers=False,
                           **loader_options)


def set_loader_epoch(loader, epoch, skip_batches=0):
    """Prepare ``loader`` for ``epoch``: the sampler's permutation (Paddle seeds it with the
    epoch, so it is the same on every rank; ordered evaluation samplers have none) and the
    dataset's augmentations.

    ``skip_batches``: the next iteration starts after that many batches of the epoch (each
    rank skips that many of its own), without loading them: how a run resumed mid-epoch
    (``steps_in_epoch`` of its checkpoint) continues with the batches it would have seen.
    A TarShards sampler starts its share at ``skip_batches x batch_size`` images instead.
    """
    if hasattr(loader.batch_sampler, "set_epoch"):
        loader.batch_sampler.set_epoch(epoch)
    sampler = loader.batch_sampler
    if skip_batches and isinstance(sampler, ResumableBatchSampler):
        sampler.skip = skip_batches
    elif skip_batches and hasattr(sampler, "start_epoch_at"):  # TarShards: this rank's offset
        sampler.start_epoch_at(epoch, skip_batches * sampler.batch_size)
    elif skip_batches:
        raise ValueError(f"cannot skip batches of a {type(sampler).__name__}")
    loader.dataset.set_epoch(epoch)
