"""Weighted k-nearest-neighbour classification of frozen features (InstDisc / DINO protocol).

The pooled backbone features of the train set, L2-normalised, form the memory bank; every val
image is a query. Its ``k`` most cosine-similar bank entries vote for their labels with weight
``exp(similarity / temperature)``, and the class with the largest summed vote is the
prediction. No parameters are trained, so the score measures the features alone; it is the
way to watch self-supervised pretraining without training a classifier.
"""
import paddle
import paddle.nn.functional as F

from passl import distributed
from passl.errors import UserError
from passl.utils.accuracy import TopKEvaluator

# Queries scored against the whole bank at once: at most 1024, and fewer for a large bank so
# that their [queries, bank] float32 similarity matrix stays within 2**28 entries (1 GiB;
# 1024 queries against ImageNet's 1.28 M images would take 5.2 GB, half the bank again).
QUERY_CHUNK = 1024
SIMILARITY_ENTRIES = 2 ** 28
# Rows moved at once when the gathered bank is compacted (bounds the temporary copy).
MOVE_CHUNK = 4096
#: how features are computed: the dygraph model, or a Paddle Inference predictor or an
#: onnxruntime session of it
ENGINES = ("dygraph", "inference", "onnxruntime")


def gather_rows(tensor):
    """Rows of ``tensor`` from every rank, in rank order (ranks may hold different counts).

    The bank is the largest tensor of a kNN evaluation, so the result is its only copy: the
    ranks gather the rows they all have (the first ``min(counts)`` of each, a view, not a
    copy) straight into the result, whose blocks are then moved apart in place to make room
    for the few rows only some ranks have (the evaluation loaders' shares differ by at most
    one), gathered separately. The peak is the result plus a chunk of :data:`MOVE_CHUNK`
    rows (and this rank's own rows, which the caller holds).
    """
    world_size = distributed.get_world_size()
    if world_size == 1:
        return tensor
    counts = distributed.all_gather_object(int(tensor.shape[0]))
    common, extra = min(counts), max(counts) - min(counts)
    offsets = [sum(counts[:rank]) for rank in range(world_size)]
    rows = paddle.empty([sum(counts), *tensor.shape[1:]], dtype=tensor.dtype)
    if common:
        distributed.all_gather(tensor[:common], out=rows[:world_size * common])
        for rank in reversed(range(1, world_size)):  # the last first: blocks move right
            _move_rows(rows, rank * common, offsets[rank], common)
    if extra:
        rest = tensor[common:]
        if rest.shape[0] < extra:
            rest = paddle.concat([rest, paddle.zeros([extra - rest.shape[0], *rest.shape[1:]],
                                                     dtype=rest.dtype)])
        rests = distributed.all_gather(rest)
        for rank, count in enumerate(counts):
            if count > common:
                rows[offsets[rank] + common:offsets[rank] + count] = \
                    rests[rank * extra:rank * extra + count - common]
    return rows


def _move_rows(rows, source, destination, count):
    """Move ``count`` rows of ``rows`` from ``source`` to a later ``destination``, in place:
    chunk by chunk from the end, each copied out first, so no row is overwritten unread."""
    if source == destination:
        return
    for end in range(count, 0, -MOVE_CHUNK):
        start = max(0, end - MOVE_CHUNK)
        rows[destination + start:destination + end] = rows[source + start:source + end].clone()


