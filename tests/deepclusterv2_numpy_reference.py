"""DeepCluster-v2's clustering and loss written out in NumPy from the reference's math
(facebookresearch/swav main_deepclusterv2.py: cluster_memory, the loss in train()), with the
ranks simulated as a list of per-rank banks. Independent of passl: the tests compare it with
passl.models.losses.deepclusterv2.

The reference marks unseen samples -100 (its CrossEntropyLoss ignore_index); ours -1.
"""
import numpy as np

UNSEEN = -1


def kmeans(rank_banks, centroid_indices, iterations):
    """One head of ``cluster_memory`` over ``len(rank_banks)`` simulated ranks, float32.

    Returns ``(centroids [K, D], [assignments of each rank's rows])``.
    """
    banks = [np.asarray(b, dtype=np.float32) for b in rank_banks]
    centroids = banks[0][np.asarray(centroid_indices)].copy()  # rank 0's rows, broadcast
    num_centroids, dim = centroids.shape
    for n_iter in range(iterations + 1):
        local = [np.argmax(bank @ centroids.T, axis=1) for bank in banks]  # E step
        if n_iter == iterations:
            break
        counts = np.zeros(num_centroids, dtype=np.int64)  # M step, summed over ranks
        sums = np.zeros((num_centroids, dim), dtype=np.float32)
        for bank, assigned in zip(banks, local):
            for k in np.unique(assigned):
                sums[k] += bank[assigned == k].sum(axis=0)
                counts[k] += np.count_nonzero(assigned == k)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        norms = np.linalg.norm(centroids, axis=1, keepdims=True)
        centroids = centroids / np.maximum(norms, 1e-12)
    return centroids, local


def gathered_assignments(rank_indices, rank_assignments, dataset_size):
    """``assignments[indexes_all] = assignments_all`` with the ranks concatenated in order."""
    table = np.full(dataset_size, UNSEEN, dtype=np.int64)
    table[np.concatenate(rank_indices)] = np.concatenate(rank_assignments)
    return table


def cluster_memory(rank_banks, rank_indices, num_prototypes, dataset_size, iterations, starts):
    """All heads; head h clusters bank ``h mod A`` (``j`` of the reference).

    ``rank_banks``: per rank, an ``[A, N_r, D]`` array.
    """
    centroids, tables = [], []
    for head, k in enumerate(num_prototypes):
        j = head % len(rank_banks[0])
        head_centroids, local = kmeans([b[j] for b in rank_banks], starts[head], iterations)
        assert head_centroids.shape[0] == k
        centroids.append(head_centroids)
        tables.append(gathered_assignments(rank_indices, local, dataset_size))
    return centroids, np.stack(tables)


def loss_and_grads(scores_per_head, batch_assignments, temperature):
    """Mean over heads of cross_entropy(scores/T, targets repeated over crops, ignoring
    unseen targets), and its gradient with respect to each head's scores (float64)."""
    loss, grads = 0.0, []
    heads = len(scores_per_head)
    for head, scores in enumerate(scores_per_head):
        scores = np.asarray(scores, dtype=np.float64)
        crops = scores.shape[0] // batch_assignments.shape[1]
        targets = np.tile(batch_assignments[head], crops)
        logits = scores / temperature
        logits = logits - logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        seen = targets != UNSEEN
        count = max(int(seen.sum()), 1)
        rows = np.flatnonzero(seen)
        loss += -log_probs[rows, targets[rows]].sum() / count / heads
        grad = np.exp(log_probs)
        grad[rows, targets[rows]] -= 1.0
        grad[~seen] = 0.0
        grads.append(grad / (temperature * count * heads))
    return loss, grads
