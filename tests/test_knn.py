"""Weighted kNN against a direct NumPy implementation of the same protocol."""
import numpy as np
import paddle
import pytest

from passl.errors import UserError
from passl.evaluation import knn
from passl.evaluation.knn import RowBuffer, extract_features, knn_evaluate, knn_votes


def numpy_knn_votes(train_x, train_y, query_x, k, temperature, num_classes):
    """Loop-based reference: k most cosine-similar bank rows vote exp(sim / T) for their class."""
    train_x = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    query_x = query_x / np.linalg.norm(query_x, axis=1, keepdims=True)
    votes = np.zeros((len(query_x), num_classes))
    for q, query in enumerate(query_x):
        similarity = train_x @ query
        for j in np.argsort(-similarity)[:k]:
            votes[q, train_y[j]] += np.exp(similarity[j] / temperature)
    return votes


def numpy_topk(votes, labels, k):
    ranked = np.argsort(-votes, axis=1)[:, :k]
    return 100.0 * np.mean([label in row for row, label in zip(ranked, labels)])


def clustered(rng, n, centres, noise):
    labels = rng.integers(0, len(centres), size=n)
    return (centres[labels] + noise * rng.standard_normal((n, centres.shape[1]))).astype("float32"), labels


class Identity(paddle.nn.Layer):
    """A 'model' whose pooled features are its flattened inputs."""

    def extract_features(self, images):
        assert not self.training
        return images.flatten(1)


def batches(x, y, size):
    return [(paddle.to_tensor(x[i:i + size]), paddle.to_tensor(y[i:i + size]))
            for i in range(0, len(x), size)]


def test_votes_match_numpy():
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((60, 16)).astype("float32")
    bank_labels = rng.integers(0, 5, size=60)
    queries = rng.standard_normal((12, 16)).astype("float32")
    expected = numpy_knn_votes(bank, bank_labels, queries, k=7, temperature=0.1, num_classes=5)
    normalise = lambda a: paddle.nn.functional.normalize(paddle.to_tensor(a), axis=1)  # noqa: E731
    votes = knn_votes(normalise(queries), normalise(bank), paddle.to_tensor(bank_labels),
                      num_classes=5, k=7, temperature=0.1)
    np.testing.assert_allclose(votes.numpy(), expected, rtol=1e-4)


@pytest.mark.parametrize("similarity_entries", [2 ** 28, 200 * 7])  # 1024 or 7 queries a chunk
def test_knn_evaluate_matches_numpy_accuracy(monkeypatch, similarity_entries):
    monkeypatch.setattr(knn, "SIMILARITY_ENTRIES", similarity_entries)
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((8, 10))
    train_x, train_y = clustered(rng, 200, centres, noise=1.2)
    val_x, val_y = clustered(rng, 90, centres, noise=1.2)
    votes = numpy_knn_votes(train_x, train_y, val_x, k=20, temperature=0.07, num_classes=8)
    expected_top1, expected_top5 = numpy_topk(votes, val_y, 1), numpy_topk(votes, val_y, 5)
    assert 20 < expected_top1 < 95  # a case where the votes matter, not a trivial one

    model = Identity()
    model.train()
    result = knn_evaluate(model, batches(train_x, train_y, 64), batches(val_x, val_y, 32),
                          k=20, temperature=0.07)
    assert result["knn_top1"] == pytest.approx(expected_top1)
    assert result["knn_top5"] == pytest.approx(expected_top5)
    assert result["count"] == 90
    assert model.training  # mode restored


def test_user_errors():
    x = np.ones((4, 3), dtype="float32")
    with pytest.raises(UserError, match="labelled"):
        knn_evaluate(Identity(), batches(x, np.full(4, -1), 2), batches(x, np.zeros(4, "int64"), 2))
    with pytest.raises(UserError, match="k=0"):
        knn_evaluate(Identity(), [], [], k=0)
    with pytest.raises(UserError, match="temperature=0"):
        knn_evaluate(Identity(), [], [], temperature=0)


def test_extracted_features_are_written_into_one_tensor_not_concatenated():
    """The bank's rows go batch by batch into one tensor sized from the loader's length, so
    extraction holds the bank once (a list concatenated at the end held it twice)."""
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((1000, 256)).astype("float32"), rng.integers(0, 5, size=1000)
    loader = batches(x, y, 50)
    core = paddle.base.core
    before = core.host_memory_stat_current_value("Allocated", 0)
    core.host_memory_stat_reset_peak_value("Allocated", 0)
    features, labels = extract_features(Identity(), loader, gather=False)
    peak = core.host_memory_stat_peak_value("Allocated", 0) - before
    np.testing.assert_allclose(features.numpy(), x / np.linalg.norm(x, axis=1, keepdims=True),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels.numpy(), y)
    bank = x.size * 4 + y.size * 8
    assert peak < 1.2 * bank  # the bank plus a few batches' temporaries


def test_row_buffer_grows_for_a_larger_batch_or_an_unknown_length():
    parts = [np.arange(n * 2, dtype="float32").reshape(n, 2) + 100 * n for n in (3, 3, 5, 1)]
    for batches_expected in (4, None):
        buffer = RowBuffer(batches_expected)
        for part in parts:
            buffer.append(paddle.to_tensor(part))
        np.testing.assert_array_equal(buffer.rows().numpy(), np.concatenate(parts))
