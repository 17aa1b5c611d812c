"""LARS and momentum SGD against NumPy re-implementations of the reference updates."""
import numpy as np
import paddle
import pytest

from passl.errors import ConfigError
from passl.solver import OPTIMIZERS
from passl.solver.lr_scheduler import Constant

TRUST, WD, MOMENTUM, EPS = 0.02, 0.1, 0.9, 1e-8


def apex_larc_sgd_step(params, grads, velocity, lr, exclude_1d=False):
    """One step of apex LARC(clip=False) around torch SGD(momentum, weight_decay), in float64.

    ``grads[name] is None`` means the parameter got no gradient: torch skips it entirely.
    """
    for name, p in params.items():
        g = grads[name]
        if g is None:
            continue
        p_norm, g_norm = np.linalg.norm(p), np.linalg.norm(g)
        if exclude_1d and p.ndim <= 1:
            d = g
        elif p_norm != 0 and g_norm != 0:
            ratio = TRUST * p_norm / (g_norm + p_norm * WD + EPS)
            d = (g + WD * p) * ratio
        else:
            d = g  # apex leaves the gradient alone (no decay either)
        velocity[name] = d if name not in velocity else MOMENTUM * velocity[name] + d
        params[name] = p - lr * velocity[name]


def make_params():
    rng = np.random.RandomState(0)
    values = {
        "weight": rng.randn(4, 3),
        "bias": rng.randn(3),
        "zero_init": np.zeros(3),          # ||p|| = 0: plain gradient step
        "zero_grad": rng.randn(3),         # ||g|| = 0: no decay, no ratio
        "unused": rng.randn(2),            # grad None: untouched
    }
    params = {}
    for name, value in values.items():
        param = paddle.create_parameter(list(value.shape), "float32")
        param.set_value(value.astype("float32"))
        params[name] = param
    return params


def loss_of(params, x):
    hidden = paddle.tanh(x @ params["weight"] + params["bias"] + params["zero_init"])
    return (hidden ** 2).sum() + (params["zero_grad"] * 0).sum()


def run_against_reference(schedule, lr_at, steps, seed, exclude_1d=False):
    """LARS and the NumPy apex-LARC reference side by side for ``steps`` steps; every
    parameter must agree after each one. Returns the parameters (after the last step)."""
    params = make_params()
    optimizer = OPTIMIZERS.build({"name": "LARS", "momentum": MOMENTUM, "weight_decay": WD,
                                  "trust_coefficient": TRUST, "eps": EPS,
                                  "exclude_from_adaptation": exclude_1d},
                                 learning_rate=schedule, parameters=list(params.values()))
    reference = {name: p.numpy().astype("float64") for name, p in params.items()}
    velocity = {}
    x = paddle.to_tensor(np.random.RandomState(seed).randn(5, 4).astype("float32"))
    for step in range(steps):
        loss_of(params, x).backward()
        grads = {name: None if p.grad is None else p.grad.numpy().astype("float64")
                 for name, p in params.items()}
        assert grads["unused"] is None and not grads["zero_grad"].any()
        apex_larc_sgd_step(reference, grads, velocity, lr=lr_at(step), exclude_1d=exclude_1d)
        optimizer.step()
        optimizer.clear_grad(set_to_zero=False)
        schedule.step()
        for name, p in params.items():
            np.testing.assert_allclose(p.numpy(), reference[name], rtol=2e-5, atol=1e-6,
                                       err_msg=f"{name} after step {step}")
    return params


@pytest.mark.parametrize("exclude_1d", [False, True])
def test_lars_matches_numpy_apex_larc(exclude_1d):
    schedule = Constant(lr=0.5, epochs=1, iters_per_epoch=10, global_batch_size=1)
    params = run_against_reference(schedule, lambda step: 0.5, 4, seed=1, exclude_1d=exclude_1d)
    assert np.abs(params["zero_init"].numpy()).sum() > 0  # moved off zero by a plain step
    np.testing.assert_array_equal(params["unused"].numpy(),
                                  make_params()["unused"].numpy())


def test_lars_ratio_is_what_reference_uses():
    """One step from v = 0: the update is lr * ratio * (g + wd * p), not Paddle's LarsMomentum."""
    param = paddle.create_parameter([3], "float32")
    param.set_value(np.array([3.0, 0.0, 4.0], "float32"))           # ||p|| = 5
    optimizer = OPTIMIZERS.build({"name": "LARS", "weight_decay": WD, "trust_coefficient": TRUST},
                                 learning_rate=1.0, parameters=[param])
    (param * paddle.to_tensor([0.0, 2.0, 0.0])).sum().backward()    # g = (0, 2, 0), ||g|| = 2
    optimizer.step()
    ratio = TRUST * 5 / (2 + WD * 5 + 1e-8)
    p, g = np.array([3.0, 0.0, 4.0]), np.array([0.0, 2.0, 0.0])
    expected = p - ratio * (g + WD * p)
    np.testing.assert_allclose(param.numpy(), expected, rtol=1e-6)


def test_lars_rejects_negative_hyperparameters():
    with pytest.raises(ConfigError, match="optimizer.weight_decay"):
        OPTIMIZERS.build({"name": "LARS", "weight_decay": -1}, learning_rate=0.1,
                         parameters=[paddle.create_parameter([2], "float32")])


def test_momentum_skips_params_without_gradient_and_matches_torch_sgd():
    rng = np.random.RandomState(0)
    used, unused = paddle.create_parameter([3], "float32"), paddle.create_parameter([3], "float32")
    used.set_value(rng.randn(3).astype("float32"))
    unused.set_value(rng.randn(3).astype("float32"))
    unused_before = unused.numpy().copy()
    optimizer = OPTIMIZERS.build({"name": "SGD", "momentum": 0.9, "weight_decay": 0.1},
                                 learning_rate=0.3, parameters=[used, unused])
    p, v = used.numpy().astype("float64"), np.zeros(3)
    for _ in range(3):
        (used ** 2).sum().backward()
        d = 2 * p + 0.1 * p                      # torch SGD: coupled L2 decay
        v = 0.9 * v + d
        p = p - 0.3 * v
        optimizer.step()
        optimizer.clear_grad(set_to_zero=False)
        assert unused.grad is None
    np.testing.assert_allclose(used.numpy(), p, rtol=1e-5)
    np.testing.assert_array_equal(unused.numpy(), unused_before)


def test_lars_with_a_changing_lr_applies_it_outside_the_momentum():
    """torch SGD's p -= lr * v with v = m * v + d (Paddle's LarsMomentum folds lr into v)."""
    schedule = paddle.optimizer.lr.LambdaDecay(0.5, lambda step: 1.0 / (step + 1))
    run_against_reference(schedule, lambda step: 0.5 / (step + 1), 3, seed=2)
