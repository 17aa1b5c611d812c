"""DeepCluster-v2: multi-crop embeddings scored by prototypes set to k-means centroids."""
import paddle

from passl.errors import ConfigError
from passl.models.architectures.swav import MultiCropModel, checked_crops, prototypes_used
from passl.models.registry import MODELS


@MODELS.register()
class DeepClusterV2(MultiCropModel):
    """DeepCluster-v2 (Caron et al. 2020, appendix; facebookresearch/swav
    ``main_deepclusterv2.py``): SwAV's network, with targets from k-means instead of
    Sinkhorn.

    Config keys (``model``): ``backbone``, ``neck``, ``head``, ``loss``: blocks built
    through the registries (typically ResNet, SwAVNeck, SwAVPrototypes with a list of K
    such as ``[3000, 3000, 3000]``, DeepClusterV2Loss).

    ``forward((crops, labels, indices))`` needs each image's dataset index (the trainer
    asks the loader for it because ``needs_sample_indices`` is true). It returns
    ``{'loss', 'logs', 'bank_embeddings', 'indices'}``: ``bank_embeddings`` are the
    detached ``[len(crops_for_assign), B, D]`` embeddings of the assignment crops, which
    :class:`~passl.engine.hooks.deepclusterv2_hook.DeepClusterV2Hook` writes into its
    memory bank after the step. Unlike SwAV the prototypes are not normalised here: the
    hook sets them to the (unit) centroids at the start of each epoch.
    """

    needs_sample_indices = True

    def forward(self, batch):
        if len(batch) < 3:
            raise ConfigError("DeepClusterV2 needs each image's dataset index in the batch; "
                              "build its loaders through the trainer (passl.data.build_dataloader"
                              "(..., with_indices=True))")
        crops, _, indices = batch
        crops = checked_crops(crops, self.loss.nmb_crops)
        batch_size = crops[0].shape[0]
        embeddings = self.embed(crops)
        scores_per_head = self.head(embeddings)
        loss = self.loss(scores_per_head, indices)
        kept = embeddings.detach().reshape([-1, batch_size, embeddings.shape[1]])
        bank_embeddings = paddle.gather(kept, paddle.to_tensor(self.loss.crops_for_assign))
        # share of prototypes that win at least one crop of this rank's batch (first head)
        logs = {"prototypes_used": prototypes_used(scores_per_head[0])}
        return {"loss": loss, "logs": logs, "bank_embeddings": bank_embeddings,
                "indices": indices}

    @paddle.no_grad()
    def extract_features(self, images):
        """Pooled backbone features ``[B, C]`` (for kNN and linear evaluation)."""
        return self.backbone(images)

