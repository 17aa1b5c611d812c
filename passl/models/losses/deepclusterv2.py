"""DeepCluster-v2: spherical k-means on a memory bank of embeddings, and the loss that
predicts each sample's cluster.

Follows the appendix of Caron et al., "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments" (NeurIPS 2020) and facebookresearch/swav
``main_deepclusterv2.py``. Notation: N bank rows on this rank, D embedding size, K
centroids (prototypes) of a head, H heads, B images per rank in a step.

Everything here is a function of explicit inputs (no model, no hook, no global random
state), so reference values can be checked against it; collectives go through
:mod:`passl.distributed` and are no-ops in one process. On several ranks, every rank's
result equals the one-process result on the concatenation of the ranks' banks (rank order),
given the same initial centroid indices: they index rank 0's bank, which is the first
block of the concatenation.
"""
import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from passl import distributed
from passl.errors import ConfigError
from passl.models.losses.crops import checked_crop_config
from passl.models.registry import LOSSES

#: Rows of the bank scored against the centroids at once in the E step: bounds the
#: ``[rows, K]`` score matrix (64k x 3000 float32 = 0.8 GB) whatever the bank size.
E_STEP_ROWS = 65536


def initial_centroid_indices(seed, epoch, head, bank_rows, num_centroids):
    """K distinct rows of rank 0's bank to start head ``head``'s k-means from.

    The reference draws ``torch.randperm(len(bank))[:K]`` from the global generator; here
    the permutation is drawn from ``(seed, epoch, head)``, so a resumed run draws what the
    uninterrupted one drew without saving a generator.
    """
    if bank_rows < num_centroids:
        raise ConfigError(f"k-means: {num_centroids} centroids need at least as many memory bank "
                          f"rows on rank 0, which has {bank_rows} (its images per epoch); lower "
                          f"model.head.num_prototypes or use fewer processes")
    return np.random.default_rng([seed, epoch, head]).permutation(bank_rows)[:num_centroids]


def nearest_centroids(bank, centroids):
    """E step: index of the centroid with the largest dot product, per bank row ``[N]``."""
    parts = [paddle.matmul(bank[i:i + E_STEP_ROWS], centroids, transpose_y=True).argmax(axis=1)
             for i in range(0, bank.shape[0], E_STEP_ROWS)]
    if not parts:
        return paddle.zeros([0], dtype="int64")
    return parts[0] if len(parts) == 1 else paddle.concat(parts)


@paddle.no_grad()
def spherical_kmeans(bank, centroid_indices, iterations):
    """Distributed spherical k-means of the reference (``cluster_memory``, one head).

    Centroids start as the rows ``centroid_indices`` of rank 0's ``bank`` (broadcast, so
    other ranks' ``centroid_indices`` are not used). Each of ``iterations`` rounds is an E
    step (each row goes to the centroid of largest dot product; ties to the lowest index)
    and an M step (per-centroid sums of the assigned rows and their counts, summed over all
    ranks; a centroid with rows becomes their mean, an empty one keeps its value; then every
    centroid is L2-normalised). A final E step gives the returned assignments, so
    ``iterations=0`` returns the initial centroids and their assignments.

    The M step runs in float64 and is rounded once, so the centroids are the exact ones to
    float32 rounding whatever the order of summation (the reference sums in float32).

    Args:
        bank: ``[N, D]`` float32 Tensor, this rank's embeddings (unit rows).
        centroid_indices: ``[K]`` integer indices into rank 0's bank.
        iterations: number of E + M rounds (10 in the reference).

    Returns:
        ``(centroids [K, D] float32, assignments [N] int64)``, centroids identical on every
        rank; assignments of this rank's rows.
    """
    bank = bank.astype("float32")
    indices = paddle.to_tensor(np.asarray(centroid_indices, dtype=np.int64))
    centroids = paddle.gather(bank, indices) if distributed.get_rank() == 0 \
        else paddle.zeros([len(centroid_indices), bank.shape[1]], dtype="float32")
    centroids = distributed.broadcast(centroids, src=0)
    num_centroids = centroids.shape[0]
    bank64 = bank.astype("float64")
    for _ in range(iterations):
        assignments = nearest_centroids(bank, centroids)
        sums = paddle.index_add(paddle.zeros([num_centroids, bank.shape[1]], dtype="float64"),
                                assignments, 0, bank64)
        counts = paddle.bincount(assignments, minlength=num_centroids).astype("float64")
        sums = distributed.all_reduce(sums)
        counts = distributed.all_reduce(counts)
        filled = (counts > 0).unsqueeze(1)
        means = sums / counts.clip(min=1).unsqueeze(1)
        centroids64 = paddle.where(filled, means, centroids.astype("float64"))
        centroids = F.normalize(centroids64, p=2, axis=1).astype("float32")
    return centroids, nearest_centroids(bank, centroids)


def as_int64_tensor(values):
    return (values if isinstance(values, paddle.Tensor) else paddle.to_tensor(values)) \
        .astype("int64")


