"""optimizer.param_groups: each group's effective lr is the schedule's lr times its lr_mult."""
import numpy as np
import paddle
import pytest

from passl.errors import ConfigError
from passl.models import MODELS
from passl.solver.lr_scheduler import build_lr_scheduler
from passl.solver.optimizers import build_optimizer

TINY = {"name": "Classification", "num_classes": 3, "freeze_backbone": False,
        "backbone": {"name": "ResNet", "depth": 18, "layers": [1, 1, 1, 1], "base_width": 4,
                     "stem": "small"}}


def tiny_model():
    paddle.seed(0)
    return MODELS.build(TINY)


def trainable(model):
    return [(name, p) for name, p in model.named_parameters() if not p.stop_gradient]


def one_step(model, optimizer, schedule, seed):
    """One optimizer step on a random batch; returns {name: (value before, gradient)}."""
    rng = np.random.default_rng(seed)
    images = paddle.to_tensor(rng.standard_normal((4, 3, 16, 16)).astype("float32"))
    labels = paddle.to_tensor(rng.integers(0, 3, 4))
    model((images, labels))["loss"].backward()
    before = {n: (p.numpy().copy(), p.grad.numpy().copy()) for n, p in trainable(model)}
    optimizer.step()
    optimizer.clear_grad(set_to_zero=False)
    schedule.step()
    return before


def test_each_group_steps_with_its_own_lr_across_multistep_milestones():
    model = tiny_model()
    # SwAV's 1% recipe: head lr 5, trunk lr 5 x 0.004 = 0.02; x0.2 at the epoch-1 milestone
    schedule = build_lr_scheduler({"name": "MultiStep", "base_lr": 5.0, "milestones": [1],
                                   "gamma": 0.2}, epochs=2, iters_per_epoch=2, global_batch_size=4)
    optimizer = build_optimizer({"name": "SGD", "momentum": 0.0,
                                 "param_groups": [{"prefix": "backbone", "lr_mult": 0.004}]},
                                model, schedule)
    expected = {0: (0.02, 5.0), 1: (0.02, 5.0), 2: (0.004, 1.0), 3: (0.004, 1.0)}
    for step, (trunk_lr, head_lr) in expected.items():
        before = one_step(model, optimizer, schedule, step)
        for name, param in trainable(model):
            value, grad = before[name]
            lr = trunk_lr if name.startswith("backbone.") else head_lr
            np.testing.assert_allclose(value - param.numpy(), lr * grad, rtol=1e-4, atol=1e-7,
                                       err_msg=f"step {step} {name}")


def test_lars_applies_the_multiplier_like_a_scaled_schedule():
    """LARS with lr_mult m on every group == LARS without groups at lr x m."""
    grouped, plain = tiny_model(), tiny_model()
    schedules, optimizers = [], []
    for model, base_lr, groups in ((grouped, 0.5, [{"prefix": "fc", "lr_mult": 4.0},
                                                        {"prefix": "backbone", "lr_mult": 4.0}]),
                                   (plain, 2.0, None)):
        schedule = build_lr_scheduler({"name": "Constant", "lr": base_lr}, epochs=1,
                                      iters_per_epoch=3, global_batch_size=4)
        block = {"name": "LARS", **({"param_groups": groups} if groups else {})}
        schedules.append(schedule)
        optimizers.append(build_optimizer(block, model, schedule))
    for step in range(3):
        one_step(grouped, optimizers[0], schedules[0], step)
        one_step(plain, optimizers[1], schedules[1], step)
        for (name, a), (_, b) in zip(trainable(grouped), trainable(plain)):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7, err_msg=name)


def test_unmatched_parameters_keep_the_scheduled_lr_and_first_match_wins():
    model = tiny_model()
    schedule = build_lr_scheduler({"name": "Constant", "lr": 1.0}, epochs=1, iters_per_epoch=1,
                                  global_batch_size=4)
    optimizer = build_optimizer(
        {"name": "SGD", "param_groups": [{"prefix": "backbone.layer4", "lr_mult": 0.5},
                                         {"prefix": "backbone", "lr_mult": 0.1}]},
        model, schedule)
    by_name = {p.name: n for n, p in trainable(model)}
    groups = [(g["learning_rate"], sorted(by_name[p.name] for p in g["params"]))
              for g in optimizer._param_groups]
    assert [lr for lr, _ in groups] == [0.5, 0.1, 1.0]
    assert all(n.startswith("backbone.layer4.") for n in groups[0][1])
    assert all(n.startswith("backbone.") and not n.startswith("backbone.layer4.")
               for n in groups[1][1])
    assert groups[2][1] == ["fc.bias", "fc.weight"]


@pytest.mark.parametrize("groups, message", [
    ([{"prefix": "trunk", "lr_mult": 0.1}],
     "optimizer.param_groups[0].prefix: 'trunk' matches no trainable parameter (an earlier entry "
     "may have taken them); trainable parameter names start with: backbone, fc"),
    ([{"prefix": "backbone", "lr": 0.1}],
     "optimizer.param_groups[0].lr: unknown key; accepted keys: "
     "prefix, lr_mult"),
    ([{"prefix": "fc", "lr_mult": -1}],
     "optimizer.param_groups[0].lr_mult: expected a number >= 0, got -1"),
    ({"prefix": "fc"},
     "optimizer.param_groups: expected a list of {prefix, lr_mult} entries, got {'prefix': 'fc'}"),
])
def test_bad_groups_name_the_entry_and_the_fix(groups, message):
    schedule = build_lr_scheduler({"name": "Constant", "lr": 1.0}, epochs=1, iters_per_epoch=1,
                                  global_batch_size=4)
    with pytest.raises(ConfigError) as error:
        build_optimizer({"name": "SGD", "param_groups": groups}, tiny_model(), schedule)
    assert str(error.value) == message
