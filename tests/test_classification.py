"""The linear-protocol classifier: frozen backbone (weights and BN statistics), head init, outputs."""
import numpy as np
import paddle
import pytest

from passl.models import MODELS

TINY_RESNET = {"name": "ResNet", "depth": 18, "layers": [1, 1, 1, 1], "base_width": 8,
               "stem": "small"}


def build(freeze_backbone=True, num_classes=5):
    paddle.seed(0)
    return MODELS.build({"name": "Classification", "backbone": dict(TINY_RESNET),
                         "num_classes": num_classes, "freeze_backbone": freeze_backbone})


def snapshot(layer):
    """Every parameter and buffer (BN running mean/variance included), as NumPy copies."""
    return {name: value.numpy().copy() for name, value in layer.state_dict().items()}


def train_steps(model, steps=3):
    """SGD with momentum and weight decay over *all* parameters (as a careless trainer would),
    on one fixed batch whose statistics differ from the BN running ones."""
    optimizer = paddle.optimizer.Momentum(learning_rate=0.1, momentum=0.9, weight_decay=1e-2,
                                          parameters=model.parameters())
    rng = np.random.default_rng(0)
    images = paddle.to_tensor(rng.standard_normal((8, 3, 16, 16)).astype("float32") + 2.0)
    labels = paddle.to_tensor(rng.integers(0, 5, size=8))
    losses = []
    model.train()
    for _ in range(steps):
        loss = model((images, labels))["loss"]
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(loss))
    return losses


def changed(before, after):
    return sorted(name for name in before if not np.array_equal(before[name], after[name]))


def test_frozen_backbone_keeps_weights_and_bn_statistics():
    model = build()
    backbone_before, head_before = snapshot(model.backbone), snapshot(model.fc)
    train_steps(model)
    assert changed(backbone_before, snapshot(model.backbone)) == []
    assert changed(head_before, snapshot(model.fc)) == ["bias", "weight"]


def test_unfrozen_backbone_does_train():
    """The same steps change the backbone when it is not frozen: the test above can fail."""
    model = build(freeze_backbone=False)
    before = snapshot(model.backbone)
    train_steps(model)
    moved = changed(before, snapshot(model.backbone))
    assert "conv1.weight" in moved and "bn1._mean" in moved and "bn1._variance" in moved


def test_backbone_stays_in_eval_mode():
    model = build()
    model.train()
    assert model.training and model.fc.training
    assert not any(layer.training for layer in model.backbone.sublayers(include_self=True))
    # A wrapper (paddle.DataParallel) flips every sublayer's flag directly; forward undoes it.
    for layer in model.sublayers():
        layer.training = True
    before = snapshot(model.backbone)
    model((paddle.randn([4, 3, 16, 16]) + 3.0, paddle.to_tensor([0, 1, 2, 3])))
    assert changed(before, snapshot(model.backbone)) == []
    assert all(p.stop_gradient for p in model.backbone.parameters())


def test_linear_layer_init_and_outputs():
    model = build(num_classes=1000)
    weight = model.fc.weight.numpy()
    assert weight.shape == (model.backbone.out_channels, 1000)
    assert abs(weight.std() - 0.01) < 0.001 and abs(weight.mean()) < 0.001
    assert not model.fc.bias.numpy().any()

    images, labels = paddle.randn([3, 3, 16, 16]), paddle.to_tensor([4, 0, 999])
    model.eval()
    out = model((images, labels))
    assert out["logits"].shape == [3, 1000] and out["labels"].tolist() == [4, 0, 999]
    assert model.extract_features(images).shape == [3, model.backbone.out_channels]
    model.train()
    out = model((images, labels))
    # Near-zero logits at init: cross entropy close to ln(1000).
    assert float(out["loss"]) == pytest.approx(np.log(1000), abs=0.05)
    assert set(out["logs"]) == {"top1", "top5"}


def test_linear_head_learns():
    model = build()
    losses = train_steps(model, steps=8)
    assert losses[-1] < losses[0]


def test_a_training_step_reads_nothing_on_the_host(host_reads):
    """The step's top-k logs stay device tensors (each host read waits for the GPU) and equal
    the accuracy of the step's logits."""
    model = build(num_classes=10)
    optimizer = paddle.optimizer.Momentum(learning_rate=0.1, parameters=model.fc.parameters())
    rng = np.random.default_rng(1)
    images = paddle.to_tensor(rng.standard_normal((8, 3, 16, 16)).astype("float32"))
    labels = rng.integers(0, 10, size=8)
    model.train()  # the frozen backbone stays in eval mode: features are deterministic
    logits = model.extract_features(images).numpy() @ model.fc.weight.numpy() \
        + model.fc.bias.numpy()
    ranks = (-logits).argsort(axis=1)
    expected = {f"top{k}": 100.0 * np.mean([label in row[:k] for label, row in
                                            zip(labels, ranks)]) for k in (1, 5)}
    host_reads.clear()
    out = model((images, paddle.to_tensor(labels)))
    out["loss"].backward()
    optimizer.step()
    optimizer.clear_grad()
    assert host_reads == []
    assert {k: float(v) for k, v in out["logs"].items()} == pytest.approx(expected)
