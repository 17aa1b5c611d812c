"""SwAV's swapped-prediction loss and the Sinkhorn-Knopp codes it predicts.

Follows Caron et al., "Unsupervised Learning of Visual Features by Contrasting
Cluster Assignments" (NeurIPS 2020) and facebookresearch/swav ``main_swav.py``.
Notation as in the paper: B samples, K prototypes, codes Q.

Layout: ``scores`` are ``[sum(nmb_crops) * B, K]`` and crop-major, i.e. rows
``v*B:(v+1)*B`` are crop ``v`` of the B images of this rank. Every collective
goes through :mod:`passl.distributed`, so in one process the same code runs
with the collectives as no-ops.
"""
import paddle
import paddle.nn as nn

from passl import distributed
from passl.errors import ConfigError
from passl.models.losses.crops import checked_crop_config
from passl.models.registry import LOSSES

# Sinkhorn and the cross-entropies are computed in float64 and returned as
# float32, so the results equal the reference's to float32 rounding:
# * exp(scores/eps) spans e^(2/eps) for cosine scores in [-1, 1], which float32
#   cannot hold below eps ~ 0.01 (a sample's whole column underflows, then 0/0);
# * Paddle's CPU reductions along an axis accumulate sequentially: a float32
#   sum over K = 3000 prototypes is off by ~1e-4 (PyTorch sums pairwise).
# The tensors are [B_local, K] and [crops, B_local, K]: cheap next to the backbone.
PRECISION = "float64"


@paddle.no_grad()
def distributed_sinkhorn(scores, epsilon, iterations):
    """Equal-partition soft codes for the rows of ``scores``, across all ranks.

    Args:
        scores: ``[B_local, K]`` Tensor (any float dtype) of sample-prototype
            scores of this rank; the ranks' rows together form the batch.
        epsilon: entropy regularisation; smaller is closer to hard assignments.
        iterations: Sinkhorn-Knopp iterations (3 in the paper).

    Returns:
        ``[B_local, K]`` float32 codes without gradient; each row sums to 1 and,
        over all ranks, each prototype receives B/K of the mass. Each rank's
        rows equal the corresponding rows of the one-process result on the
        concatenated batch.
    """
    logits = scores.detach().astype(PRECISION) / epsilon
    # Subtracting one constant from every entry is exact (the first
    # normalisation divides it out) and keeps exp() from overflowing; it must
    # be the global max: a per-sample shift would change the result.
    global_max = distributed.all_reduce(logits.max(), op="max")
    Q = paddle.exp(logits - global_max).t()  # K x B, as in the paper
    K = Q.shape[0]
    B = Q.shape[1] * distributed.get_world_size()  # samples over all ranks

    Q = Q / distributed.all_reduce(Q.sum())  # the whole matrix sums to 1
    for _ in range(iterations):
        # every prototype (row) receives a total mass of 1/K
        Q = Q / distributed.all_reduce(Q.sum(axis=1, keepdim=True))
        Q = Q / K
        # every sample (column) has a total mass of 1/B; columns are rank-local
        Q = Q / Q.sum(axis=0, keepdim=True)
        Q = Q / B
    Q = Q * B  # columns sum to 1: a soft assignment per sample
    return Q.t().astype("float32")


