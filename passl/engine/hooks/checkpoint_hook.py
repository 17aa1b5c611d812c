"""Saves a resumable checkpoint every ``save_interval`` epochs and after the last one."""
from passl.engine import trainer_checkpoint
from passl.engine.hooks.base import HOOKS, Hook, Priority
from passl.errors import ConfigError


@HOOKS.register()
class CheckpointHook(Hook):
    """Writes ``output_dir/checkpoints/epoch_N.pd`` and points ``latest.pd`` at it.

    Config keys (``hooks`` entry ``name: CheckpointHook``; added with the defaults when the
    config does not list it):
        save_interval: epochs between checkpoints (the last epoch is always saved).
        keep_last: how many newest ``epoch_N.pd`` files to keep (0: all).

    A write that fails (e.g. a full disk) stops the run with one line naming the file and the
    free space; the previous checkpoint and ``latest.pd`` stay as they were.

    Runs late in ``after_epoch`` (after evaluation and the other hooks have updated their
    state), so the checkpoint holds exactly the state the next epoch starts from.
    """

    priority = Priority.LOW

    def __init__(self, save_interval=1, keep_last=3):
        if not isinstance(save_interval, int) or save_interval < 1:
            raise ConfigError(f"CheckpointHook.save_interval: expected an integer >= 1, "
                              f"got {save_interval!r}")
        if not isinstance(keep_last, int) or keep_last < 0:
            raise ConfigError(f"CheckpointHook.keep_last: expected an integer >= 0 (0: keep all), "
                              f"got {keep_last!r}")
        self.save_interval = save_interval
        self.keep_last = keep_last
        self.last_saved = None

    def after_epoch(self, trainer):
        done = trainer.epoch + 1
        if done % self.save_interval and done != trainer.epochs:
            return
        self.last_saved = trainer_checkpoint.save_trainer_checkpoint(trainer, self.keep_last)  # collective
        if trainer.rank == 0:
            trainer.logger.info(f"checkpoint saved: {self.last_saved}")