@paddle.no_grad()
def gather_assignments(local_indices, local_assignments, dataset_size):
    """Every rank's (sample index -> cluster) pairs as one ``[dataset_size]`` int64 array.

    Samples in no rank's bank get -1 (ignored by :func:`deepclusterv2_loss`). A sample in
    several banks (the sampler pads an epoch by repeating samples) takes the assignment of
    the last rank, in rank order, that holds it (the reference writes them in that order).
    """
    indices = distributed.all_gather(as_int64_tensor(local_indices))
    assignments = distributed.all_gather(as_int64_tensor(local_assignments))
    table = np.full(dataset_size, -1, dtype=np.int64)
    table[indices.numpy()] = assignments.numpy()  # NumPy: the last of repeated indices wins
    return table


def cluster_banks(banks, local_indices, num_prototypes, dataset_size, iterations,
                  centroid_indices):
    """The reference's ``cluster_memory``: one k-means per head on the cycled banks.

    Head ``h`` clusters bank ``h mod len(banks)`` (one bank per assignment crop).

    Args:
        banks: ``[A, N, D]`` float32 Tensor, this rank's embeddings of the A assignment crops.
        local_indices: ``[N]`` dataset index of each bank row.
        num_prototypes: K of every head, e.g. ``[3000, 3000, 3000]``.
        dataset_size: number of samples of the dataset.
        iterations: k-means iterations.
        centroid_indices: one ``[K_h]`` array per head, rows of rank 0's bank
            (:func:`initial_centroid_indices`).

    Returns:
        ``(centroids, assignments)``: a list of ``[K_h, D]`` Tensors and a
        ``[H, dataset_size]`` int64 array (-1 for samples in no bank).
    """
    centroids, assignments = [], []
    for head, start in enumerate(centroid_indices):
        if len(start) != num_prototypes[head]:
            raise ValueError(f"head {head}: {len(start)} initial centroids for "
                             f"{num_prototypes[head]} prototypes")
        head_centroids, local = spherical_kmeans(banks[head % banks.shape[0]], start, iterations)
        centroids.append(head_centroids)
        assignments.append(gather_assignments(local_indices, local, dataset_size))
    return centroids, np.stack(assignments)


def deepclusterv2_loss(scores_per_head, assignments, temperature):
    """Cross-entropy of every crop's prediction against its image's cluster, mean over heads.

    As the reference: for head h, ``cross_entropy(scores_h / temperature, targets)`` where
    the targets are the batch's assignments repeated over the crops (scores are
    crop-major), averaged over the targets that are not -1 (samples no bank held); then the
    mean over heads. A head whose targets are all -1 contributes 0 (PyTorch's mean over no
    target would be NaN).

    Args:
        scores_per_head: one ``[V * B, K_h]`` Tensor per head (embeddings @ prototypes),
            rows ``v*B:(v+1)*B`` being crop v.
        assignments: ``[H, B]`` int64 (Tensor or array): each image's cluster per head.
        temperature: softmax temperature (0.1).

    Returns:
        Scalar float32 Tensor.
    """
    assignments = as_int64_tensor(assignments)
    losses = []
    for head, scores in enumerate(scores_per_head):
        batch_size = assignments.shape[1]
        if scores.shape[0] % batch_size:
            raise ValueError(f"deepclusterv2_loss: {scores.shape[0]} score rows are not a "
                             f"multiple of the batch of {batch_size}")
        targets = paddle.tile(assignments[head], [scores.shape[0] // batch_size])
        log_probs = F.log_softmax(scores.astype("float32") / temperature, axis=1)
        seen = targets >= 0
        picked = paddle.take_along_axis(log_probs, targets.clip(min=0).unsqueeze(1), axis=1)
        weights = seen.astype("float32")
        losses.append(-(picked.squeeze(1) * weights).sum() / weights.sum().clip(min=1.0))
    return paddle.add_n(losses) / len(losses)


@LOSSES.register()
class DeepClusterV2Loss(nn.Layer):
    """:func:`deepclusterv2_loss` against the current cluster assignments.

    Config keys (``model.loss``): ``nmb_crops`` (crops per resolution, must match the
    MultiCrop transform), ``crops_for_assign`` (crops whose embeddings go into the memory
    bank, default ``[0, 1]``), ``temperature`` (0.1).

    ``self.assignments`` (``[H, dataset size]`` int64, -1 for unseen samples) is None until
    :class:`~passl.engine.hooks.deepclusterv2_hook.DeepClusterV2Hook` clusters the bank at
    the start of an epoch.
    """

    def __init__(self, nmb_crops, crops_for_assign=(0, 1), temperature=0.1):
        super().__init__()
        self.nmb_crops, self.crops_for_assign = checked_crop_config(nmb_crops, crops_for_assign)
        if not temperature > 0:
            raise ConfigError(f"model.loss.temperature must be > 0, got {temperature!r}")
        self.temperature = temperature
        self.assignments = None

    def forward(self, scores_per_head, indices):
        """Loss of the batch whose dataset indices are ``indices`` (``[B]`` int64)."""
        if self.assignments is None:
            raise ConfigError("DeepClusterV2Loss: no cluster assignments; add "
                              "`- {name: DeepClusterV2Hook, ...}` to the config's hooks")
        targets = paddle.gather(self.assignments, indices.astype("int64"), axis=1)
        return deepclusterv2_loss(scores_per_head, targets, self.temperature)
