"""DeepCluster-v2: k-means, gathered assignments and loss against a NumPy transcription of
the reference (tests/deepclusterv2_numpy_reference.py); the model and its memory bank."""
import numpy as np
import paddle
import pytest

import deepclusterv2_numpy_reference as reference
from passl.errors import ConfigError
from passl.models import MODELS
from passl.models.losses.deepclusterv2 import (cluster_banks, deepclusterv2_loss,
                                               gather_assignments, initial_centroid_indices,
                                               spherical_kmeans)
from passl.models.losses.deepclusterv2_bank import MemoryBank, reshard_banks


def unit_rows(rng, shape):
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered_bank(rng, rows, dim, groups):
    """Unit rows around ``groups`` directions, so k-means has structure to find."""
    centres = unit_rows(rng, (groups, dim))
    x = centres[rng.integers(groups, size=rows)] + 0.4 * rng.normal(size=(rows, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("iterations", [0, 1, 2, 5, 10])
def test_kmeans_after_each_iteration_matches_the_reference(iterations):
    rng = np.random.default_rng(0)
    bank = clustered_bank(rng, 500, 16, 12)
    start = initial_centroid_indices(seed=3, epoch=1, head=0, bank_rows=500, num_centroids=20)
    centroids, assignments = spherical_kmeans(paddle.to_tensor(bank), start, iterations)
    expected_centroids, (expected,) = reference.kmeans([bank], start, iterations)
    np.testing.assert_array_equal(assignments.numpy(), expected)
    np.testing.assert_allclose(centroids.numpy(), expected_centroids, rtol=0, atol=2e-6)
    if iterations == 0:
        np.testing.assert_array_equal(centroids.numpy(), bank[start])


def test_an_empty_cluster_keeps_its_centroid():
    """Two starts on equal rows tie; the first wins every row, the second stays put."""
    rng = np.random.default_rng(1)
    bank = clustered_bank(rng, 60, 8, 3)
    bank[7] = bank[3]
    start = np.array([3, 7, 20, 40])
    _, first = spherical_kmeans(paddle.to_tensor(bank), start, 0)
    assert 1 not in first.numpy()  # ties go to the lower index
    centroids, assignments = spherical_kmeans(paddle.to_tensor(bank), start, 1)
    expected_centroids, (expected,) = reference.kmeans([bank], start, 1)
    np.testing.assert_array_equal(centroids.numpy()[1], bank[7])
    np.testing.assert_array_equal(assignments.numpy(), expected)
    np.testing.assert_allclose(centroids.numpy(), expected_centroids, atol=2e-6)


def test_heads_cycle_over_the_banks_and_unseen_samples_get_minus_one():
    rng = np.random.default_rng(2)
    banks = np.stack([clustered_bank(rng, 90, 8, 5) for _ in range(2)])  # 2 assignment crops
    indices = rng.permutation(120)[:90]  # 30 samples of the dataset are in no bank
    sizes = [6, 7, 5]
    starts = [initial_centroid_indices(0, 4, h, 90, k) for h, k in enumerate(sizes)]
    centroids, table = cluster_banks(paddle.to_tensor(banks), paddle.to_tensor(indices), sizes,
                                     120, 10, starts)
    expected_centroids, expected = reference.cluster_memory([banks], [indices], sizes, 120, 10,
                                                            starts)
    np.testing.assert_array_equal(table, expected)
    assert (table[:, np.setdiff1d(np.arange(120), indices)] == -1).all()
    for ours, theirs in zip(centroids, expected_centroids):
        np.testing.assert_allclose(ours.numpy(), theirs, atol=2e-6)
    # head 2 clustered bank 0 again (j cycles), from its own start
    alone, _ = spherical_kmeans(paddle.to_tensor(banks[0]), starts[2], 10)
    np.testing.assert_array_equal(centroids[2].numpy(), alone.numpy())


def test_a_sample_in_two_banks_takes_the_last_ranks_assignment():
    table = gather_assignments(np.array([4, 1, 4]), np.array([2, 0, 5]), 6)
    np.testing.assert_array_equal(table, [-1, 0, -1, -1, 5, -1])


def test_initial_centroids_are_distinct_rows_drawn_from_seed_epoch_and_head():
    a = initial_centroid_indices(0, 3, 1, 100, 30)
    assert len(set(a.tolist())) == 30 and a.max() < 100
    np.testing.assert_array_equal(a, initial_centroid_indices(0, 3, 1, 100, 30))
    assert not np.array_equal(a, initial_centroid_indices(0, 4, 1, 100, 30))
    with pytest.raises(ConfigError, match="at least as many memory bank rows"):
        initial_centroid_indices(0, 0, 0, 20, 30)


def test_loss_and_gradients_match_the_reference():
    rng = np.random.default_rng(3)
    batch, crops, sizes = 6, 4, [7, 5, 9]
    scores = [(unit_rows(rng, (crops * batch, 8)) @ unit_rows(rng, (k, 8)).T).astype(np.float32)
              for k in sizes]
    assignments = np.stack([rng.integers(k, size=batch) for k in sizes])
    assignments[0, 2] = assignments[1, 0] = -1  # samples no bank held are ignored
    tensors = [paddle.to_tensor(s, stop_gradient=False) for s in scores]
    loss = deepclusterv2_loss(tensors, paddle.to_tensor(assignments), 0.1)
    loss.backward()
    expected, expected_grads = reference.loss_and_grads(scores, assignments, 0.1)
    assert loss.dtype == paddle.float32
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    for tensor, grad in zip(tensors, expected_grads):
        np.testing.assert_allclose(tensor.grad.numpy(), grad, rtol=1e-5, atol=1e-7)


def test_a_head_with_no_known_target_adds_zero():
    scores = [paddle.to_tensor(np.ones((4, 3), np.float32), stop_gradient=False)] * 2
    assignments = np.array([[-1, -1], [0, 2]])
    loss = deepclusterv2_loss(scores, assignments, 0.1)
    expected, _ = reference.loss_and_grads([s.numpy() for s in scores], assignments, 0.1)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    assert np.isfinite(float(loss))


TINY = {"name": "DeepClusterV2",
        "backbone": {"name": "ResNet", "depth": 18, "layers": [1, 1, 1, 1], "base_width": 8,
                     "stem": "small"},
        "neck": {"name": "SwAVNeck", "in_dim": 64, "hidden_dim": 32, "out_dim": 16},
        "head": {"name": "SwAVPrototypes", "in_dim": 16, "num_prototypes": [5, 4]},
        "loss": {"name": "DeepClusterV2Loss", "nmb_crops": [2, 1], "crops_for_assign": [0, 1]}}


def test_the_model_predicts_the_clusters_of_its_batch_indices_and_returns_bank_rows():
    paddle.seed(0)
    model = MODELS.build(TINY)
    rng = np.random.default_rng(4)
    crops = [paddle.to_tensor(rng.normal(size=(3, 3, s, s)).astype(np.float32))
             for s in (16, 16, 8)]
    indices = paddle.to_tensor(np.array([5, 0, 2]))
    with pytest.raises(ConfigError, match="DeepClusterV2Hook"):
        model((crops, indices * 0, indices))
    table = np.stack([rng.integers(5, size=8), rng.integers(4, size=8)])
    model.loss.assignments = paddle.to_tensor(table)
    out = model((crops, indices * 0, indices))

    embeddings = model.embed(crops)
    scores = [embeddings @ w for w in model.head.prototype_weights()]
    expected = deepclusterv2_loss(scores, table[:, [5, 0, 2]], 0.1)
    np.testing.assert_allclose(float(out["loss"]), float(expected), rtol=1e-6)
    np.testing.assert_array_equal(out["bank_embeddings"].numpy(),
                                  embeddings.numpy().reshape(3, 3, 16)[[0, 1]])
    assert model.needs_sample_indices
    with pytest.raises(ConfigError, match="dataset index"):
        model((crops, indices))


def test_bank_write_and_state_round_trip():
    bank = MemoryBank(2, 6, 3)
    bank.write(2, paddle.to_tensor([7, 9]), paddle.ones([2, 2, 3]))
    np.testing.assert_array_equal(bank.indices.numpy(), [-1, -1, 7, 9, -1, -1])
    assert bank.embeddings.numpy()[:, 2:4].all() and not bank.embeddings.numpy()[:, :2].any()
    copy = MemoryBank(1, 0, 1)
    copy.set_state_dict({k: v.numpy() for k, v in bank.state_dict().items()})
    np.testing.assert_array_equal(copy.embeddings.numpy(), bank.embeddings.numpy())
    with pytest.raises(ValueError, match="beyond its 6 rows"):
        bank.write(5, paddle.to_tensor([1, 2]), paddle.ones([2, 2, 3]))


def test_banks_reshard_in_sample_order_once_each():
    rng = np.random.default_rng(5)
    saved = []
    for indices in ([8, 3, 0, 5], [1, 3, 9, -1]):  # 3 is in both banks, -1 never written
        saved.append({"indices": np.array(indices),
                      "embeddings": rng.normal(size=(2, 4, 3)).astype(np.float32)})
    parts = [reshard_banks(saved, 3, rank) for rank in range(3)]
    assert [p["indices"].tolist() for p in parts] == [[0, 1], [3, 5], [8, 9]]
    # the first copy of sample 3 (rank 0's) is kept
    np.testing.assert_array_equal(parts[1]["embeddings"][:, 0], saved[0]["embeddings"][:, 1])
    np.testing.assert_array_equal(parts[0]["embeddings"][:, 1], saved[1]["embeddings"][:, 0])
    np.testing.assert_array_equal(parts[2]["embeddings"][:, 1], saved[1]["embeddings"][:, 2])
    np.testing.assert_array_equal(parts[2]["embeddings"][:, 0], saved[0]["embeddings"][:, 0])


@pytest.mark.parametrize("name, epochs, crops, sizes, low", [
    ("deepclusterv2_r50_800ep", 800, [2, 6], [224, 96], [0.14, 0.05]),
    ("deepclusterv2_r50_400ep", 400, [2, 4], [160, 96], [0.08, 0.05]),
    ("deepclusterv2_r50_400ep_2x224", 400, [2], [224], [0.08])])
def test_imagenet_configs_follow_the_reference_scripts(name, epochs, crops, sizes, low):
    import os

    from passl.config import load_config
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "deepclusterv2", name + ".yaml"))
    multicrop = cfg.dataloader.train.dataset.transforms[0]
    assert (multicrop.nmb_crops, multicrop.size_crops, multicrop.min_scale_crops) == \
        (crops, sizes, low)
    assert cfg.model.loss.nmb_crops == crops and cfg.model.loss.temperature == 0.1
    assert cfg.model.head.num_prototypes == [3000, 3000, 3000]
    assert cfg.epochs == epochs and cfg.dataloader.train.sampler.batch_size == 64
    hook = cfg.hooks[0]
    assert (hook.name, hook.freeze_prototypes_epochs, hook.kmeans_iterations) == \
        ("DeepClusterV2Hook", epochs, 10)  # frozen for the whole run
    lr = cfg.lr_scheduler
    assert (lr.base_lr, lr.final_lr, lr.warmup_epochs, lr.start_warmup,
            lr.reference_batch_size) == (4.8, 0.0048, 10, 0.3, 4096)
    assert (cfg.optimizer.name, cfg.optimizer.weight_decay) == ("LARS", 1e-6)
    with paddle.LazyGuard():
        model = MODELS.build(cfg.model)
    assert [w.shape for w in model.head.prototype_weights()] == [[128, 3000]] * 3
