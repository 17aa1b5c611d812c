"""Top-k accuracy, for one batch and accumulated over a whole (distributed) val set.

Accuracies are percentages (0-100), the unit the SwAV paper and our metrics.jsonl use.
"""
import paddle

from passl import distributed


def topk_correct(logits, labels, ks=(1, 5)):
    """Number of samples whose label is among the ``k`` highest logits, for each ``k``.

    Args:
        logits: ``[B, C]`` scores (any monotone score works: logits, probabilities, votes).
        labels: ``[B]`` integer class ids.
        ks: the ``k`` values; a ``k`` larger than ``C`` counts every sample as correct.

    Returns:
        ``{k: int64 scalar Tensor}``.
    """
    num_classes = logits.shape[-1]
    largest_k = min(max(ks), num_classes)
    _, top_indices = paddle.topk(logits, k=largest_k, axis=-1)
    hits = paddle.equal(top_indices, labels.reshape([-1, 1]).astype(top_indices.dtype))
    # hits[b, j] is True when the label is the j-th best guess, so the cumulative sum over
    # j says whether it is within the first j+1 guesses.
    within = paddle.cumsum(hits.astype("int64"), axis=-1)
    return {k: within[:, min(k, num_classes) - 1].sum() for k in ks}


def topk_accuracy(logits, labels, ks=(1, 5)):
    """Top-k accuracy in percent of one batch: ``{'top1': Tensor, 'top5': Tensor, ...}``.

    The values are float64 scalar tensors on the logits' device: converting them to Python
    numbers would wait for the GPU every training step; ``LoggerHook`` sums them there and
    reads them once per record.
    """
    count = max(int(labels.shape[0]), 1)  # a shape: known on the host
    correct = topk_correct(logits, labels, ks)
    return {f"top{k}": correct[k].astype("float64") * (100.0 / count) for k in ks}


class TopKEvaluator:
    """Accumulates top-k hits over batches; :meth:`result` sums them over all ranks.

    Each rank updates with its own share of the val set; the result is the accuracy over
    the union of all shares (a sampler that pads the last batch with repeated samples
    counts those repeats too). The hits are summed on the device and read once, in
    :meth:`result`, not per batch.
    """

    def __init__(self, ks=(1, 5)):
        self.ks = tuple(ks)
        self.reset()

    def reset(self):
        self._correct = None  # hits per k: a tensor on the device of the first batch
        self._count = 0

    def update(self, logits, labels):
        hits = topk_correct(logits, labels, self.ks)
        hits = paddle.stack([hits[k] for k in self.ks])
        self._correct = hits if self._correct is None else self._correct + hits
        self._count += int(labels.shape[0])

    def result(self):
        """``{'top1': percent, 'top5': percent, 'count': samples}`` over every rank."""
        correct = paddle.zeros([len(self.ks)], dtype="int64") if self._correct is None \
            else self._correct
        totals = paddle.concat([correct, paddle.to_tensor([self._count], dtype="int64")])
        totals = distributed.all_reduce(totals, op="sum").numpy()
        count = int(totals[-1])
        result = {f"top{k}": 100.0 * int(hits) / max(count, 1) for k, hits in zip(self.ks, totals)}
        result["count"] = count
        return result
