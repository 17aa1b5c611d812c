"""Float64 NumPy SwAV written from the paper's algorithm, to check passl against.

Kept independent of passl: sample-major layout, explicit scaling vectors, and
the loss gradient derived by hand (codes are constants).
"""
import numpy as np


def sinkhorn(scores, epsilon, iterations):
    """Codes ``[B, K]`` for scores ``[B, K]`` (all samples of the batch, one process)."""
    scores = np.asarray(scores, dtype=np.float64)
    B, K = scores.shape
    kernel = np.exp((scores - scores.max()) / epsilon)
    kernel /= kernel.sum()
    prototype_scale = np.ones(K)
    sample_scale = np.ones(B)
    for _ in range(iterations):
        current = kernel * sample_scale[:, None] * prototype_scale[None, :]
        prototype_scale /= K * current.sum(axis=0)  # each prototype gets 1/K of the mass
        current = kernel * sample_scale[:, None] * prototype_scale[None, :]
        sample_scale /= B * current.sum(axis=1)  # each sample gets 1/B of the mass
    return B * kernel * sample_scale[:, None] * prototype_scale[None, :]


def log_softmax(x):
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def swav_loss_and_grad(scores, nmb_crops, crops_for_assign, temperature, epsilon, iterations,
                       queue_scores=None):
    """The SwAV loss and its gradient w.r.t. ``scores`` (crop-major ``[V*B, K]``)."""
    scores = np.asarray(scores, dtype=np.float64)
    num_crops = sum(nmb_crops)
    B = scores.shape[0] // num_crops
    crops = [scores[v * B:(v + 1) * B] for v in range(num_crops)]
    log_probs = [log_softmax(c / temperature) for c in crops]
    probs = [np.exp(lp) for lp in log_probs]
    weight = 1.0 / ((num_crops - 1) * len(crops_for_assign))
    loss = 0.0
    grad = np.zeros_like(scores)
    for i, crop_id in enumerate(crops_for_assign):
        assigned = crops[crop_id]
        if queue_scores is not None:
            assigned = np.concatenate([np.asarray(queue_scores[i], np.float64), assigned])
        codes = sinkhorn(assigned, epsilon, iterations)[-B:]
        for v in range(num_crops):
            if v == crop_id:
                continue
            loss -= weight * np.mean(np.sum(codes * log_probs[v], axis=1))
            # d/ds of -mean_b sum_k q log softmax(s/T) = (p * sum_k q - q) / (B T)
            grad[v * B:(v + 1) * B] += weight * (probs[v] * codes.sum(1, keepdims=True) - codes) \
                / (B * temperature)
    return loss, grad


def normalize(x, axis):
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def normalize_backward(x, grad_out, axis):
    """Gradient through ``normalize(x, axis)``: (g - n <n, g>) / |x|."""
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    n = x / norm
    return (grad_out - n * np.sum(n * grad_out, axis=axis, keepdims=True)) / norm
