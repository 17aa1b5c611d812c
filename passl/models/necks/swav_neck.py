"""SwAV's projection head: an MLP from backbone features to L2-normalised embeddings."""
import math

import paddle.nn as nn
import paddle.nn.functional as F

from passl.models.registry import NECKS


def reference_linear(in_dim, out_dim, bias=True):
    """A Linear layer initialised as PyTorch's default, which the SwAV reference trains with.

    Weight and bias uniform in +-1/sqrt(in_dim) (Paddle's default is Xavier for
    the weight and zero for the bias).
    """
    bound = 1.0 / math.sqrt(in_dim)
    init = nn.initializer.Uniform(-bound, bound)
    return nn.Linear(in_dim, out_dim, weight_attr=init, bias_attr=init if bias else False)


@NECKS.register()
class SwAVNeck(nn.Layer):
    """Linear -> BatchNorm1D -> ReLU -> Linear, then L2 normalisation of each row.

    Config keys (``model.neck``): ``in_dim`` (backbone ``out_channels``, 2048 for
    ResNet-50), ``hidden_dim`` (2048 in the paper; 0 means one Linear in -> out),
    ``out_dim`` (embedding size, 128), ``batch_norm`` (False drops the BatchNorm1D, as the
    published RN50-w5 was trained: facebookresearch/swav issue #35).
    """

    def __init__(self, in_dim, hidden_dim=2048, out_dim=128, batch_norm=True):
        super().__init__()
        if hidden_dim:
            self.mlp = nn.Sequential(
                reference_linear(in_dim, hidden_dim),
                *([nn.BatchNorm1D(hidden_dim)] if batch_norm else []),
                nn.ReLU(),
                reference_linear(hidden_dim, out_dim),
            )
        else:
            self.mlp = reference_linear(in_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, features):
        """``[N, in_dim]`` features -> ``[N, out_dim]`` unit-length embeddings."""
        embeddings = self.mlp(features)
        # float32 under AMP: in float16 the squared norms overflow above 256 and epsilon is 0
        return F.normalize(embeddings.astype("float32"), p=2, axis=1, epsilon=1e-12)
