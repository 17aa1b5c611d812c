"""Our Sinkhorn and swapped loss against the same computation in PyTorch float32, the
reference implementation's framework. Skipped unless torch is installed (it is not a
project dependency: `pip install torch==2.14.1` for this check)."""
import numpy as np
import paddle
import pytest

from passl.models.losses.swav import distributed_sinkhorn, swav_loss

torch = pytest.importorskip("torch", reason="PyTorch not installed: cross-framework check skipped")


def torch_sinkhorn(scores, epsilon, iterations):
    """facebookresearch/swav's distributed_sinkhorn in one process, in PyTorch float32."""
    Q = torch.exp(scores / epsilon).t()
    K, B = Q.shape
    Q = Q / Q.sum()
    for _ in range(iterations):
        Q = Q / Q.sum(dim=1, keepdim=True) / K
        Q = Q / Q.sum(dim=0, keepdim=True) / B
    return (Q * B).t()


def torch_swav_loss(scores, nmb_crops, crops_for_assign, temperature, epsilon, iterations, queue):
    batch = scores.shape[0] // sum(nmb_crops)
    loss = 0
    for i, crop in enumerate(crops_for_assign):
        with torch.no_grad():
            own = scores[batch * crop:batch * (crop + 1)].detach()
            if queue is not None:
                own = torch.cat((queue[i], own))
            codes = torch_sinkhorn(own, epsilon, iterations)[-batch:]
        subloss = 0
        for v in [v for v in range(sum(nmb_crops)) if v != crop]:
            log_p = torch.log_softmax(scores[batch * v:batch * (v + 1)] / temperature, dim=1)
            subloss -= torch.mean(torch.sum(codes * log_p, dim=1))
        loss += subloss / (sum(nmb_crops) - 1)
    return loss / len(crops_for_assign)


def unit_rows(rng, shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("batch, prototypes, nmb_crops, queue_rows", [
    (64, 3000, [2, 6], 0), (32, 300, [2, 6], 128), (16, 30, [2], 64)])
@pytest.mark.parametrize("epsilon", [0.05, 0.03])
def test_matches_pytorch_float32(batch, prototypes, nmb_crops, queue_rows, epsilon):
    rng = np.random.default_rng(batch)
    weights = unit_rows(rng, (prototypes, 128)).T
    scores = (unit_rows(rng, (sum(nmb_crops) * batch, 128)) @ weights).astype(np.float32)
    queue = None
    if queue_rows:
        queue = [(unit_rows(rng, (queue_rows, 128)) @ weights).astype(np.float32) for _ in range(2)]

    codes = distributed_sinkhorn(paddle.to_tensor(scores[:batch]), epsilon, 3).numpy()
    expected_codes = torch_sinkhorn(torch.tensor(scores[:batch]), epsilon, 3).numpy()
    assert np.abs(codes - expected_codes).max() <= 1e-6

    ours = paddle.to_tensor(scores, stop_gradient=False)
    loss = swav_loss(ours, nmb_crops, [0, 1], 0.1, epsilon, 3,
                     None if queue is None else [paddle.to_tensor(q) for q in queue])
    loss.backward()
    theirs = torch.tensor(scores, requires_grad=True)
    expected = torch_swav_loss(theirs, nmb_crops, [0, 1], 0.1, epsilon, 3,
                               None if queue is None else [torch.tensor(q) for q in queue])
    expected.backward()
    assert abs(float(loss) - float(expected.detach())) <= 1e-5
    grad, expected_grad = ours.grad.numpy(), theirs.grad.numpy()
    assert np.abs(grad - expected_grad).max() <= 1e-5 * np.abs(expected_grad).max()
