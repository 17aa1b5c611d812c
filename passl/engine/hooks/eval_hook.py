"""Top-k accuracy of a classifier on the val set, with the best top-1 of the run."""
from passl.engine.hooks.base import HOOKS, Hook
from passl.errors import ConfigError
from passl.evaluation.classification import evaluate


@HOOKS.register()
class EvalHook(Hook):
    """Evaluator: top-k accuracy (percent) of ``trainer.model`` on ``trainer.val_loader``.

    The trainer calls :meth:`evaluate` every ``eval_interval`` epochs (top-level config key),
    after the last epoch, and for ``tools/train.py --evaluate-only``; it writes the returned
    metrics as one ``eval`` record to metrics.jsonl. During training the record also carries
    ``best_top1`` and ``best_epoch`` (kept in checkpoints, so a resumed run continues them),
    and the best is logged when the run ends.

    Config keys (``hooks: [{name: EvalHook, ...}]``):
        topk: the top-k accuracies to report; must include 1.
    """

    def __init__(self, topk=(1, 5)):
        self.topk = tuple(topk)
        if 1 not in self.topk:
            raise ConfigError(f"hooks: EvalHook topk {list(self.topk)} must include 1 "
                              "(the best epoch is chosen by top-1)")
        self.tracking_best = False
        self.best_top1 = None
        self.best_epoch = None

    def before_run(self, trainer):
        self.tracking_best = True  # a training run (evaluate-only runs no hook events)

    def evaluate(self, trainer):
        if trainer.val_loader is None:
            raise ConfigError("hooks: EvalHook needs a val set; add a dataloader.val block "
                              "(dataset, sampler, loader) to the config")
        result = evaluate(trainer.model, trainer.val_loader, self.topk)
        metrics = {f"top{k}": result[f"top{k}"] for k in self.topk}
        if self.tracking_best:
            if self.best_top1 is None or metrics["top1"] > self.best_top1:
                self.best_top1, self.best_epoch = metrics["top1"], trainer.epoch + 1
            metrics.update(best_top1=self.best_top1, best_epoch=self.best_epoch)
        return metrics

    def after_run(self, trainer):
        if self.best_epoch is not None:
            trainer.logger.info(f"best val top1 {self.best_top1:.2f} at epoch {self.best_epoch}")

    def state_dict(self):
        return {"best_top1": self.best_top1, "best_epoch": self.best_epoch}

    def set_state_dict(self, state):
        self.best_top1, self.best_epoch = state["best_top1"], state["best_epoch"]
