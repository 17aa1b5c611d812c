"""SwAV queue semantics and prototype freezing, through SwAVLoss and SwAVHook."""
import logging
import types

import numpy as np
import paddle
import pytest

from passl.engine.hooks.swav_hook import SwAVHook, queue_fill_warning
from passl.errors import ConfigError
from passl.models.losses.swav import SwAVLoss, swav_loss
from passl.models.losses.swav_queue import SwAVQueue, queue_rows_per_rank
from passl.models.registry import MODELS
from passl.utils.logger import get_logger

NMB_CROPS = [2, 2]


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def log_messages():
    handler, logger = Records(), get_logger()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_queue_length_rounds_down_to_global_batches_and_logs(log_messages):
    assert queue_rows_per_rank(3840, 256, 1) == 3840
    assert not log_messages
    assert queue_rows_per_rank(4000, 256, 4) == 3840 // 4
    assert any("rounded down to 3840" in m for m in log_messages)


def test_queue_shorter_than_a_batch_is_a_config_error():
    with pytest.raises(ConfigError, match="queue_length 100 is shorter than one global batch"):
        queue_rows_per_rank(100, 256, 1)


def unit_rows(*shape, seed=0):
    x = np.random.RandomState(seed).randn(*shape).astype(np.float32)
    return paddle.to_tensor(x / np.linalg.norm(x, axis=-1, keepdims=True))


def test_queue_is_used_once_full_and_then_always():
    queue = SwAVQueue(2, 6, 4)
    queue.push(unit_rows(2, 3, 4, seed=1))
    assert not queue.in_use()
    queue.push(unit_rows(2, 3, 4, seed=2))
    assert queue.in_use()
    queue.embeddings = paddle.zeros_like(queue.embeddings)
    assert queue.in_use()


def test_push_puts_the_newest_first_and_drops_the_oldest():
    queue = SwAVQueue(2, 6, 4)
    batches = [unit_rows(2, 3, 4, seed=s) for s in range(3)]
    for batch in batches:
        queue.push(batch)
    expected = np.concatenate([batches[2].numpy(), batches[1].numpy()], axis=1)
    np.testing.assert_array_equal(queue.embeddings.numpy(), expected)


def test_queue_state_round_trip():
    queue = SwAVQueue(2, 6, 4)
    queue.push(unit_rows(2, 3, 4, seed=1))
    queue.push(unit_rows(2, 3, 4, seed=2))
    queue.in_use()
    restored = SwAVQueue(2, 6, 4)
    restored.set_state_dict(queue.state_dict())
    np.testing.assert_array_equal(restored.embeddings.numpy(), queue.embeddings.numpy())
    assert restored.in_use()
    with pytest.raises(ConfigError, match="resume with the same settings"):
        SwAVQueue(2, 12, 4).set_state_dict(queue.state_dict())


def loss_inputs(batch_size, dim=4, num_prototypes=5, seed=0):
    z = unit_rows(sum(NMB_CROPS) * batch_size, dim, seed=seed)
    W = unit_rows(num_prototypes, dim, seed=seed + 100).t()
    return z, W


def test_loss_ignores_the_queue_until_full_then_uses_current_prototype_scores():
    batch_size = 3
    criterion = SwAVLoss(NMB_CROPS, [0, 1])
    criterion.queue = SwAVQueue(2, 2 * batch_size, 4)
    z, W = loss_inputs(batch_size, seed=0)
    plain = swav_loss(z @ W, NMB_CROPS, [0, 1], 0.1, 0.05, 3).item()
    assert abs(criterion(z, [z @ W], [W], batch_size).item() - plain) <= 1e-7  # empty
    criterion(z, [z @ W], [W], batch_size)  # half full -> full
    assert criterion.queue.in_use()

    z, W = loss_inputs(batch_size, seed=1)  # new batch and moved prototypes
    queued = criterion.queue.embeddings.numpy().copy()
    expected = swav_loss(z @ W, NMB_CROPS, [0, 1], 0.1, 0.05, 3,
                         [paddle.to_tensor(q) @ W for q in queued]).item()
    assert abs(criterion(z, [z @ W], [W], batch_size).item() - expected) <= 1e-6
    assert abs(expected - swav_loss(z @ W, NMB_CROPS, [0, 1], 0.1, 0.05, 3).item()) > 1e-4
    # after the step: the assignment crops 0 and 1 of this batch are in front
    front = criterion.queue.embeddings.numpy()[:, :batch_size]
    np.testing.assert_array_equal(front, z.numpy().reshape(4, batch_size, 4)[[0, 1]])
    np.testing.assert_array_equal(criterion.queue.embeddings.numpy()[:, batch_size:],
                                  queued[:, :batch_size])


