"""distributed_sinkhorn and swav_loss against the float64 NumPy reference (one process)."""
import numpy as np
import paddle
import pytest

import swav_numpy_reference as ref
from passl.errors import ConfigError
from passl.models.architectures.swav import prototypes_used
from passl.models.losses.swav import SwAVLoss, distributed_sinkhorn, swav_loss

NMB_CROPS = [2, 6]
CROPS_FOR_ASSIGN = [0, 1]


def uniform_scores(shape, seed, low=-1.0, high=1.0):
    return np.random.RandomState(seed).uniform(low, high, shape).astype(np.float32)


@pytest.mark.parametrize("shape", [(64, 30), (32, 10), (256, 3000)])
@pytest.mark.parametrize("epsilon", [0.05, 0.03])
@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_sinkhorn_matches_numpy(shape, epsilon, iterations):
    scores = uniform_scores(shape, seed=shape[0] + iterations)
    codes = distributed_sinkhorn(paddle.to_tensor(scores), epsilon, iterations)
    expected = ref.sinkhorn(scores, epsilon, iterations)
    assert codes.dtype == paddle.float32 and codes.shape == list(shape)
    assert np.abs(codes.numpy() - expected).max() <= 1e-5
    np.testing.assert_allclose(codes.numpy().sum(axis=1), 1.0, atol=1e-5)


