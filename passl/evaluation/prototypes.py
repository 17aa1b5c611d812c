"""What SwAV's prototypes hold: scores of every image on every prototype, the top-scoring
images of a prototype, and how the hard assignments spread over the prototypes.

Pure numpy on top of one batched, gathered forward pass (:func:`swav_embeddings`), so the
numbers behind ``tools/visualize.py`` can be checked without drawing anything.
"""
import numpy as np

from passl import distributed
from passl.errors import UserError
from passl.evaluation.knn import extract_features


def shard_order(size, world_size):
    """Dataset index of each row gathered from ordered evaluation loaders: rank ``r`` reads
    indices ``r, r + world, ...`` (``RankShard``) and the gather concatenates ranks in order."""
    return np.concatenate([np.arange(rank, size, world_size) for rank in range(world_size)])


def swav_embeddings(model, loader):
    """Unit-length neck embeddings ``[N, D]`` and labels ``[N]`` (numpy, dataset order) of every
    image of an ordered evaluation ``loader``, on every rank; batched as the loader batches."""
    if not all(hasattr(model, part) for part in ("backbone", "neck", "head")):
        raise UserError(f"model: {type(model).__name__} has no prototypes; prototype galleries "
                        f"and usage need a config with model.name: SwAV or DeepClusterV2 and "
                        f"its checkpoint")
    embeddings, labels = extract_features(model, loader, gather=True,
                                          features_of=lambda images: model.neck(model.backbone(images)))
    rows = shard_order(len(loader.dataset), distributed.get_world_size())
    in_order = np.empty(embeddings.shape, dtype="float32"), np.empty(labels.shape, dtype="int64")
    in_order[0][rows], in_order[1][rows] = embeddings.numpy(), labels.numpy()
    return in_order


def prototype_scores(embeddings, prototypes):
    """Cosine scores ``[N, K]`` of unit embeddings ``[N, D]`` on prototypes ``[D, K]``.

    ``Linear.weight`` keeps one prototype per column; the columns are normalised here because
    training normalises them before each step, so after the last step they are a little off.
    """
    norms = np.linalg.norm(prototypes, axis=0, keepdims=True)
    return embeddings @ (prototypes / np.maximum(norms, 1e-12))


def assignment_counts(scores):
    """Images whose best prototype is each of the K (hard assignments): int ``[K]``."""
    return np.bincount(scores.argmax(axis=1), minlength=scores.shape[1])


def assignment_entropy(counts):
    """Entropy in nats of the assignment shares: ln K when every prototype gets the same number
    of images, 0 when one takes everything (collapse)."""
    shares = counts[counts > 0] / counts.sum()
    return float(-(shares * np.log(shares)).sum())


def usage_order(counts):
    """Prototype ids, most assigned first (ties: lower id first)."""
    return np.argsort(-counts, kind="stable")


def top_images(scores, prototype_ids, top):
    """``[len(prototype_ids), top]`` image indices, highest score on each prototype first
    (ties: lower index first)."""
    return np.stack([np.argsort(-scores[:, p], kind="stable")[:top] for p in prototype_ids])
