"""Schedules against the SwAV reference formula, linear scaling and state round trips."""
import math

import numpy as np
import pytest

from passl.errors import ConfigError
from passl.solver.lr_scheduler import build_lr_scheduler


def reference_swav_schedule(base_lr, final_lr, start_warmup, warmup_epochs, epochs, iters):
    """facebookresearch/swav main_swav.py's lr table, written out again."""
    warmup = np.linspace(start_warmup, base_lr, iters * warmup_epochs)
    total = iters * (epochs - warmup_epochs)
    cosine = [final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * t / total))
              for t in range(total)]
    return np.concatenate((warmup, cosine))


def lrs_of(schedule, steps):
    values = []
    for _ in range(steps):
        values.append(schedule())
        schedule.step()
    return np.array(values)


@pytest.mark.parametrize("warmup_epochs", [0, 2])
def test_cosine_warmup_equals_reference_table(warmup_epochs):
    cfg = {"name": "CosineWarmup", "base_lr": 4.8, "final_lr": 0.0048,
           "warmup_epochs": warmup_epochs, "start_warmup": 0.3}
    schedule = build_lr_scheduler(cfg, epochs=5, iters_per_epoch=7, global_batch_size=4096)
    expected = reference_swav_schedule(4.8, 0.0048, 0.3, warmup_epochs, 5, 7)
    np.testing.assert_array_equal(lrs_of(schedule, 35), expected)
    assert lrs_of(schedule, 2).tolist() == [expected[-1]] * 2  # past the end: kept


def test_linear_scaling_multiplies_every_lr_value():
    cfg = {"name": "CosineWarmup", "base_lr": 4.8, "final_lr": 0.0048, "warmup_epochs": 1,
           "start_warmup": 0.3, "reference_batch_size": 4096}
    schedule = build_lr_scheduler(cfg, epochs=3, iters_per_epoch=4, global_batch_size=256)
    expected = reference_swav_schedule(4.8 / 16, 0.0048 / 16, 0.3 / 16, 1, 3, 4)
    np.testing.assert_allclose(lrs_of(schedule, 12), expected, rtol=1e-12)


def test_multistep_drops_at_epoch_milestones():
    cfg = {"name": "MultiStep", "base_lr": 1.0, "milestones": [2, 3], "gamma": 0.5,
           "reference_batch_size": 128}
    schedule = build_lr_scheduler(cfg, epochs=4, iters_per_epoch=2, global_batch_size=256)
    np.testing.assert_allclose(lrs_of(schedule, 8), [2, 2, 2, 2, 1, 1, 0.5, 0.5])


def test_constant_and_state_dict_round_trip():
    cfg = {"name": "CosineWarmup", "base_lr": 1.0}
    first = build_lr_scheduler(cfg, epochs=2, iters_per_epoch=5, global_batch_size=8)
    lrs_of(first, 4)
    second = build_lr_scheduler(cfg, epochs=2, iters_per_epoch=5, global_batch_size=8)
    second.set_state_dict(first.state_dict())
    np.testing.assert_array_equal(lrs_of(second, 6), lrs_of(first, 6))
    constant = build_lr_scheduler({"name": "Constant", "lr": 0.1}, 1, 3, 8)
    assert lrs_of(constant, 3).tolist() == [0.1] * 3


@pytest.mark.parametrize("cfg, message", [
    ({"name": "CosineWarmup", "base_lr": 1.0, "warmup_epochs": 4}, "warmup_epochs"),
    ({"name": "CosineWarmup", "base_lr": 1.0, "epochs": 9}, "lr_scheduler.epochs: set by"),
    ({"name": "CosineWarmup", "base_lr": -1.0}, "base_lr"),
    ({"name": "Constant", "lr": 0.1, "reference_batch_size": 0}, "reference_batch_size"),
    ({"name": "MultiStep", "base_lr": 0.1, "milestones": 3}, "milestones"),
])
def test_bad_blocks_are_config_errors(cfg, message):
    with pytest.raises(ConfigError, match=message):
        build_lr_scheduler(cfg, epochs=3, iters_per_epoch=2, global_batch_size=8)
