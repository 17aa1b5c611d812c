"""The SwAV architecture: multi-crop forward, prototype normalisation, training, config."""
import os

import numpy as np
import paddle
import pytest

from passl.config import load_config
from passl.errors import ConfigError
from passl.models.losses.swav import swav_loss
from passl.models.registry import MODELS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def swav_config(depth=18, layers=(1, 1, 1, 1), base_width=8, num_prototypes=10, nmb_crops=(2, 4)):
    out_channels = base_width * 8 * (4 if depth >= 50 else 1)
    return {
        "name": "SwAV",
        "backbone": {"name": "ResNet", "depth": depth, "layers": list(layers),
                     "base_width": base_width, "stem": "cifar"},
        "neck": {"name": "SwAVNeck", "in_dim": out_channels, "hidden_dim": 32, "out_dim": 16},
        "head": {"name": "SwAVPrototypes", "in_dim": 16, "num_prototypes": num_prototypes},
        "loss": {"name": "SwAVLoss", "nmb_crops": list(nmb_crops), "crops_for_assign": [0, 1]},
    }


def multicrop_batch(batch_size, seed=0, sizes=(32, 32, 16, 16, 16, 16)):
    rng = np.random.RandomState(seed)
    crops = [paddle.to_tensor(rng.rand(batch_size, 3, s, s).astype(np.float32)) for s in sizes]
    return crops, paddle.full([batch_size], -1, dtype="int64")


def test_forward_runs_the_backbone_once_per_resolution_and_keeps_crops_in_order():
    paddle.seed(0)
    model = MODELS.build(swav_config())
    calls = []
    model.backbone.register_forward_post_hook(lambda layer, inputs, output: calls.append(
        inputs[0].shape))
    model.eval()  # BatchNorm statistics fixed: batching crops does not change the result
    crops, labels = multicrop_batch(3)
    out = model((crops, labels))
    assert calls == [[6, 3, 32, 32], [12, 3, 16, 16]]

    per_crop = [model.head(model.neck(model.backbone(c)))[0] for c in crops]
    expected = swav_loss(paddle.concat(per_crop), [2, 4], [0, 1], 0.1, 0.05, 3)
    assert abs(out["loss"].item() - expected.item()) <= 1e-5


def test_training_forward_normalises_prototypes_and_logs():
    model = MODELS.build(swav_config(num_prototypes=[10, 7]))
    out = model(multicrop_batch(4))
    for weight in model.head.prototype_weights():
        np.testing.assert_allclose(np.linalg.norm(weight.numpy(), axis=0), 1.0, rtol=1e-6)
    assert out["loss"].shape == [] and np.isfinite(out["loss"].item())
    used = out["logs"]["prototypes_used"].item()
    assert 1 / 10 <= used <= 1
    assert out["logs"]["queue_in_use"] == 0.0


def test_crop_count_must_match_the_loss():
    model = MODELS.build(swav_config())
    with pytest.raises(ConfigError, match="nmb_crops"):
        model(multicrop_batch(2, sizes=(32, 32, 16, 16)))


def test_extract_features_gives_pooled_backbone_features():
    model = MODELS.build(swav_config())
    model.eval()
    features = model.extract_features(paddle.rand([5, 3, 32, 32]))
    assert features.shape == [5, 64] and features.stop_gradient


def losses_on_a_fixed_batch(config, batch, steps, lr):
    paddle.seed(0)
    model = MODELS.build(config)
    optimizer = paddle.optimizer.Momentum(learning_rate=lr, momentum=0.9,
                                          parameters=model.parameters())
    losses = []
    for _ in range(steps):
        loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(loss.item())
    return losses


def test_small_swav_loss_falls_on_a_fixed_batch():
    losses = losses_on_a_fixed_batch(swav_config(base_width=8), multicrop_batch(8), steps=20,
                                     lr=0.1)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


@pytest.mark.slow
def test_resnet18_swav_loss_falls_on_a_fixed_batch():
    config = swav_config(layers=(2, 2, 2, 2), base_width=64, num_prototypes=30)
    config["neck"].update(hidden_dim=512, out_dim=32)
    config["head"]["in_dim"] = 32
    losses = losses_on_a_fixed_batch(config, multicrop_batch(8), steps=20, lr=0.1)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_paper_config_builds_its_model_hooks_and_solver():
    from passl.engine.hooks import HOOKS
    from passl.solver.lr_scheduler import build_lr_scheduler
    from passl.solver.optimizers import build_optimizer

    cfg = load_config(os.path.join(ROOT, "configs", "swav", "swav_r50_100ep.yaml"))
    model = MODELS.build(cfg.model)
    assert model.backbone.out_channels == 2048
    assert model.head.prototype_weights()[0].shape == [128, 3000]
    assert model.loss.nmb_crops == [2, 6] and model.loss.temperature == 0.1
    hooks = [HOOKS.build(block) for block in cfg.hooks]
    assert hooks[0].freeze_prototypes_epochs == 1 and hooks[0].queue_length == 0
    # the lr the config's comment promises at 1, 8 and 64 GPUs of 128 images
    for gpus, start, base, final in ((1, 0.009375, 0.15, 0.00015), (8, 0.075, 1.2, 0.0012),
                                     (64, 0.6, 9.6, 0.0096)):
        schedule = build_lr_scheduler(cfg.lr_scheduler, cfg.epochs, 10, 128 * gpus)
        np.testing.assert_allclose([schedule.lr_at(0), schedule.lr_at(100), schedule.lr_at(999)],
                                   [start, base, final], rtol=1e-2)  # last step: ~final
    assert build_optimizer(cfg.optimizer, model, schedule) is not None
