"""Learning-rate schedules set every iteration, derived from epochs x iterations per epoch.

The trainer builds a schedule with the run's ``epochs``, ``iters_per_epoch`` and
``global_batch_size`` (never from hard-coded iteration counts) and calls ``step()`` after
every optimizer step, so ``last_epoch`` counts iterations. All schedules subclass
``paddle.optimizer.lr.LRScheduler``: its ``state_dict()`` (iteration and lr) is all a
checkpoint needs, because the lr is a pure function of the iteration.

Linear scaling rule: with ``reference_batch_size`` set, every lr value of the block is
multiplied by ``global_batch_size / reference_batch_size`` (see :func:`effective_lr`); SwAV's
reference lrs are for a global batch of 4096 (base 4.8) or 256 (base 0.6).
"""
import math

import numpy as np
from paddle.optimizer.lr import LRScheduler

from passl.errors import ConfigError
from passl.solver.registry import LR_SCHEDULERS
from passl.utils.logger import get_logger

#: Keys the trainer supplies; a config block must not set them.
RUN_KEYS = ("epochs", "iters_per_epoch", "global_batch_size")


def effective_lr(lr_values, global_batch_size, reference_batch_size):
    """The lr values actually used, after linear scaling; logs the rule and the result.

    Args:
        lr_values: ``{name: lr}`` as written in the config (e.g. base_lr, final_lr).
        global_batch_size: images per optimizer step over all processes.
        reference_batch_size: the global batch the config's lrs were tuned for, or None to
            use them unchanged.

    Returns:
        ``{name: scaled lr}``.
    """
    logger = get_logger()
    if reference_batch_size is None:
        logger.info(f"lr: global batch {global_batch_size}, no linear scaling "
                    f"(lr_scheduler.reference_batch_size not set): "
                    + ", ".join(f"{k} {v:g}" for k, v in lr_values.items()))
        return dict(lr_values)
    if isinstance(reference_batch_size, bool) or not isinstance(reference_batch_size, int) \
            or reference_batch_size <= 0:
        raise ConfigError(f"lr_scheduler.reference_batch_size: expected a positive integer or "
                          f"null, got {reference_batch_size!r}")
    factor = global_batch_size / reference_batch_size
    scaled = {k: v * factor for k, v in lr_values.items()}
    logger.info(f"lr: linear scaling by global batch {global_batch_size} / reference "
                f"{reference_batch_size} = {factor:g}: "
                + ", ".join(f"{k} {lr_values[k]:g} -> {scaled[k]:g}" for k in lr_values))
    return scaled


def _check_lr(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"lr_scheduler.{name}: expected a number >= 0, got {value!r}")
    return float(value)


class IterationScheduler(LRScheduler):
    """Base: ``lr_at(iteration)`` over ``epochs * iters_per_epoch`` iterations.

    Past the last iteration the final lr is kept. Subclasses set their tables/values before
    calling ``super().__init__`` (Paddle's constructor computes the first lr).
    """

    def __init__(self, first_lr, epochs, iters_per_epoch):
        if not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs: expected a positive integer, got {epochs!r}")
        if not isinstance(iters_per_epoch, int) or iters_per_epoch < 1:
            raise ConfigError(f"lr_scheduler: iterations per epoch must be >= 1, got "
                              f"{iters_per_epoch!r} (is the train set smaller than one batch?)")
        self.epochs = epochs
        self.iters_per_epoch = iters_per_epoch
        self.total_iters = epochs * iters_per_epoch
        super().__init__(learning_rate=first_lr)

    def lr_at(self, iteration):
        raise NotImplementedError

    def get_lr(self):
        return float(self.lr_at(min(self.last_epoch, self.total_iters - 1)))