def test_loss_does_not_push_in_eval_mode():
    criterion = SwAVLoss(NMB_CROPS, [0, 1])
    criterion.queue = SwAVQueue(2, 6, 4)
    criterion.eval()
    z, W = loss_inputs(3)
    criterion(z, [z @ W], [W], 3)
    assert not criterion.queue.embeddings.numpy().any()


TINY_SWAV = {
    "name": "SwAV",
    "backbone": {"name": "ResNet", "depth": 18, "layers": [1, 1, 1, 1], "base_width": 4,
                 "stem": "small"},
    "neck": {"name": "SwAVNeck", "in_dim": 32, "hidden_dim": 16, "out_dim": 8},
    "head": {"name": "SwAVPrototypes", "in_dim": 8, "num_prototypes": 10},
    "loss": {"name": "SwAVLoss", "nmb_crops": [2, 2], "crops_for_assign": [0, 1]},
}


def fake_trainer(model, batch_size=4, iters_per_epoch=3, world_size=1, epochs=10):
    return types.SimpleNamespace(model=model, iters_per_epoch=iters_per_epoch, epochs=epochs,
                                 global_batch_size=batch_size * world_size,
                                 world_size=world_size, logger=get_logger(), epoch=0, iter=0)


def test_hook_needs_exactly_one_freeze_setting():
    with pytest.raises(ConfigError, match="exactly one"):
        SwAVHook()
    with pytest.raises(ConfigError, match="exactly one"):
        SwAVHook(freeze_prototypes_niters=3, freeze_prototypes_epochs=1)


