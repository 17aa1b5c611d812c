"""SwAV's prototypes: trainable cluster centres scored against the embeddings."""
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from passl.models.registry import HEADS


@HEADS.register()
class SwAVPrototypes(nn.Layer):
    """One bias-free Linear ``in_dim -> K`` per entry of ``num_prototypes``.

    Config keys (``model.head``): ``in_dim`` (the neck's ``out_dim``, 128) and
    ``num_prototypes`` (K, 3000; a list such as ``[3000, 3000]`` builds several
    heads whose losses are averaged).

    ``paddle.nn.Linear.weight`` is ``[in_dim, K]``: each prototype is a column,
    so prototypes are normalised along axis 0 (PyTorch's ``[K, in]`` layout
    normalises along dim 1).
    """

    def __init__(self, in_dim=128, num_prototypes=3000):
        super().__init__()
        sizes = [num_prototypes] if isinstance(num_prototypes, int) else list(num_prototypes)
        self.heads = nn.LayerList([nn.Linear(in_dim, k, bias_attr=False) for k in sizes])

    def forward(self, embeddings):
        """``[N, in_dim]`` -> a list of ``[N, K]`` score Tensors, one per head (even for one)."""
        return [head(embeddings) for head in self.heads]

    def prototype_weights(self):
        """Each head's ``[in_dim, K]`` prototype matrix."""
        return [head.weight for head in self.heads]

    @paddle.no_grad()
    def normalize_prototypes(self):
        """Scale every prototype (column, see class doc) to unit L2 norm, in place; idempotent."""
        for head in self.heads:
            head.weight.set_value(F.normalize(head.weight, p=2, axis=0, epsilon=1e-12))
