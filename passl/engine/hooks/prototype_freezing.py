"""Prototypes that do not move during the first iterations (SwAV, DeepCluster-v2)."""
from passl.engine.hooks.base import Hook, Priority
from passl.errors import ConfigError


class FreezePrototypesHook(Hook):
    """Drops the prototype gradients for the first ``freeze_iters`` iterations.

    Config keys: ``freeze_prototypes_epochs`` (epochs, converted with the trainer's
    iterations per epoch) or ``freeze_prototypes_niters`` (iterations); give exactly one
    (0 disables freezing).

    The gradients are dropped after ``backward`` (as the reference sets ``p.grad = None``),
    so the optimizer skips those parameters entirely: no update, no weight decay, no
    momentum. The model's ``head.prototype_weights()`` are the prototypes.
    """

    priority = Priority.HIGH

    def __init__(self, freeze_prototypes_niters=None, freeze_prototypes_epochs=None):
        name = type(self).__name__
        if (freeze_prototypes_niters is None) == (freeze_prototypes_epochs is None):
            raise ConfigError(f"{name}: give exactly one of freeze_prototypes_epochs and "
                              "freeze_prototypes_niters (0 disables freezing)")
        self.check_not_negative(freeze_prototypes_niters=freeze_prototypes_niters,
                                freeze_prototypes_epochs=freeze_prototypes_epochs)
        self.freeze_prototypes_niters = freeze_prototypes_niters
        self.freeze_prototypes_epochs = freeze_prototypes_epochs
        self.freeze_iters = None  # set in before_run, when iterations per epoch are known

    def check_not_negative(self, **counts):
        """One line naming the hook and key of a count given below 0 (None: not given)."""
        for key, value in counts.items():
            if value is not None and value < 0:
                raise ConfigError(f"{type(self).__name__}.{key} must be >= 0, got {value}")

    def before_run(self, trainer):
        if self.freeze_prototypes_epochs is not None:
            self.freeze_iters = round(self.freeze_prototypes_epochs * trainer.iters_per_epoch)
        else:
            self.freeze_iters = self.freeze_prototypes_niters
        trainer.logger.info("%s: prototypes frozen for the first %d iterations",
                            type(self).__name__, self.freeze_iters)

    def after_backward(self, trainer):
        if trainer.iter < self.freeze_iters:
            for weight in trainer.model.head.prototype_weights():
                weight.clear_gradient(False)  # False: drop the gradient, do not zero it
