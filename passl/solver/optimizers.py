"""Paddle's momentum SGD and AdamW under config names, and the trainer's optimizer builder.

Every optimizer here skips parameters whose gradient is None (Paddle's ``Optimizer.step``
only collects parameters that have one); the trainer clears gradients to None after each
step, so a parameter that got no gradient gets no decay and no momentum update either.
"""
import paddle

from passl.errors import ConfigError
from passl.solver.registry import OPTIMIZERS


@OPTIMIZERS.register("SGD")
@OPTIMIZERS.register("Momentum")
def momentum_sgd(learning_rate, parameters, momentum=0.9, weight_decay=0.0, use_nesterov=False,
                 grad_clip=None):
    """SGD with (optionally Nesterov) momentum and coupled L2 decay, as torch's SGD.

    ``v = momentum * v + (g + weight_decay * p); p -= lr * v`` (``momentum: 0`` is plain SGD).
    ``SGD`` and ``Momentum`` are the same optimizer; both default to momentum 0.9.
    """
    return paddle.optimizer.Momentum(
        learning_rate=learning_rate, momentum=momentum, parameters=parameters,
        use_nesterov=use_nesterov, weight_decay=weight_decay or None, grad_clip=grad_clip)


@OPTIMIZERS.register()
def AdamW(learning_rate, parameters, beta1=0.9, beta2=0.999, epsilon=1e-8, weight_decay=0.01,
          exclude_from_decay=False, grad_clip=None):
    """Adam with decoupled weight decay.

    ``exclude_from_decay: true`` leaves parameters with at most one dimension (biases, norm
    scales and shifts) undecayed, the usual choice for transformers.
    """
    decayed = None
    if exclude_from_decay:
        decayed_names = {p.name for p in parameters if p.ndim > 1}
        decayed = lambda name: name in decayed_names  # noqa: E731
    return paddle.optimizer.AdamW(
        learning_rate=learning_rate, beta1=beta1, beta2=beta2, epsilon=epsilon,
        parameters=parameters, weight_decay=weight_decay, apply_decay_param_fun=decayed,
        grad_clip=grad_clip)


def build_grad_clip(max_norm):
    """``paddle.nn.ClipGradByGlobalNorm`` for the top-level ``grad_clip: max_norm`` (None: off)."""
    if max_norm is None:
        return None
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or max_norm <= 0:
        raise ConfigError(f"grad_clip: expected null or a positive max global norm, "
                          f"got {max_norm!r}")
    return paddle.nn.ClipGradByGlobalNorm(clip_norm=float(max_norm))


def build_optimizer(cfg, model, lr_scheduler, grad_clip=None):
    """The ``optimizer:`` block's optimizer over ``model``'s trainable parameters.

    The learning rate always comes from ``lr_scheduler`` (set every iteration), so the block
    must not carry its own; parameters with ``stop_gradient`` (a frozen backbone) are left out.
    """
    if cfg is None:
        raise ConfigError("optimizer: missing block; add e.g. `optimizer: {name: LARS}`")
    for key in ("learning_rate", "lr"):
        if key in cfg:
            raise ConfigError(
                f"{getattr(cfg, 'key_path', 'optimizer')}.{key}: the learning rate is set by "
                f"the lr_scheduler block (e.g. lr_scheduler.base_lr); remove it here")
    parameters = [p for p in model.parameters() if not p.stop_gradient]
    if not parameters:
        raise ConfigError("optimizer: the model has no trainable parameters "
                          "(every parameter has stop_gradient=True)")
    return OPTIMIZERS.build(cfg, learning_rate=lr_scheduler, parameters=parameters,
                            grad_clip=build_grad_clip(grad_clip))