def feature_function(model, engine="dygraph"):
    """``images -> pooled features`` of ``model`` (in eval mode) run by ``engine``.

    ``dygraph`` calls ``model.extract_features``; ``inference`` compiles it once into a
    Paddle Inference predictor (oneDNN on CPU; a frozen copy of the current weights), which
    gives the same features to ~1e-6 relative and is about twice as fast for a ResNet-50
    (docs/benchmarks.md), but costs a few seconds to compile: worth it for large sets.
    ``onnxruntime`` does the same through an ONNX conversion (needs the ``[onnx]`` extra).
    """
    if engine not in ENGINES:
        raise UserError(f"kNN engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if engine == "dygraph":
        return model.extract_features
    from passl.deploy.engine import ModelFeatures, compile_layer
    predictor = compile_layer(ModelFeatures(model), [-1, 3, -1, -1], engine=engine)
    return lambda images: paddle.to_tensor(predictor(images.numpy()))


class RowBuffer:
    """Batches written one after the other into one tensor, sized at the first batch for
    ``batches`` like it (a loader's batches are as large as the first, but the last): a list
    concatenated at the end would hold every row twice at once. A batch that does not fit
    (a larger one, or a loader of unknown length) grows the tensor by a copy."""

    def __init__(self, batches=None):
        self.batches = batches
        self.tensor, self.filled = None, 0

    def append(self, batch):
        count, shape = batch.shape[0], list(batch.shape[1:])
        if self.tensor is None:
            self.tensor = paddle.empty([count * (self.batches or 1), *shape], dtype=batch.dtype)
        elif self.filled + count > self.tensor.shape[0]:
            more = paddle.empty([max(self.filled, count), *shape], dtype=batch.dtype)
            self.tensor = paddle.concat([self.tensor[:self.filled], more])
        self.tensor[self.filled:self.filled + count] = batch
        self.filled += count

    def rows(self):
        """The rows appended so far (a view of the tensor)."""
        return self.tensor[:self.filled]


def extract_features(model, loader, gather=True, features_of=None, normalize=True):
    """L2-normalised ``model.extract_features`` of every image in ``loader``, with labels.

    ``normalize=False`` keeps the pooled features as they are (a linear probe standardises
    them itself).

    Runs in eval mode without gradients (the model gets its mode back), through
    ``features_of`` (images -> ``[B, C]``) when given: a :func:`feature_function`, or e.g.
    SwAV's neck embeddings. With ``gather`` the result holds every rank's share, otherwise
    only this rank's.

    Returns:
        ``(features [N, C] float32, labels [N] int64)``.
    """
    try:
        batches = len(loader)
    except TypeError:  # an iterable without a length
        batches = None
    features, labels = RowBuffer(batches), RowBuffer(batches)
    was_training = model.training
    model.eval()
    try:
        features_of = features_of or model.extract_features
        with paddle.no_grad():
            for images, batch_labels in loader:
                pooled = features_of(images).astype("float32")
                features.append(F.normalize(pooled, axis=1) if normalize else pooled)
                labels.append(batch_labels.reshape([-1]).astype("int64"))
    finally:
        if was_training:
            model.train()
    if not features.filled:
        raise UserError("kNN: a loader yielded no images; check its dataset root/size")
    features, labels = features.rows(), labels.rows()
    if gather:
        features, labels = gather_rows(features), gather_rows(labels)
    return features, labels


def knn_votes(queries, bank, bank_labels, num_classes, k=20, temperature=0.07):
    """Summed ``exp(sim / temperature)`` votes per class for each query: ``[Q, num_classes]``.

    ``queries`` and ``bank`` are L2-normalised, so their dot product is the cosine similarity.
    """
    k = min(k, bank.shape[0])
    similarity = paddle.matmul(queries, bank, transpose_y=True)        # [Q, N]
    top_similarity, top_index = paddle.topk(similarity, k=k, axis=1)   # [Q, k]
    neighbour_labels = paddle.gather(bank_labels, top_index.reshape([-1])).reshape(top_index.shape)
    weights = paddle.exp(top_similarity / temperature)
    one_hot = F.one_hot(neighbour_labels, num_classes)                 # [Q, k, C]
    return (one_hot * weights.unsqueeze(-1)).sum(axis=1)


def check_knn_parameters(k, temperature):
    """One line for a k or temperature the vote cannot use (checked before any extraction)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or not temperature > 0:
        raise UserError(f"kNN: k must be a positive integer and temperature a positive number, "
                        f"got k={k!r}, temperature={temperature!r}")


def knn_accuracy(bank, bank_labels, queries, query_labels, k=20, temperature=0.07, ks=(1, 5),
                 num_classes=None):
    """Top-k accuracies (percent) of the weighted kNN vote of L2-normalised ``queries`` against
    the L2-normalised ``bank``: ``{'top1': ..., 'top5': ..., 'count': queries}``.

    ``num_classes`` defaults to the largest bank label + 1. Queries are scored in chunks of
    at most :data:`QUERY_CHUNK`, fewer for a large bank, so that the similarity matrix stays
    within :data:`SIMILARITY_ENTRIES`.
    """
    check_knn_parameters(k, temperature)
    if int(bank_labels.min()) < 0:
        raise UserError("kNN needs labelled train images, but the train loader yields label -1 "
                        "(unlabelled); use a dataset with class labels for the memory bank")
    num_classes = num_classes or int(bank_labels.max()) + 1
    evaluator = TopKEvaluator(ks)
    with paddle.no_grad():
        per_chunk = max(1, min(QUERY_CHUNK, SIMILARITY_ENTRIES // bank.shape[0]))
        for start in range(0, queries.shape[0], per_chunk):
            chunk = slice(start, start + per_chunk)
            votes = knn_votes(queries[chunk], bank, bank_labels, num_classes, k, temperature)
            evaluator.update(votes, query_labels[chunk])
    return evaluator.result()


def knn_evaluate(model, train_loader, val_loader, k=20, temperature=0.07, ks=(1, 5),
                 engine="dygraph"):
    """kNN accuracy (percent) of ``model``'s features: train set as bank, val set as queries.

    Every rank holds the whole bank (gathered) and scores its own queries; the hits are summed
    over ranks. ``engine`` computes the features (:func:`feature_function`).
    Returns ``{'knn_top1': float, 'knn_top5': float, 'count': queries}``.
    """
    check_knn_parameters(k, temperature)
    features_of = feature_function(model, engine)
    bank, bank_labels = extract_features(model, train_loader, gather=True, features_of=features_of)
    queries, query_labels = extract_features(model, val_loader, gather=False,
                                             features_of=features_of)
    result = knn_accuracy(bank, bank_labels, queries, query_labels, k, temperature, ks)
    return {("knn_" + key if key.startswith("top") else key): value for key, value in result.items()}