@LR_SCHEDULERS.register()
class CosineWarmup(IterationScheduler):
    """SwAV's schedule: linear warmup, then half a cosine down to ``final_lr``.

    Exactly the reference's table: ``np.linspace(start_warmup, base_lr, W)`` for the
    ``W = iters_per_epoch * warmup_epochs`` warmup iterations, then
    ``final_lr + 0.5 * (base_lr - final_lr) * (1 + cos(pi * t / T))`` for ``t < T``,
    ``T = iters_per_epoch * (epochs - warmup_epochs)``.

    Args:
        base_lr: peak lr (after scaling, see :func:`effective_lr`).
        final_lr: lr at the end of the cosine.
        warmup_epochs: epochs of linear warmup (0: none).
        start_warmup: lr at the first warmup iteration.
        reference_batch_size: the global batch the lrs are tuned for (null: no scaling).
    """

    def __init__(self, base_lr, epochs, iters_per_epoch, global_batch_size, final_lr=0.0,
                 warmup_epochs=0, start_warmup=0.0, reference_batch_size=None):
        lrs = {"base_lr": _check_lr("base_lr", base_lr),
               "final_lr": _check_lr("final_lr", final_lr),
               "start_warmup": _check_lr("start_warmup", start_warmup)}
        if not isinstance(warmup_epochs, int) or not 0 <= warmup_epochs <= epochs:
            raise ConfigError(f"lr_scheduler.warmup_epochs: expected an integer in "
                              f"[0, epochs={epochs}], got {warmup_epochs!r}")
        lrs = effective_lr(lrs, global_batch_size, reference_batch_size)
        warmup = np.linspace(lrs["start_warmup"], lrs["base_lr"], iters_per_epoch * warmup_epochs)
        cosine_iters = iters_per_epoch * (epochs - warmup_epochs)
        cosine = np.array([lrs["final_lr"] + 0.5 * (lrs["base_lr"] - lrs["final_lr"])
                           * (1 + math.cos(math.pi * t / cosine_iters))
                           for t in range(cosine_iters)])
        self.table = np.concatenate((warmup, cosine))
        super().__init__(float(self.table[0]), epochs, iters_per_epoch)

    def lr_at(self, iteration):
        return self.table[iteration]


@LR_SCHEDULERS.register()
class Constant(IterationScheduler):
    """The same lr for every iteration (scaled when ``reference_batch_size`` is set)."""

    def __init__(self, lr, epochs, iters_per_epoch, global_batch_size, reference_batch_size=None):
        self.lr = effective_lr({"lr": _check_lr("lr", lr)}, global_batch_size,
                               reference_batch_size)["lr"]
        super().__init__(self.lr, epochs, iters_per_epoch)

    def lr_at(self, iteration):
        return self.lr


@LR_SCHEDULERS.register()
class MultiStep(IterationScheduler):
    """``base_lr * gamma ** (number of milestones reached)``; milestones are epochs.

    A milestone ``m`` takes effect at the first iteration of epoch ``m`` (0-based), as
    torch's MultiStepLR stepped once per epoch.
    """

    def __init__(self, base_lr, milestones, epochs, iters_per_epoch, global_batch_size,
                 gamma=0.1, reference_batch_size=None):
        if not isinstance(milestones, (list, tuple)) or not all(
                isinstance(m, int) and 0 < m for m in milestones):
            raise ConfigError(f"lr_scheduler.milestones: expected a list of positive epoch "
                              f"numbers, got {milestones!r}")
        self.milestones = sorted(milestones)
        self.gamma = _check_lr("gamma", gamma)
        self.base = effective_lr({"base_lr": _check_lr("base_lr", base_lr)}, global_batch_size,
                                 reference_batch_size)["base_lr"]
        super().__init__(self.base, epochs, iters_per_epoch)

    def lr_at(self, iteration):
        epoch = iteration // self.iters_per_epoch
        return self.base * self.gamma ** sum(1 for m in self.milestones if m <= epoch)


def build_lr_scheduler(cfg, epochs, iters_per_epoch, global_batch_size):
    """The ``lr_scheduler:`` block's schedule for this run's length and batch."""
    if cfg is None:
        raise ConfigError("lr_scheduler: missing block; add e.g. "
                          "`lr_scheduler: {name: CosineWarmup, base_lr: 0.6}`")
    for key in RUN_KEYS:
        if key in cfg:
            raise ConfigError(f"{getattr(cfg, 'key_path', 'lr_scheduler')}.{key}: set by the "
                              f"trainer from the run (top-level epochs, loader length, batch "
                              f"size x processes); remove it here")
    return LR_SCHEDULERS.build(cfg, epochs=epochs, iters_per_epoch=iters_per_epoch,
                               global_batch_size=global_batch_size)
