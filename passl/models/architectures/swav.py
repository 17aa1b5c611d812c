"""SwAV: multi-crop forward through backbone, projection neck and prototypes, then the loss."""
import itertools

import paddle
import paddle.nn as nn

from passl.errors import ConfigError
from passl.models.backbones.resnet import backbone_from_passl_v1, resnet_from_torch
from passl.models.registry import BACKBONES, HEADS, LOSSES, MODELS, NECKS
from passl.models.torch_names import LEAF, rename, rename_exact


def resolution_groups(crops):
    """Consecutive runs of crops with equal spatial size, as lists (2x224 + 6x96 -> 2 groups)."""
    return [list(group) for _, group in itertools.groupby(crops, key=lambda c: tuple(c.shape[2:]))]


def prototypes_used(scores):
    """Share of the K prototypes that are the top score of at least one row (no gradient).

    Near 1/K when the assignments collapse onto one prototype; a health signal.
    """
    with paddle.no_grad():
        winners = scores.argmax(axis=1)
        used = paddle.zeros([scores.shape[1]], dtype="float32")
        used = paddle.scatter(used, winners, paddle.ones_like(winners, dtype="float32"))
        return used.mean()


def checked_crops(crops, nmb_crops):
    """The batch's crops as a list, checked against the loss's ``nmb_crops``."""
    if isinstance(crops, paddle.Tensor):
        crops = [crops]
    expected = sum(nmb_crops)
    if len(crops) != expected:
        raise ConfigError(f"the batch has {len(crops)} crops per image but "
                          f"model.loss.nmb_crops {nmb_crops} expects {expected}; "
                          f"make the MultiCrop transform's nmb_crops and model.loss.nmb_crops "
                          f"agree")
    return crops


class MultiCropModel(nn.Layer):
    """What SwAV and DeepCluster-v2 share: a backbone, a projection neck, a prototype head and
    a loss, each built from its config block, and the multi-crop forward to embeddings."""

    def __init__(self, backbone, neck, head, loss):
        super().__init__()
        self.backbone = BACKBONES.build(backbone)
        self.neck = NECKS.build(neck)
        self.head = HEADS.build(head)
        self.loss = LOSSES.build(loss)

    def embed(self, crops):
        """``[sum(crops) * B, D]`` crop-major embeddings: one backbone call per resolution
        (as the reference's multi-resolution forward), then the neck on all crops at once."""
        features = [self.backbone(paddle.concat(group)) for group in resolution_groups(crops)]
        features = features[0] if len(features) == 1 else paddle.concat(features)
        return self.neck(features)


@MODELS.register()
class SwAV(MultiCropModel):
    """Swapping Assignments between Views (Caron et al. 2020).

    Config keys (``model``): ``backbone``, ``neck``, ``head``, ``loss``: blocks
    built through the BACKBONES, NECKS, HEADS and LOSSES registries (typically
    ResNet, SwAVNeck, SwAVPrototypes, SwAVLoss).

    ``forward((crops, labels))`` takes the crops of one batch (a list of
    ``[B, 3, H, W]`` Tensors, crops of equal size consecutive, as MultiCrop
    yields them) and returns ``{'loss', 'logs'}``. In training mode the
    prototypes are L2-normalised first, as the reference does before every step.
    """

    def forward(self, batch):
        crops = checked_crops(batch[0], self.loss.nmb_crops)
        if self.training:
            self.head.normalize_prototypes()
        batch_size = crops[0].shape[0]
        embeddings = self.embed(crops)
        scores_per_head = self.head(embeddings)
        queue_in_use = self.loss.queue is not None and self.loss.queue.in_use()
        loss = self.loss(embeddings, scores_per_head, self.head.prototype_weights(), batch_size)
        logs = {
            # share of prototypes that win at least one crop of this rank's batch (first head)
            "prototypes_used": prototypes_used(scores_per_head[0]),
            "queue_in_use": float(queue_in_use),
        }
        return {"loss": loss, "logs": logs}

    @paddle.no_grad()
    def extract_features(self, images):
        """Pooled backbone features ``[B, C]`` (for kNN and linear evaluation)."""
        return self.backbone(images)