def test_hook_starts_the_queue_at_its_epoch_and_carries_it_in_its_state():
    paddle.seed(0)
    model = MODELS.build(TINY_SWAV)
    trainer = fake_trainer(model, batch_size=4, world_size=2)
    hook = SwAVHook(freeze_prototypes_epochs=0, queue_length=20, epoch_queue_starts=2)
    hook.before_run(trainer)
    for epoch in (0, 1):
        trainer.epoch = epoch
        hook.before_epoch(trainer)
        assert model.loss.queue is None and hook.state_dict() == {}
    trainer.epoch = 2
    hook.before_epoch(trainer)
    assert model.loss.queue is hook.queue
    assert hook.queue.embeddings.shape == [2, 16 // 2, 8]  # 20 -> 16 = 2 global batches of 8
    hook.queue.push(unit_rows(2, 4, 8))

    resumed_model = MODELS.build(TINY_SWAV)
    resumed = SwAVHook(freeze_prototypes_epochs=0, queue_length=20, epoch_queue_starts=2)
    resumed.set_state_dict(hook.state_dict())
    resumed_trainer = fake_trainer(resumed_model, batch_size=4, world_size=2)
    resumed_trainer.epoch = 3
    resumed.before_run(resumed_trainer)
    resumed.before_epoch(resumed_trainer)
    np.testing.assert_array_equal(resumed_model.loss.queue.embeddings.numpy(),
                                  hook.queue.embeddings.numpy())


def crops(batch_size, seed):
    rng = np.random.RandomState(seed)
    return [paddle.to_tensor(rng.rand(batch_size, 3, size, size).astype(np.float32))
            for size in (16, 16, 8, 8)]


@pytest.mark.parametrize("freeze", [{"freeze_prototypes_niters": 3},
                                    {"freeze_prototypes_epochs": 1}])
def test_frozen_prototypes_skip_update_decay_and_momentum(freeze):
    paddle.seed(0)
    model = MODELS.build(TINY_SWAV)
    prototypes = model.head.prototype_weights()[0]
    lr, weight_decay, momentum = 0.5, 0.1, 0.9
    optimizer = paddle.optimizer.Momentum(learning_rate=lr, momentum=momentum,
                                          weight_decay=weight_decay,
                                          parameters=model.parameters())
    trainer = fake_trainer(model, iters_per_epoch=3)
    hook = SwAVHook(**freeze)
    hook.before_run(trainer)
    assert hook.freeze_iters == 3
    batch = (crops(4, seed=0), paddle.zeros([4], dtype="int64"))
    for step in range(5):
        trainer.iter = step
        loss = model(batch)["loss"]
        loss.backward()
        hook.after_backward(trainer)
        before = prototypes.numpy().copy()
        grad = None if prototypes.grad is None else prototypes.grad.numpy().copy()
        optimizer.step()
        optimizer.clear_grad()
        after = prototypes.numpy()
        if step < 3:
            assert grad is None
            np.testing.assert_array_equal(after, before)
        elif step == 3:
            # first free step: a fresh momentum buffer, i.e. exactly one plain decayed SGD step
            np.testing.assert_allclose(after, before - lr * (grad + weight_decay * before),
                                       rtol=1e-5, atol=1e-7)
        else:
            assert np.abs(after - before).max() > 1e-4


def test_freezing_zero_iterations_leaves_gradients_alone():
    model = MODELS.build(TINY_SWAV)
    trainer = fake_trainer(model)
    hook = SwAVHook(freeze_prototypes_niters=0)
    hook.before_run(trainer)
    model((crops(4, seed=0), None))["loss"].backward()
    hook.after_backward(trainer)
    assert model.head.prototype_weights()[0].grad is not None


@pytest.mark.parametrize("epochs, when", [(100, "first used in epoch 16 of 100"),
                                          (10, "this run never uses it")])
def test_a_queue_longer_than_an_epoch_is_warned_about(log_messages, epochs, when):
    """swav_r18_folder.yaml on 201 images: 3 steps of 64 per epoch, a queue of 1920 from
    epoch 5 (0-based) is full after 30 steps, the last of epoch 15 (1-based)."""
    paddle.seed(0)
    trainer = fake_trainer(MODELS.build(TINY_SWAV), batch_size=32, iters_per_epoch=3,
                           world_size=2, epochs=epochs)
    SwAVHook(freeze_prototypes_epochs=1, queue_length=1920, epoch_queue_starts=5).before_run(trainer)
    warning = [m for m in log_messages if "an epoch yields only" in m]
    assert len(warning) == 1
    assert warning[0].startswith("SwAV queue: 1920 embeddings per assignment crop, but an epoch "
                                 "yields only 192 (3 steps of 64): it fills in 10.0 epochs")
    assert when in warning[0] and "queue_length to at most 192" in warning[0]


def test_a_queue_within_an_epoch_is_not_warned_about():
    assert queue_fill_warning(192, 3, 64, 5, 100) is None
    assert queue_fill_warning(3840, 5005, 256, 15, 200) is None  # the paper's batch-256 recipe
    assert "fills in 1.5 epochs" in queue_fill_warning(192, 2, 64, 0, 2)


@pytest.mark.parametrize("kwargs, message", [
    ({"freeze_prototypes_niters": -1}, "SwAVHook.freeze_prototypes_niters must be >= 0, got -1"),
    ({"freeze_prototypes_epochs": 1, "queue_length": -8},
     "SwAVHook.queue_length must be >= 0, got -8"),
    ({"freeze_prototypes_epochs": 1, "epoch_queue_starts": -1},
     "SwAVHook.epoch_queue_starts must be >= 0, got -1"),
])
def test_negative_hook_counts_are_one_line_naming_the_key(kwargs, message):
    with pytest.raises(ConfigError) as error:
        SwAVHook(**kwargs)
    assert str(error.value) == message
