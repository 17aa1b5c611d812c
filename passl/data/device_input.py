"""Train batches on their way to the device: the /dev/shm they need, and normalisation there.

With ``num_workers > 0`` and ``use_shared_memory`` Paddle's workers hand batches over in
``/dev/shm``: up to ``prefetch_factor x num_workers`` batches per process, and every training
process on the machine shares the one ``/dev/shm``. Containers often mount only 64 MB there,
and running out kills a worker with a bus error deep in the loader; :func:`check_shared_memory`
says so before training, with the numbers and the fix.
"""
import math
import os

from passl.errors import UserError

SHM = "/dev/shm"


def _nbytes(sample):
    if isinstance(sample, (list, tuple)):
        return sum(_nbytes(part) for part in sample)
    return getattr(sample, "nbytes", 0)


def _size(count):
    return f"{count / 2 ** 30:.1f} GB" if count >= 2 ** 30 else f"{count / 2 ** 20:.0f} MB"


def shared_memory_need(loader, processes):
    """``(bytes, how)``: /dev/shm the train loaders of ``processes`` local processes need
    at most (one sample is loaded to measure it), or ``(0, reason)`` when they use none."""
    if not loader.num_workers or not loader.use_shared_memory:
        return 0, "no shared memory (num_workers 0 or use_shared_memory false)"
    return loaders_need(_nbytes(loader.dataset[0][0]), loader.batch_sampler.batch_size,
                        loader.num_workers, loader.prefetch_factor, processes)


def loaders_need(sample_bytes, batch, workers, prefetch, processes):
    """``(bytes, how)``: batches in flight (``workers x prefetch`` per process) x their size."""
    need = sample_bytes * batch * workers * prefetch * processes
    return need, (f"batch {batch} x {sample_bytes / 2 ** 20:.2f} MB per sample x {workers} "
                  f"workers x prefetch {prefetch} x {processes} process(es)")


def shared_memory_status(need, how, path=SHM):
    """``(level, message)`` for loaders needing ``need`` bytes of ``path``: ``error`` when it
    can never fit, ``warning`` when it is not free now, ``ok``; ``(None, None)`` when there is
    nothing to check (no shared memory used, or no ``path`` on this system)."""
    if not need or not os.path.isdir(path):
        return None, None
    stat = os.statvfs(path)
    total, free = stat.f_blocks * stat.f_frsize, stat.f_bavail * stat.f_frsize
    fix = (f"enlarge it (docker run --shm-size={math.ceil(need * 1.25 / 2 ** 30)}g, or "
           f"mount -o remount,size=... {path}), or lower dataloader.train.loader.num_workers/"
           f"prefetch_factor, or set dataloader.train.loader.use_shared_memory=false")
    if need > total:
        return "error", (f"{path} holds {_size(total)} but the train loader needs about "
                         f"{_size(need)} ({how}); {fix}")
    if need > free:
        return "warning", (f"{path} has {_size(free)} free of {_size(total)}, the train loader "
                           f"needs about {_size(need)} ({how}); if a worker dies with a bus "
                           f"error, {fix}")
    return "ok", (f"{path}: the train loader needs about {_size(need)} ({how}) of "
                  f"{_size(free)} free")


def check_shared_memory(loader, processes, logger, path=SHM):
    """Refuse to start when the loaders cannot fit in ``path``; warn when it is short now."""
    need, how = shared_memory_need(loader, processes)
    level, message = shared_memory_status(need, how, path)
    if level == "error":
        raise UserError(message)
    if level is not None:
        (logger.warning if level == "warning" else logger.info)(message)
    return need


def batch_normalizer(loader):
    """``batch -> batch`` for the trainer: the dataset transform's ``device_normalize()``
    (``Normalize``/``MultiCrop`` with uint8 output), else the identity."""
    transform = getattr(loader.dataset, "transform", None)
    normalize = getattr(transform, "device_normalize", lambda: None)()
    return normalize or (lambda batch: batch)
