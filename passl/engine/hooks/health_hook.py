"""Stops a diverged run early and warns about SwAV's usual silent failure."""
import math

import paddle

from passl import distributed
from passl.engine import checkpoint
from passl.engine.hooks.base import HOOKS, Hook, Priority
from passl.errors import ConfigError, UserError


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the message says where and what to try."""


@HOOKS.register()
class HealthHook(Hook):
    """Checks the loss of every step.

    * A non-finite loss stops the run before the optimizer applies that step, with one line
      naming the iteration, the likely causes and the last good checkpoint (which is kept:
      nothing is saved after the failure). All processes stop together.
    * A loss that stays within ``collapse_tolerance`` (relative) of ``ln K`` for
      ``collapse_window`` iterations after the prototype-freezing period warns once: the
      cluster assignments have collapsed to uniform. ``K`` is read from the model's prototype
      heads (``model.head.prototype_weights()``, mean of ``ln K`` over heads); models without
      prototypes skip this check. The freezing period is the largest ``freeze_iters`` among
      the hooks (SwAVHook's), 0 if none. The warning quotes the model's ``prototypes_used`` log
      (share of prototypes that win a sample) when the model reports it.

    Config keys (``hooks`` entry ``name: HealthHook``; added with the defaults when the config
    does not list it): ``collapse_tolerance`` (0.01), ``collapse_window`` (iterations, 50).
    """

    priority = Priority.HIGHEST

    def __init__(self, collapse_tolerance=0.01, collapse_window=50):
        if not isinstance(collapse_window, int) or collapse_window < 1:
            raise ConfigError(f"HealthHook.collapse_window: expected an integer >= 1, "
                              f"got {collapse_window!r}")
        self.collapse_tolerance = float(collapse_tolerance)
        self.collapse_window = collapse_window
        self.uniform_loss = None
        self.freeze_iters = 0
        self.near_uniform_streak = 0
        self.warned = False

    def before_run(self, trainer):
        head = getattr(trainer.model, "head", None)
        if hasattr(head, "prototype_weights"):
            sizes = [w.shape[-1] for w in head.prototype_weights()]
            self.uniform_loss = sum(math.log(k) for k in sizes) / len(sizes)

    def before_epoch(self, trainer):
        # read here, not in before_run: SwAVHook sets freeze_iters in its own before_run
        self.freeze_iters = max([getattr(h, "freeze_iters", None) or 0 for h in trainer.hooks],
                                default=0)

    def after_backward(self, trainer):
        loss = float(trainer.outputs["loss"])
        bad = paddle.to_tensor(0.0 if math.isfinite(loss) else 1.0)
        if float(distributed.all_reduce(bad, op="max")) > 0:
            self._stop(trainer, loss)
        self._watch_collapse(trainer, loss)

    def _stop(self, trainer, loss):
        last_good = checkpoint.last_checkpoint(trainer.output_dir)
        kept = f"last good checkpoint kept: {last_good}" if last_good else \
            "no checkpoint was written yet"
        trainer.metrics.write({"type": "event", "event": "non_finite_loss",
                               "epoch": trainer.epoch + 1, "iter": trainer.iter + 1,
                               "loss": loss, "last_good_checkpoint": last_good})
        raise TrainingDiverged(
            f"non-finite loss ({loss}{' on another process' if math.isfinite(loss) else ''}) at "
            f"iteration {trainer.iter + 1} (epoch {trainer.epoch + 1}); stopped before the update. "
            f"Likely causes: lr too high for the global batch (check the logged lr scaling), "
            f"float16 overflow (try amp.dtype=bfloat16 or amp off), NaN/Inf in the input data, "
            f"or a too small Sinkhorn epsilon; {kept} (resume with --resume auto after a fix)")

    def _watch_collapse(self, trainer, loss):
        if self.warned or self.uniform_loss is None or trainer.iter < self.freeze_iters:
            return
        if abs(loss - self.uniform_loss) <= self.collapse_tolerance * self.uniform_loss:
            self.near_uniform_streak += 1
        else:
            self.near_uniform_streak = 0
        if self.near_uniform_streak < self.collapse_window:
            return
        self.warned = True
        used = trainer.outputs.get("logs", {}).get("prototypes_used")
        used_text = f"; prototypes used in the last batch: {float(used):.1%}" if used is not None \
            else ""
        trainer.logger.warning(
            f"the loss has stayed within {self.collapse_tolerance:.0%} of ln K = "
            f"{self.uniform_loss:.3f} for {self.collapse_window} iterations after the "
            f"prototype freeze (iteration {trainer.iter + 1}){used_text}: the cluster assignments "
            f"have probably collapsed to uniform. Remedies: lower the Sinkhorn epsilon, freeze "
            f"the prototypes longer, start the queue later or make it shorter")
        trainer.metrics.write({"type": "event", "event": "assignments_collapsed",
                               "epoch": trainer.epoch + 1, "iter": trainer.iter + 1,
                               "loss": loss, "uniform_loss": self.uniform_loss})
