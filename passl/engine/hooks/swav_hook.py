"""SwAV's training-time schedule: frozen prototypes at the start, and the embedding queue."""
from passl.engine.hooks.base import HOOKS
from passl.engine.hooks.prototype_freezing import FreezePrototypesHook
from passl.models.losses.swav_queue import (SwAVQueue, queue_rows_per_rank, queue_union,
                                            shard_queue_union)


def queue_fill_warning(queue_rows, iters_per_epoch, global_batch_size, epoch_queue_starts, epochs):
    """A warning when the queue (``queue_rows`` over all ranks) is longer than an epoch's
    embeddings, else None.

    The reference sizes the queue well below an epoch (3840 of ImageNet's 1.28M images); on a
    small dataset a longer one fills only after several epochs, then holds each image several
    times over (older copies from older weights), and in a short run it is never full, so
    never used.
    """
    per_epoch = iters_per_epoch * global_batch_size
    if queue_rows <= per_epoch:
        return None
    fill_steps = queue_rows // global_batch_size
    steps_after_start = max(epochs - epoch_queue_starts, 0) * iters_per_epoch
    when = ("so this run never uses it" if fill_steps >= steps_after_start else
            f"so it is first used in epoch {epoch_queue_starts + fill_steps // iters_per_epoch + 1}"
            f" of {epochs}")  # 1-based, as the log counts; full after fill_steps pushes
    return (f"SwAV queue: {queue_rows} embeddings per assignment crop, but an epoch yields only "
            f"{per_epoch} ({iters_per_epoch} steps of {global_batch_size}): it fills in "
            f"{fill_steps / iters_per_epoch:.1f} epochs from epoch_queue_starts "
            f"{epoch_queue_starts}, {when}; for this dataset set SwAVHook queue_length to at "
            f"most {per_epoch} (or 0: no queue)")


@HOOKS.register()
class SwAVHook(FreezePrototypesHook):
    """Freezes the prototypes for the first iterations and runs the SwAV queue.

    Config keys (``hooks`` entry ``name: SwAVHook``):
        freeze_prototypes_epochs: epochs (converted with the trainer's
            iterations per epoch) during which the prototypes do not move;
        freeze_prototypes_niters: the same in iterations; give exactly one of
            the two (0 disables freezing).
        queue_length: queued embeddings per assignment crop over all ranks
            (0: no queue); rounded down to a multiple of the global batch. Longer than
            an epoch's embeddings (a small dataset) is warned about at the start.
        epoch_queue_starts: first epoch (0-based) that fills the queue.

    Freezing: see :class:`~passl.engine.hooks.prototype_freezing.FreezePrototypesHook`.
    The queue lives on ``trainer.model.loss.queue``; the hook's state (saved
    per rank) carries it across resumes.
    """

    def __init__(self, freeze_prototypes_niters=None, freeze_prototypes_epochs=None,
                 queue_length=0, epoch_queue_starts=15):
        super().__init__(freeze_prototypes_niters, freeze_prototypes_epochs)
        self.check_not_negative(queue_length=queue_length, epoch_queue_starts=epoch_queue_starts)
        self.queue_length = queue_length
        self.epoch_queue_starts = epoch_queue_starts
        self.queue_rows = None  # per rank, set in before_run
        self.queue = None
        self._queue_state = None  # loaded before the queue exists

    def before_run(self, trainer):
        super().before_run(trainer)
        if self.queue_length > 0:
            self.queue_rows = queue_rows_per_rank(self.queue_length, trainer.global_batch_size,
                                                  trainer.world_size)
            trainer.logger.info("SwAV queue: %d embeddings per assignment crop (%d per rank) "
                                "from epoch %d", self.queue_rows * trainer.world_size,
                                self.queue_rows, self.epoch_queue_starts)
            warning = queue_fill_warning(self.queue_rows * trainer.world_size,
                                         trainer.iters_per_epoch, trainer.global_batch_size,
                                         self.epoch_queue_starts, trainer.epochs)
            if warning:
                trainer.logger.warning(warning)
        elif self._queue_state is not None:
            trainer.logger.warning("SwAV: the checkpoint holds a queue but queue_length is 0; "
                                   "training continues without it")
            self._queue_state = None

    def before_epoch(self, trainer):
        due = trainer.epoch >= self.epoch_queue_starts or self._queue_state is not None
        if self.queue is None and self.queue_length > 0 and due:
            self._start_queue(trainer)

    def _start_queue(self, trainer):
        loss = trainer.model.loss
        embedding_dim = trainer.model.head.prototype_weights()[0].shape[0]
        self.queue = SwAVQueue(len(loss.crops_for_assign), self.queue_rows, embedding_dim)
        if self._queue_state is not None:
            self.queue.set_state_dict(self._queue_state)
            self._queue_state = None
        loss.queue = self.queue

    def state_dict(self):
        return {"queue": self.queue.state_dict()} if self.queue is not None else {}

    def set_state_dict(self, state):
        if state.get("queue") is not None:
            self._queue_state = state["queue"]
            if self.queue is not None:
                self.queue.set_state_dict(self._queue_state)
                self._queue_state = None

    def state_from_ranks(self, rank_states, saved_global_batch, trainer):
        """Re-shard the saved queues: their union (newest first, ranks in order within a step,
        see :func:`~passl.models.losses.swav_queue.queue_union`) is split over this run's
        ranks; the newest embeddings are kept when the new queue is shorter."""
        queues = [state.get("queue") for state in rank_states]
        if not all(queues) or self.queue_length == 0:
            return {}  # no queue yet (it starts at epoch_queue_starts) or none wanted
        union = queue_union([q["embeddings"] for q in queues], saved_global_batch // len(queues))
        rows = queue_rows_per_rank(self.queue_length, trainer.global_batch_size,
                                   trainer.world_size)
        local_batch = trainer.global_batch_size // trainer.world_size
        embeddings, complete = shard_queue_union(union, trainer.world_size, trainer.rank,
                                                 local_batch, rows)
        trainer.logger.info(
            f"SwAV queue re-sharded: {union.shape[1]} queued embeddings per assignment crop from "
            f"{len(queues)} rank(s) -> {rows} on each of {trainer.world_size} rank(s), newest "
            f"first" + ("" if complete else "; the oldest rows are empty, so the queue is used "
                                            "again once it has refilled"))
        return {"queue": {"embeddings": embeddings,
                          "in_use": complete and all(q["in_use"] for q in queues)}}
