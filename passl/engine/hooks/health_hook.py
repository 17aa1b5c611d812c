"""Stops a diverged run early and warns about SwAV's usual silent failure."""
import math

import numpy as np
import paddle

from passl import distributed
from passl.engine.hooks.base import HOOKS, Hook, Priority
from passl.errors import ConfigError, UserError
from passl.io import checkpoint


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the message says where and what to try."""


@HOOKS.register()
class HealthHook(Hook):
    """Checks the loss of every step, reading it on the host only at check steps.

    * A non-finite loss stops the run with one line naming the iteration, the likely causes
      and the last good checkpoint (which is kept: nothing is saved after the failure). All
      processes stop together. The losses stay on the device and are read every
      ``check_interval`` iterations and at the end of each epoch (before the checkpoint), in
      ``after_backward``: a non-finite loss found at a check step stops the run before that
      step's update; one from an earlier step of the interval has already been applied to the
      in-memory weights (never saved). ``check_interval: 1`` stops before the update of the
      very step, at the price of one host sync and collective per step.
    * Under float16 AMP the GradScaler already skips a step with a non-finite loss or
      gradients (and lowers the loss scale): such steps are counted, not fatal; only
      ``max_consecutive_bad_steps`` skipped steps in a row stop the run (the weights are
      untouched by them).
    * A loss that stays within ``collapse_tolerance`` (relative) of ``ln K`` for
      ``collapse_window`` iterations after the prototype-freezing period warns once: the
      cluster assignments have collapsed to uniform. ``K`` is read from the model's prototype
      heads (``model.head.prototype_weights()``, mean of ``ln K`` over heads); models without
      prototypes skip this check. The freezing period is the largest ``freeze_iters`` among
      the hooks (SwAVHook's), 0 if none. The warning quotes the model's ``prototypes_used`` log
      (share of prototypes that win a sample) when the model reports it.

    Config keys (``hooks`` entry ``name: HealthHook``; added with the defaults when the config
    does not list it): ``collapse_tolerance`` (0.01), ``collapse_window`` (iterations, 50),
    ``check_interval`` (iterations; default the LoggerHook's ``log_interval``, which needs the
    same host read), ``max_consecutive_bad_steps`` (float16 AMP, 20).
    """

    priority = Priority.HIGHEST

    def __init__(self, collapse_tolerance=0.01, collapse_window=50, check_interval=None,
                 max_consecutive_bad_steps=20):
        for key, value in (("collapse_window", collapse_window),
                           ("max_consecutive_bad_steps", max_consecutive_bad_steps),
                           ("check_interval", 1 if check_interval is None else check_interval)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"HealthHook.{key}: expected an integer >= 1, got {value!r}")
        self.collapse_tolerance = float(collapse_tolerance)
        self.collapse_window = collapse_window
        self.check_interval = check_interval
        self.max_consecutive_bad_steps = max_consecutive_bad_steps
        self.uniform_loss = None
        self.freeze_iters = 0
        self.near_uniform_streak = 0
        self.warned = False
        self.unread_losses = []  # (iteration, device scalar) since the last check

    def before_run(self, trainer):
        head = getattr(trainer.model, "head", None)
        if hasattr(head, "prototype_weights"):
            sizes = [w.shape[-1] for w in head.prototype_weights()]
            self.uniform_loss = sum(math.log(k) for k in sizes) / len(sizes)
        if self.check_interval is None:
            intervals = [h.log_interval for h in trainer.hooks if hasattr(h, "log_interval")]
            self.check_interval = intervals[0] if intervals else 1

    def before_epoch(self, trainer):
        # read here, not in before_run: SwAVHook sets freeze_iters in its own before_run
        self.freeze_iters = max([getattr(h, "freeze_iters", None) or 0 for h in trainer.hooks],
                                default=0)

    def after_backward(self, trainer):
        self.unread_losses.append((trainer.iter, trainer.outputs["loss"].detach()))
        if (trainer.inner_iter + 1) % self.check_interval == 0 \
                or trainer.inner_iter + 1 == trainer.iters_per_epoch:
            self.check_pending(trainer)

    def after_iter(self, trainer):
        amp = getattr(trainer, "amp", None)
        if getattr(amp, "consecutive_skipped", 0) >= self.max_consecutive_bad_steps:
            self._stop(trainer, trainer.iter, float("nan"), skipped=amp.consecutive_skipped)

    def before_save(self, trainer):
        self.check_pending(trainer)  # nothing is saved after an unread non-finite loss

    def check_pending(self, trainer):
        """Read the losses not checked yet (one host read, one collective; every process calls
        it together): stop or watch. Anything saving a checkpoint between check steps (e.g.
        mid-epoch) calls this first, so that nothing is saved after a non-finite loss."""
        if not self.unread_losses:
            return
        iters = [i for i, _ in self.unread_losses]
        losses = paddle.stack([loss.astype("float64").reshape([]) for _, loss in
                               self.unread_losses]).numpy()
        self.unread_losses = []
        finite = np.isfinite(losses)
        scaled = getattr(getattr(trainer, "amp", None), "scaler", None) is not None
        # the first bad iteration over all processes (inf: none; float16 skips them itself)
        first = math.inf if finite.all() or scaled else float(iters[int(np.argmin(finite))])
        first = float(distributed.all_reduce(paddle.to_tensor(first, dtype="float64"), op="min"))
        if first < math.inf:
            at = iters.index(int(first))
            self._stop(trainer, iters[at], float(losses[at]))
        for iteration, loss in zip(iters, losses):
            self._watch_collapse(trainer, iteration, float(loss))

    def _stop(self, trainer, iteration, loss, skipped=0):
        last_good = checkpoint.last_checkpoint(trainer.output_dir)
        kept = f"last good checkpoint kept: {last_good}" if last_good else \
            "no checkpoint was written yet"
        trainer.metrics.write({"type": "event", "event": "non_finite_loss",
                               "epoch": trainer.epoch + 1, "iter": iteration + 1,
                               "loss": loss, "skipped_steps": skipped,
                               "last_good_checkpoint": last_good})
        what = (f"{skipped} float16 steps in a row skipped for non-finite loss or gradients "
                f"(HealthHook.max_consecutive_bad_steps={self.max_consecutive_bad_steps}) up to"
                if skipped else f"non-finite loss ({loss}"
                f"{' on another process' if math.isfinite(loss) else ''}) at")
        if skipped:
            where = "the weights were not updated by those steps"
        elif iteration == trainer.iter:
            where = "stopped before the update"
        else:
            where = (f"found at the check of iteration {trainer.iter + 1} (HealthHook."
                     f"check_interval={self.check_interval}): the weights in memory took the "
                     f"steps since, nothing was saved after them")
        raise TrainingDiverged(
            f"{what} iteration {iteration + 1} (epoch {trainer.epoch + 1}); {where}. "
            f"Likely causes: lr too high for the global batch (check the logged lr scaling), "
            f"float16 overflow (try amp.dtype=bfloat16 or amp off), NaN/Inf in the input data, "
            f"or a too small Sinkhorn epsilon; {kept} (resume with --resume auto after a fix)")

    def _watch_collapse(self, trainer, iteration, loss):
        if self.warned or self.uniform_loss is None or iteration < self.freeze_iters:
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
            f"prototype freeze (iteration {iteration + 1}){used_text}: the cluster assignments "
            f"have probably collapsed to uniform. Remedies: lower the Sinkhorn epsilon, freeze "
            f"the prototypes longer, start the queue later or make it shorter")
        trainer.metrics.write({"type": "event", "event": "assignments_collapsed",
                               "epoch": trainer.epoch + 1, "iter": iteration + 1,
                               "loss": loss, "uniform_loss": self.uniform_loss})