def swav_loss(scores, nmb_crops, crops_for_assign, temperature, epsilon,
              sinkhorn_iterations, queue_scores=None):
    """The swapped prediction loss of one prototype head.

    For each assignment crop ``i``, codes ``q_i`` come from Sinkhorn on that
    crop's scores (with the queued scores prepended when given; only the last
    B rows, this batch, are used); every other crop ``v`` predicts them with
    ``softmax(scores_v / temperature)``. The cross-entropies are averaged over
    the ``sum(nmb_crops) - 1`` predicting crops, then over assignment crops.

    Args:
        scores: ``[sum(nmb_crops) * B, K]`` crop-major scores (embeddings @
            prototypes) of this rank.
        nmb_crops: crops per resolution, e.g. ``[2, 6]``.
        crops_for_assign: indices of the crops whose codes are predicted.
        temperature: softmax temperature tau.
        epsilon, sinkhorn_iterations: see :func:`distributed_sinkhorn`.
        queue_scores: None, or one ``[L, K]`` Tensor per entry of
            ``crops_for_assign``: scores of queued embeddings under the current
            prototypes.

    Returns:
        Scalar float32 Tensor; its gradient flows into ``scores`` only through
        the predictions (the codes are constants).
    """
    num_crops = sum(nmb_crops)
    if scores.shape[0] % num_crops:
        raise ValueError(f"swav_loss: {scores.shape[0]} score rows are not a multiple of "
                         f"sum(nmb_crops) = {num_crops}")
    batch_size = scores.shape[0] // num_crops
    with paddle.amp.auto_cast(enable=False):
        scores = scores.astype(PRECISION)
        logits = scores / temperature
        # = paddle.nn.functional.log_softmax(logits, axis=1), whose CPU kernel is ~70x
        # slower (forward + backward of [64, 3000] float64: 240 ms vs 3.5 ms)
        log_probs = logits - paddle.logsumexp(logits, axis=1, keepdim=True)
        log_probs = log_probs.reshape([num_crops, batch_size, -1])  # crop-major
        loss = 0.0
        for i, crop_id in enumerate(crops_for_assign):
            own_scores = scores[batch_size * crop_id:batch_size * (crop_id + 1)]
            if queue_scores is not None:
                own_scores = paddle.concat([queue_scores[i].astype(PRECISION), own_scores])
            codes = distributed_sinkhorn(own_scores, epsilon, sinkhorn_iterations)[-batch_size:]
            # cross-entropy of every crop's prediction against these codes: [num_crops]
            cross_entropy = -(codes.astype(PRECISION) * log_probs).sum(axis=2).mean(axis=1)
            others = paddle.concat([cross_entropy[:crop_id], cross_entropy[crop_id + 1:]])
            loss = loss + others.mean()
        return (loss / len(crops_for_assign)).astype("float32")


@LOSSES.register()
class SwAVLoss(nn.Layer):
    """SwAV loss over one or several prototype heads, owning the embedding queue.

    Config keys (``model.loss``): ``nmb_crops`` (crops per resolution, must
    match the MultiCrop transform), ``crops_for_assign`` (default ``[0, 1]``),
    ``temperature`` (tau, 0.1), ``epsilon`` (0.05), ``sinkhorn_iterations`` (3).

    ``self.queue`` is None until :class:`~passl.engine.hooks.swav_hook.SwAVHook`
    sets a :class:`~passl.models.losses.swav_queue.SwAVQueue`; from the step
    where it is full it is prepended (scored with the current prototypes) to
    each assignment crop before Sinkhorn, and after every training step it
    receives the newest embeddings.
    """

    def __init__(self, nmb_crops, crops_for_assign=(0, 1), temperature=0.1, epsilon=0.05,
                 sinkhorn_iterations=3):
        super().__init__()
        self.nmb_crops, self.crops_for_assign = checked_crop_config(nmb_crops, crops_for_assign)
        for key, value in (("temperature", temperature), ("epsilon", epsilon)):
            if not value > 0:
                raise ConfigError(f"model.loss.{key} must be > 0, got {value!r}")
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.queue = None

    def forward(self, embeddings, scores_per_head, prototype_weights_per_head, batch_size):
        """Loss averaged over heads; pushes this batch into the queue when training.

        Args:
            embeddings: ``[sum(nmb_crops) * batch_size, D]`` L2-normalised, crop-major.
            scores_per_head: one ``[sum(nmb_crops) * batch_size, K_h]`` Tensor per head.
            prototype_weights_per_head: each head's ``[D, K_h]`` prototype matrix,
                used to score the queued embeddings.
            batch_size: images of this rank (B).
        """
        queue_in_use = self.queue is not None and self.queue.in_use()
        losses = []
        for scores, weight in zip(scores_per_head, prototype_weights_per_head):
            queue_scores = self.queue.scores(weight) if queue_in_use else None
            losses.append(swav_loss(scores, self.nmb_crops, self.crops_for_assign,
                                    self.temperature, self.epsilon, self.sinkhorn_iterations,
                                    queue_scores))
        if self.queue is not None and self.training:
            newest = [embeddings[batch_size * c:batch_size * (c + 1)]
                      for c in self.crops_for_assign]
            self.queue.push(paddle.stack(newest))
        return paddle.add_n(losses) / len(losses)