# ---------------------------------------------------------------- PyTorch weights
# facebookresearch/swav publishes the state dict of src/resnet50.py's ResNet as trained by
# main_swav.py inside DistributedDataParallel (every name starts with "module."; hubconf.py
# strips it), saved with PyTorch 1.4 (legacy format):
#   the trunk (see passl/models/backbones/resnet.py; no avgpool/padding tensors)
#   projection_head.0.{weight [hidden_mlp, 2048w], bias}      Linear   -> neck.mlp.0
#   projection_head.1.{weight, bias, running_mean, running_var} BatchNorm1d -> neck.mlp.1
#   projection_head.3.{weight [feat_dim, hidden_mlp], bias}    Linear   -> neck.mlp.3
#     (hidden_mlp 0: one Linear projection_head.{weight, bias}  -> neck.mlp; RN50-w5 was
#     trained without the BatchNorm1d (swav issue #35): Linear .0, ReLU, Linear .2 -> neck.mlp.2
#     with SwAVNeck batch_norm: false)
#   prototypes.weight [nmb_prototypes, feat_dim]               no bias  -> head.heads.0
#     (a list of nmb_prototypes: MultiPrototypes, prototypes.prototypes{N}.weight -> head.heads.N)
# Published values: hidden_mlp 2048 (RN50), 8192 (RN50-w2/w4, scripts/swav_RN50w*_400ep_
# pretrain.sh), feat_dim 128, nmb_prototypes 3000.
SWAV_HEAD_NAMES = (
    (r"projection_head\.([0-3])\." + LEAF, r"neck.mlp.\1.\2"),
    (r"projection_head\.(weight|bias)", r"neck.mlp.\1"),
    (r"prototypes\.weight", "head.heads.0.weight"),
    (r"prototypes\.prototypes(\d+)\.weight", r"head.heads.\1.weight"),
)


def swav_from_torch(name):
    """Our SwAV name for the tensor ``name`` of the reference's SwAV model, else None."""
    trunk = resnet_from_torch(name)
    if trunk:
        return "backbone." + trunk
    return next(filter(None, (rename(p, r, name) for p, r in SWAV_HEAD_NAMES)), None)


# ---------------------------------------------------------------- PASSL v1 weights
# PASSL v1 (PaddlePaddle/PASSL 1.x, passl/modeling/architectures/swav.py) saves SwAV's
# state dict in Paddle's own layouts, so only names change (no transposition):
#   backbone.*  ResNetswav, paddle.vision's names (passl/models/backbones/resnet.py)
#   neck.projection_neck.{0,3}.{weight [in, out], bias}   Linear    -> neck.mlp.{0,3}
#   neck.projection_neck.1.{weight, bias, _mean, _variance} BatchNorm1D -> neck.mlp.1
#     (hid_channels 0: one Linear neck.projection_neck.{weight, bias} -> neck.mlp)
#   head.prototypes.weight [feat_dim, K]    SwAVHead's bias-free Linear -> head.heads.0
#     (a list of num_prototypes: MultiPrototypes, head.prototypes.prototypes{N}.weight
#     -> head.heads.N)
# SwAVHead keeps no queue tensor in the state dict (its queue is never created in v1).
SWAV_V1_HEAD_NAMES = (
    (r"neck\.projection_neck\.([0-3])\.(weight|bias|_mean|_variance)", r"neck.mlp.\1.\2"),
    (r"neck\.projection_neck\.(weight|bias)", r"neck.mlp.\1"),
    (r"head\.prototypes\.weight", "head.heads.0.weight"),
    (r"head\.prototypes\.prototypes(\d+)\.weight", r"head.heads.\1.weight"),
)


def swav_from_passl_v1(name):
    """Our SwAV name for the tensor ``name`` of a PASSL v1 SwAV model, else None."""
    return backbone_from_passl_v1(name) or next(
        filter(None, (rename_exact(p, r, name) for p, r in SWAV_V1_HEAD_NAMES)), None)
