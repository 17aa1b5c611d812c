"""Paddle's momentum SGD and AdamW under config names, and the trainer's optimizer builder.

Every optimizer here skips parameters whose gradient is None (Paddle's ``Optimizer.step``
only collects parameters that have one); the trainer clears gradients to None after each
step, so a parameter that got no gradient gets no decay and no momentum update either.
"""
import paddle

from passl.config import ConfigDict
from passl.errors import ConfigError
from passl.registry import check_keys, key_path_of
from passl.solver.registry import OPTIMIZERS
from passl.utils.logger import get_logger

#: Keys of one ``optimizer.param_groups`` entry.
GROUP_KEYS = ("prefix", "lr_mult")


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
        decayed_names = {p.name for p in flat_parameters(parameters) if p.ndim > 1}
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


def flat_parameters(parameters):
    """The parameters of a list of parameters or of Paddle parameter-group dicts."""
    if parameters and isinstance(parameters[0], dict):
        return [p for group in parameters for p in group["params"]]
    return list(parameters)


def _check_group(group, index):
    where = f"optimizer.param_groups[{index}]"
    if not isinstance(group, dict):
        raise ConfigError(f"{where}: expected a mapping like {{prefix: backbone, lr_mult: 0.1}}, "
                          f"got {group!r}")
    check_keys(group, GROUP_KEYS, where)
    prefix, lr_mult = group.get("prefix"), group.get("lr_mult", 1.0)
    if not isinstance(prefix, str) or not prefix:
        raise ConfigError(f"{where}.prefix: expected a parameter-name prefix such as 'backbone', "
                          f"got {prefix!r}")
    if isinstance(lr_mult, bool) or not isinstance(lr_mult, (int, float)) or lr_mult < 0:
        raise ConfigError(f"{where}.lr_mult: expected a number >= 0, got {lr_mult!r}")
    return prefix, float(lr_mult)


def _matches(name, prefix):
    """``prefix`` names a whole sublayer: 'backbone' matches 'backbone.conv1.weight', not
    'backbone2.weight'."""
    return name == prefix or name.startswith(prefix.rstrip(".") + ".")


def group_parameters(model, groups):
    """The model's trainable parameters, split by the ``optimizer.param_groups`` list.

    Each entry ``{prefix, lr_mult}`` takes the trainable parameters whose structured name
    (``model.named_parameters()``, e.g. ``backbone.conv1.weight``) starts with ``prefix``;
    they are updated with the scheduled lr times ``lr_mult`` (Paddle's per-group
    ``learning_rate`` multiplier). The first matching entry wins; parameters no entry
    matches form a last group with ``lr_mult`` 1. Fine-tuning uses this for a small trunk
    lr under a large head lr (SwAV's semi-supervised recipe: 0.02 trunk, 5 head).

    Returns a plain list of parameters without groups, else Paddle's list of
    ``{'params': [...], 'learning_rate': lr_mult}`` dicts.
    """
    named = [(name, p) for name, p in model.named_parameters() if not p.stop_gradient]
    if not groups:
        return [p for _, p in named]
    if not isinstance(groups, list):
        raise ConfigError(f"optimizer.param_groups: expected a list of {{prefix, lr_mult}} "
                          f"entries, got {groups!r}")
    checked = [_check_group(group, index) for index, group in enumerate(groups)]
    members = [[] for _ in checked]
    rest = []
    for name, param in named:
        index = next((i for i, (prefix, _) in enumerate(checked) if _matches(name, prefix)), None)
        (rest if index is None else members[index]).append(param)
    tops = sorted({name.split(".")[0] for name, _ in named})
    for index, ((prefix, _), params) in enumerate(zip(checked, members)):
        if not params:
            raise ConfigError(f"optimizer.param_groups[{index}].prefix: {prefix!r} matches no "
                              f"trainable parameter (an earlier entry may have taken them); "
                              f"trainable parameter names start with: {', '.join(tops)}")
    result = [{"params": params, "learning_rate": lr_mult}
              for (_, lr_mult), params in zip(checked, members)]
    if rest:
        result.append({"params": rest, "learning_rate": 1.0})
    get_logger().info("optimizer.param_groups: " + ", ".join(
        f"{prefix} ({len(params)} tensors) lr x {lr_mult:g}"
        for (prefix, lr_mult), params in zip(checked, members))
        + (f", the rest ({len(rest)} tensors) lr x 1" if rest else ""))
    return result


def build_optimizer(cfg, model, lr_scheduler, grad_clip=None):
    """The ``optimizer:`` block's optimizer over ``model``'s trainable parameters.

    The learning rate always comes from ``lr_scheduler`` (set every iteration), so the block
    must not carry its own; parameters with ``stop_gradient`` (a frozen backbone) are left out.
    ``param_groups`` (optional, see :func:`group_parameters`) gives groups of parameters
    their own lr multiplier; the other keys are the optimizer's.
    """
    if cfg is None:
        raise ConfigError("optimizer: missing block; add e.g. `optimizer: {name: LARS}`")
    for key in ("learning_rate", "lr"):
        if key in cfg:
            raise ConfigError(
                f"{getattr(cfg, 'key_path', 'optimizer')}.{key}: the learning rate is set by "
                f"the lr_scheduler block (e.g. lr_scheduler.base_lr); remove it here")
    parameters = group_parameters(model, cfg.get("param_groups"))
    if not flat_parameters(parameters):
        raise ConfigError("optimizer: the model has no trainable parameters "
                          "(every parameter has stop_gradient=True)")
    block = ConfigDict({key: value for key, value in cfg.items() if key != "param_groups"},
                       key_path=key_path_of(cfg, "optimizer"), source=getattr(cfg, "source", None))
    return OPTIMIZERS.build(block, learning_rate=lr_scheduler, parameters=parameters,
                            grad_clip=build_grad_clip(grad_clip))
