"""DeepCluster-v2's clustering and loss in PyTorch float32, as facebookresearch/swav's
main_deepclusterv2.py computes them (cluster_memory in one process; the loss of train()).

Run with a Python that has torch (not a project dependency):
``python torch_deepclusterv2_reference.py IN.npz OUT.npz``. IN holds ``banks [A, N, D]``,
``indices [N]``, ``sizes [H]``, ``dataset_size``, ``iterations``, ``starts{h}``, ``scores{h}``,
``batch_assignments [H, B]`` (-1: unseen) and ``temperature``; OUT the centroids after every
iteration count, the gathered assignments, the loss and its gradients.
"""
import sys

import numpy as np
import torch
import torch.nn as nn


def kmeans(bank, start, iterations):
    centroids = bank[torch.as_tensor(start)]
    K = centroids.shape[0]
    for n_iter in range(iterations + 1):
        _, local_assignments = torch.mm(bank, centroids.t()).max(dim=1)
        if n_iter == iterations:
            break
        counts = torch.zeros(K).int()
        emb_sums = torch.zeros(K, bank.shape[1])
        for k in range(K):
            rows = (local_assignments == k).nonzero().flatten()
            if len(rows) > 0:
                emb_sums[k] = torch.sum(bank[rows], dim=0)
                counts[k] = len(rows)
        mask = counts > 0
        centroids[mask] = emb_sums[mask] / counts[mask].unsqueeze(1)
        centroids = nn.functional.normalize(centroids, dim=1, p=2)
    return centroids, local_assignments


def main(source, target):
    data = np.load(source)
    banks = torch.as_tensor(data["banks"])
    indices = torch.as_tensor(data["indices"])
    sizes = [int(k) for k in data["sizes"]]
    out = {}
    assignments = -100 * torch.ones(len(sizes), int(data["dataset_size"])).long()
    j = 0
    for h in range(len(sizes)):
        for iterations in range(int(data["iterations"]) + 1):
            centroids, local = kmeans(banks[j], data[f"starts{h}"], iterations)
            out[f"centroids{h}_{iterations}"] = centroids.numpy()
            out[f"local{h}_{iterations}"] = local.numpy()
        assignments[h][indices] = local
        j = (j + 1) % banks.shape[0]
    out["assignments"] = assignments.numpy()

    cross_entropy = nn.CrossEntropyLoss(ignore_index=-100)
    targets_all = torch.as_tensor(data["batch_assignments"]).clone()
    targets_all[targets_all == -1] = -100
    scores = [torch.tensor(data[f"scores{h}"], requires_grad=True) for h in range(len(sizes))]
    loss = 0
    for h in range(len(sizes)):
        crops = scores[h].shape[0] // targets_all.shape[1]
        loss += cross_entropy(scores[h] / float(data["temperature"]), targets_all[h].repeat(crops))
    loss /= len(sizes)
    loss.backward()
    out["loss"] = loss.detach().numpy()
    for h, s in enumerate(scores):
        out[f"grad{h}"] = s.grad.numpy()
    np.savez(target, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