def test_sinkhorn_converges_to_equal_partition():
    scores = uniform_scores((64, 16), seed=3)
    codes = distributed_sinkhorn(paddle.to_tensor(scores), 0.05, 200).numpy()
    np.testing.assert_allclose(codes.sum(axis=0), 64 / 16, rtol=1e-4)  # B/K per prototype
    np.testing.assert_allclose(codes.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("shape", [(64, 30), (32, 10), (256, 3000)])
def test_sinkhorn_finite_at_small_epsilon(shape):
    scores = uniform_scores(shape, seed=7)
    codes = distributed_sinkhorn(paddle.to_tensor(scores), 0.01, 3).numpy()
    assert np.isfinite(codes).all()
    np.testing.assert_allclose(codes.sum(axis=1), 1.0, atol=1e-5)


def test_sinkhorn_finite_when_one_sample_is_far_from_every_prototype():
    # exp(-2/0.01) underflows float32: this sample's column would be all zero (0/0)
    scores = uniform_scores((32, 10), seed=1, low=0.9, high=1.0)
    scores[5] = -1.0
    codes = distributed_sinkhorn(paddle.to_tensor(scores), 0.01, 3).numpy()
    assert np.isfinite(codes).all()
    assert np.abs(codes - ref.sinkhorn(scores, 0.01, 3)).max() <= 1e-5


def test_sinkhorn_half_precision_input_runs_in_full_precision():
    scores = uniform_scores((64, 30), seed=2)
    half = paddle.to_tensor(scores).astype("float16")
    codes = distributed_sinkhorn(half, 0.05, 3)
    assert codes.dtype == paddle.float32
    expected = ref.sinkhorn(half.astype("float32").numpy(), 0.05, 3)
    assert np.abs(codes.numpy() - expected).max() <= 1e-5


def test_sinkhorn_has_no_gradient():
    scores = paddle.to_tensor(uniform_scores((8, 5), seed=0), stop_gradient=False)
    assert distributed_sinkhorn(scores, 0.05, 3).stop_gradient


def random_batch(batch_size, dim, num_prototypes, seed, queue_rows=0):
    rng = np.random.RandomState(seed)
    features = rng.randn(sum(NMB_CROPS) * batch_size, dim)
    prototypes = rng.randn(dim, num_prototypes)  # Paddle layout: one prototype per column
    queue = [ref.normalize(rng.randn(queue_rows, dim), axis=1) for _ in CROPS_FOR_ASSIGN]
    return features, prototypes, queue


@pytest.mark.parametrize("queue_rows", [0, 64])
@pytest.mark.parametrize("batch_size, dim, num_prototypes", [(16, 8, 20), (32, 128, 3000)])
def test_swav_loss_value_and_score_gradient(queue_rows, batch_size, dim, num_prototypes):
    features, prototypes, queue = random_batch(batch_size, dim, num_prototypes, seed=11,
                                               queue_rows=queue_rows)
    W = ref.normalize(prototypes, axis=0)
    scores = (ref.normalize(features, axis=1) @ W).astype(np.float32)
    queue_scores = [(q @ W).astype(np.float32) for q in queue] if queue_rows else None

    expected_loss, expected_grad = ref.swav_loss_and_grad(
        scores, NMB_CROPS, CROPS_FOR_ASSIGN, 0.1, 0.05, 3, queue_scores)
    x = paddle.to_tensor(scores, stop_gradient=False)
    loss = swav_loss(x, NMB_CROPS, CROPS_FOR_ASSIGN, 0.1, 0.05, 3,
                     [paddle.to_tensor(s) for s in queue_scores] if queue_rows else None)
    loss.backward()
    assert abs(loss.item() - expected_loss) <= 1e-5
    assert np.abs(x.grad.numpy() - expected_grad).max() <= 1e-4 * np.abs(expected_grad).max()


def test_queue_changes_the_loss():
    features, prototypes, queue = random_batch(16, 8, 20, seed=12, queue_rows=48)
    scores = paddle.to_tensor((ref.normalize(features, 1) @ ref.normalize(prototypes, 0))
                              .astype(np.float32))
    queue_scores = [paddle.to_tensor((q @ ref.normalize(prototypes, 0)).astype(np.float32))
                    for q in queue]
    without = swav_loss(scores, NMB_CROPS, CROPS_FOR_ASSIGN, 0.1, 0.05, 3).item()
    with_queue = swav_loss(scores, NMB_CROPS, CROPS_FOR_ASSIGN, 0.1, 0.05, 3, queue_scores).item()
    assert abs(without - with_queue) > 1e-4


def backprop_through_normalisation(features, prototypes, queue, batch_size):
    """Expected (loss, d/d features, d/d prototypes) through both L2 normalisations."""
    z = ref.normalize(features, axis=1)
    W = ref.normalize(prototypes, axis=0)
    scores = z @ W
    queue_scores = [q @ W for q in queue] if queue[0].size else None
    loss, grad_scores = ref.swav_loss_and_grad(scores, NMB_CROPS, CROPS_FOR_ASSIGN, 0.1, 0.05, 3,
                                               queue_scores)
    grad_features = ref.normalize_backward(features, grad_scores @ W.T, axis=1)
    grad_prototypes = ref.normalize_backward(prototypes, z.T @ grad_scores, axis=0)
    return loss, grad_features, grad_prototypes


@pytest.mark.parametrize("queue_rows", [0, 32])
def test_swav_loss_layer_gradients_through_normalised_embeddings_and_prototypes(queue_rows):
    batch_size = 8
    features, prototypes, queue = random_batch(batch_size, 6, 12, seed=5, queue_rows=queue_rows)
    expected_loss, expected_gf, expected_gw = backprop_through_normalisation(
        features, prototypes, queue, batch_size)

    x = paddle.to_tensor(features.astype(np.float32), stop_gradient=False)
    w = paddle.to_tensor(prototypes.astype(np.float32), stop_gradient=False)
    z = paddle.nn.functional.normalize(x, axis=1)
    W = paddle.nn.functional.normalize(w, axis=0)
    criterion = SwAVLoss(NMB_CROPS, CROPS_FOR_ASSIGN)
    if queue_rows:
        from passl.models.losses.swav_queue import SwAVQueue
        criterion.queue = SwAVQueue(len(CROPS_FOR_ASSIGN), queue_rows, 6)
        criterion.queue.embeddings = paddle.to_tensor(np.stack(queue).astype(np.float32))
    loss = criterion(z, [z @ W], [W], batch_size)
    loss.backward()
    assert abs(loss.item() - expected_loss) <= 1e-5
    for got, expected in ((x.grad.numpy(), expected_gf), (w.grad.numpy(), expected_gw)):
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_swav_loss_layer_averages_heads():
    batch_size = 4
    rng = np.random.RandomState(0)
    z = paddle.to_tensor(ref.normalize(rng.randn(sum(NMB_CROPS) * batch_size, 6), 1)
                         .astype(np.float32))
    heads = [paddle.to_tensor(ref.normalize(rng.randn(6, k), 0).astype(np.float32)) for k in (5, 9)]
    criterion = SwAVLoss(NMB_CROPS, CROPS_FOR_ASSIGN)
    both = criterion(z, [z @ W for W in heads], heads, batch_size).item()
    each = [swav_loss(z @ W, NMB_CROPS, CROPS_FOR_ASSIGN, 0.1, 0.05, 3).item() for W in heads]
    assert abs(both - np.mean(each)) <= 1e-6


def test_swav_loss_rejects_rows_not_matching_crops():
    with pytest.raises(ValueError, match="sum\\(nmb_crops\\) = 8"):
        swav_loss(paddle.zeros([20, 5]), NMB_CROPS, CROPS_FOR_ASSIGN, 0.1, 0.05, 3)


def test_uniform_scores_give_log_k():
    # the collapse signature DESIGN §4 mentions: uniform predictions cost ln K
    scores = paddle.zeros([8 * 4, 3000])
    loss = swav_loss(scores, NMB_CROPS, CROPS_FOR_ASSIGN, 0.1, 0.05, 3).item()
    assert abs(loss - np.log(3000)) <= 1e-4


def test_prototypes_used_counts_distinct_winners():
    scores = paddle.to_tensor(np.eye(4, 10, dtype=np.float32)[[0, 1, 1, 3]])
    assert abs(prototypes_used(scores).item() - 3 / 10) <= 1e-7


def test_half_precision_scores_give_a_float32_loss_and_half_gradients():
    scores = uniform_scores((32, 20), seed=4)
    x = paddle.to_tensor(scores).astype("float16")
    x.stop_gradient = False
    loss = swav_loss(x, [2, 2], CROPS_FOR_ASSIGN, 0.1, 0.05, 3)
    loss.backward()
    expected_loss, expected_grad = ref.swav_loss_and_grad(
        x.astype("float32").numpy(), [2, 2], CROPS_FOR_ASSIGN, 0.1, 0.05, 3)
    assert loss.dtype == paddle.float32 and abs(loss.item() - expected_loss) <= 1e-5
    assert x.grad.dtype == paddle.float16
    error = np.abs(x.grad.astype("float32").numpy() - expected_grad).max()
    assert error <= 1e-3 * np.abs(expected_grad).max()


@pytest.mark.parametrize("kwargs, message", [
    ({"crops_for_assign": [0, 8]}, "crops_for_assign"),
    ({"epsilon": 0}, "epsilon must be > 0"),
    ({"temperature": -0.1}, "temperature must be > 0"),
])
def test_swav_loss_layer_rejects_bad_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SwAVLoss(NMB_CROPS, **{"crops_for_assign": CROPS_FOR_ASSIGN, **kwargs})
