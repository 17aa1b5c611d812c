"""Hook base class, priorities and the HOOKS registry.

A hook overrides only the events it needs; the trainer calls every hook's
method for each event in priority order (lower value first). Hooks that hold
state across a run (a queue, a best metric) implement ``state_dict()`` /
``set_state_dict()`` and are saved in checkpoints under their class name.
"""
from passl.registry import Registry

HOOKS = Registry("hook")


class Priority:
    """Named priorities; lower runs earlier within each event."""
    HIGHEST = 0
    VERY_HIGH = 10
    HIGH = 30
    ABOVE_NORMAL = 40
    NORMAL = 50
    BELOW_NORMAL = 60
    LOW = 70
    VERY_LOW = 90
    LOWEST = 100


class Hook:
    """Base hook: every event is a no-op.

    Events, in the order the trainer fires them::

        before_run
          before_epoch
            before_iter -> forward -> backward -> after_backward -> optimizer step -> after_iter
            (on a stop signal: before_save, then the mid-epoch checkpoint)
          after_epoch
        after_run

    ``trainer`` attributes a hook may use: ``model`` (the unwrapped ``paddle.nn.Layer``),
    ``optimizer``, ``lr_scheduler``, ``cfg``, ``output_dir``, ``logger``, ``epoch``
    (0-based current epoch), ``epochs``, ``iter`` (0-based global index of the current
    step; after the run it counts the steps done), ``inner_iter``, ``iters_per_epoch``,
    ``global_batch_size``, ``world_size``, ``rank``, ``outputs`` (the last step's
    ``{'loss', 'logs'}``), ``train_loader``, ``val_loader``, ``metrics`` (a
    :class:`~passl.io.metrics_log.MetricsLog`).
    """

    priority = Priority.NORMAL

    def before_run(self, trainer):
        pass

    def after_run(self, trainer):
        pass

    def before_epoch(self, trainer):
        pass

    def after_epoch(self, trainer):
        pass

    def before_iter(self, trainer):
        pass

    def after_backward(self, trainer):
        pass

    def after_iter(self, trainer):
        pass

    def before_save(self, trainer):
        """Every rank, right before a mid-epoch checkpoint (a stop signal) is written."""

    def state_dict(self):
        return {}

    def set_state_dict(self, state):
        pass

    def state_from_ranks(self, rank_states, saved_global_batch, trainer):
        """This rank's state when resuming a checkpoint of another world size or global batch.

        ``rank_states`` holds the saved ``state_dict()`` of every saving rank, in rank order.
        The default suits state that is the same on every rank (a best metric): rank 0's.
        A hook whose state differs per rank (SwAV's queue) overrides this.
        """
        return rank_states[0]
