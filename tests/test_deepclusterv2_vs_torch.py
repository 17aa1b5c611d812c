"""Our DeepCluster-v2 k-means (after each iteration), gathered assignments, loss and
gradients against the reference's computation in PyTorch float32
(tests/torch_deepclusterv2_reference.py, run by a Python that has torch).

torch is not a project dependency: set TORCH_PYTHON to an interpreter that has it (by
default this test's own Python is tried); without one the test is skipped.
"""
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

from passl.models.losses.deepclusterv2 import (cluster_banks, deepclusterv2_loss,
                                               initial_centroid_indices, spherical_kmeans)

HERE = os.path.dirname(os.path.abspath(__file__))
TORCH_PYTHON = os.environ.get("TORCH_PYTHON", sys.executable)


def has_torch(python):
    try:
        return subprocess.run([python, "-c", "import torch"], capture_output=True,
                              timeout=120).returncode == 0
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not has_torch(TORCH_PYTHON),
                                reason="no Python with torch (set TORCH_PYTHON): "
                                       "cross-framework check skipped")
SIZES = [30, 20, 25]
ITERATIONS = 10


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(15, 32))
    x = centres[rng.integers(15, size=(2, 400))] + 0.6 * rng.normal(size=(2, 400, 32))
    banks = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    indices = rng.permutation(450)[:400]
    batch = 16
    scores = {f"scores{h}": rng.uniform(-1, 1, size=(6 * batch, k)).astype(np.float32)
              for h, k in enumerate(SIZES)}
    batch_assignments = np.stack([rng.integers(k, size=batch) for k in SIZES])
    batch_assignments[:, :3] = -1
    data = dict(banks=banks, indices=indices, sizes=np.array(SIZES), dataset_size=450,
                iterations=ITERATIONS, temperature=0.1, batch_assignments=batch_assignments,
                **scores, **{f"starts{h}": initial_centroid_indices(1, 0, h, 400, k)
                             for h, k in enumerate(SIZES)})
    tmp = tmp_path_factory.mktemp("dcv2_torch")
    np.savez(tmp / "in.npz", **data)
    run = subprocess.run([TORCH_PYTHON, os.path.join(HERE, "torch_deepclusterv2_reference.py"),
                          str(tmp / "in.npz"), str(tmp / "out.npz")], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return data, dict(np.load(tmp / "out.npz"))


def test_kmeans_after_every_iteration_matches_pytorch(case):
    data, torch_out = case
    for h in range(len(SIZES)):
        bank = paddle.to_tensor(data["banks"][h % 2])
        for iterations in range(ITERATIONS + 1):
            centroids, local = spherical_kmeans(bank, data[f"starts{h}"], iterations)
            np.testing.assert_array_equal(local.numpy(), torch_out[f"local{h}_{iterations}"])
            np.testing.assert_allclose(centroids.numpy(), torch_out[f"centroids{h}_{iterations}"],
                                       rtol=0, atol=2e-6)


def test_gathered_assignments_match_pytorch(case):
    data, torch_out = case
    starts = [data[f"starts{h}"] for h in range(len(SIZES))]
    _, table = cluster_banks(paddle.to_tensor(data["banks"]), paddle.to_tensor(data["indices"]),
                             SIZES, 450, ITERATIONS, starts)
    expected = torch_out["assignments"]
    np.testing.assert_array_equal(table, np.where(expected == -100, -1, expected))


def test_loss_and_gradients_match_pytorch(case):
    data, torch_out = case
    scores = [paddle.to_tensor(data[f"scores{h}"], stop_gradient=False) for h in range(len(SIZES))]
    loss = deepclusterv2_loss(scores, data["batch_assignments"], 0.1)
    loss.backward()
    np.testing.assert_allclose(float(loss), float(torch_out["loss"]), rtol=1e-6)
    for h, s in enumerate(scores):
        np.testing.assert_allclose(s.grad.numpy(), torch_out[f"grad{h}"], rtol=1e-5, atol=1e-8)
