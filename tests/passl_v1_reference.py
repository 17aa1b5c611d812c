"""PASSL v1's SwAV layers and checkpoint writer, re-expressed in today's Paddle for fixtures.

Written from PaddlePaddle/PASSL v1.1.0: passl/modeling/backbones/resnetswav.py (ResNetswav),
necks/base_neck.py (SwAVNeck), heads/swav_head.py (SwAVHead, MultiPrototypes: the layers
only; the loss is not needed to make weights), heads/clas_head.py (ClasHead),
architectures/swav.py and clas.py (SwAV, Classification), hooks/checkpoint_hook.py (save) and
tools/extract_weight.py. Names and layouts are v1's; initialisation is Paddle's default
(fixtures randomise every tensor anyway).
"""
import pickle

import numpy as np
import paddle
import paddle.nn as nn
from paddle.vision.models import ResNet
from paddle.vision.models.resnet import BasicBlock, BottleneckBlock


class ResNetswav(ResNet):
    """paddle.vision's ResNet without classifier or pool; the stem pads 1 then convolves with
    padding 2 (v1's comment: "change padding 3 -> 2 ... because added a padding layer")."""

    def __init__(self, depth, num_classes=0, with_pool=False, channels=64, blocks=None):
        block = BasicBlock if depth in [18, 34] else BottleneckBlock
        super().__init__(block, depth, num_classes=num_classes, with_pool=with_pool)
        self.padding = nn.Pad2D(padding=1, value=0.0)
        self.conv1 = nn.Conv2D(3, channels, kernel_size=7, stride=2, padding=2, bias_attr=False)
        if channels != 64 or blocks:
            # a narrower, shallower trunk for fast fixtures (not in v1), made of the same
            # layers by paddle.vision's own _make_layer, so names and blocks are v1's
            self.bn1, self.inplanes = nn.BatchNorm2D(channels), channels
            for i in range(4):
                setattr(self, f"layer{i + 1}", self._make_layer(
                    block, channels * 2 ** i, blocks or len(getattr(self, f"layer{i + 1}")),
                    stride=1 if i == 0 else 2))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.padding(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.with_pool:
            x = self.avgpool(x)
        if self.num_classes > 0:
            x = self.fc(paddle.flatten(x, 1))
        return x


def trunk_channels(depth, channels=64, blocks=None):
    """Channels of a ResNetswav's last feature map."""
    return channels * 8 * (1 if depth in [18, 34] else 4)


class SwAVNeck(nn.Layer):
    """fc-bn-relu-fc on the average-pooled maps of every resolution, then L2 normalisation."""

    def __init__(self, in_channels, hid_channels, out_channels, with_l2norm=True,
                 with_avg_pool=True):
        super().__init__()
        self.with_l2norm, self.with_avg_pool = with_l2norm, with_avg_pool
        if with_avg_pool:
            self.avgpool = nn.AdaptiveAvgPool2D((1, 1))
        if hid_channels == 0:
            self.projection_neck = nn.Linear(in_channels, out_channels)
        else:
            self.projection_neck = nn.Sequential(
                nn.Linear(in_channels, hid_channels), nn.BatchNorm1D(hid_channels), nn.ReLU(),
                nn.Linear(hid_channels, out_channels))

    def forward(self, x):
        feat_vec = paddle.concat([self.avgpool(_x) for _x in x])
        feat_vec = feat_vec.reshape([feat_vec.shape[0], -1])
        x = self.projection_neck(feat_vec)
        return nn.functional.normalize(x, axis=1, p=2) if self.with_l2norm else x


class MultiPrototypes(nn.Layer):
    def __init__(self, output_dim, num_prototypes):
        super().__init__()
        self.num_heads = len(num_prototypes)
        for i, k in enumerate(num_prototypes):
            self.add_sublayer("prototypes" + str(i), nn.Linear(output_dim, k, bias_attr=False))

    def forward(self, x):
        return [getattr(self, "prototypes" + str(i))(x) for i in range(self.num_heads)]


class SwAVHead(nn.Layer):
    """The prototypes of v1's SwAVHead (its forward computes the loss; not re-expressed)."""

    def __init__(self, feat_dim, num_prototypes=3000):
        super().__init__()
        if isinstance(num_prototypes, list):
            self.prototypes = MultiPrototypes(feat_dim, num_prototypes)
        else:
            self.prototypes = nn.Linear(feat_dim, num_prototypes, bias_attr=False)


class ClasHead(nn.Layer):
    def __init__(self, with_avg_pool=False, in_channels=2048, num_classes=1000):
        super().__init__()
        self.with_avg_pool, self.in_channels = with_avg_pool, in_channels
        if with_avg_pool:
            self.avg_pool = nn.AdaptiveAvgPool2D((1, 1))
        self.fc_cls = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        if self.with_avg_pool:
            x = self.avg_pool(x)
        return self.fc_cls(paddle.reshape(x, [-1, self.in_channels]))


class SwAV(nn.Layer):
    """v1's SwAV: backbone, neck, head (use_synch_bn only swaps BatchNorm classes; the
    tensors and their names stay the same, and SyncBatchNorm has no CPU kernel)."""

    def __init__(self, depth, hid_channels, out_channels, num_prototypes, **trunk):
        super().__init__()
        self.backbone = ResNetswav(depth, **trunk)
        in_channels = trunk_channels(depth, **trunk)
        self.neck = SwAVNeck(in_channels, hid_channels, out_channels)
        self.head = SwAVHead(out_channels, num_prototypes)

    def embeddings_and_scores(self, images):
        """One resolution's embeddings and the (first) prototypes' scores, as v1 computes
        them before its loss."""
        embeddings = self.neck([self.backbone(images)])
        scores = self.head.prototypes(embeddings)
        return embeddings, scores[0] if isinstance(scores, list) else scores


class Classification(nn.Layer):
    def __init__(self, depth, num_classes, **trunk):
        super().__init__()
        self.backbone = ResNetswav(depth, **trunk)
        in_channels = trunk_channels(depth, **trunk)
        self.head = ClasHead(with_avg_pool=True, in_channels=in_channels,
                             num_classes=num_classes)

    def forward(self, images):
        return self.head(self.backbone(images))


def randomise(layer, seed):
    """Every parameter and BatchNorm statistic random, so that a tensor loaded into the wrong
    place changes the outputs; weights scaled by their fan-in and BatchNorm near identity, so
    that a deep trunk stays finite."""
    rng = np.random.default_rng(seed)
    for name, tensor in layer.state_dict().items():
        values = rng.standard_normal(tensor.shape).astype("float32")
        if len(tensor.shape) >= 2:  # conv [out, in, k, k]; Linear [in, out]
            fan_in = tensor.shape[0] if len(tensor.shape) == 2 else np.prod(tensor.shape[1:])
            values /= np.sqrt(fan_in)
        elif name.endswith(("_variance", "weight")):  # BatchNorm scale and variance
            values = 1 + 0.1 * np.abs(values)
        else:
            values *= 0.1
        tensor.set_value(values)


def optimizer_states(model):
    """An optimizer and lr scheduler that have taken a step, as a checkpoint holds them."""
    scheduler = paddle.optimizer.lr.CosineAnnealingDecay(learning_rate=0.3, T_max=100)
    optimizer = paddle.optimizer.Momentum(learning_rate=scheduler, momentum=0.9,
                                          parameters=model.parameters(), weight_decay=1e-6)
    # zero gradients: the step fills the optimizer's state and leaves the weights as they are
    # (up to weight decay)
    loss = sum(p.sum() for p in model.parameters() if not p.stop_gradient) * 0
    loss.backward()
    optimizer.step()
    optimizer.clear_grad()
    scheduler.step()
    return optimizer.state_dict(), scheduler.state_dict()


def save(state_dicts, file_name):
    """v1's checkpoint_hook.save: every Tensor (one level into dicts) as NumPy, then pickle."""
    def convert(state_dict):
        return {k: v.numpy() if isinstance(v, paddle.Tensor) else v
                for k, v in state_dict.items()}

    final_dict = {}
    for k, v in state_dicts.items():
        if isinstance(v, paddle.Tensor):
            final_dict = convert(state_dicts)
            break
        elif isinstance(v, dict):
            final_dict[k] = convert(v)
        else:
            final_dict[k] = v
    with open(file_name, "wb") as f:
        pickle.dump(final_dict, f)


def save_checkpoint(model, epoch, file_name):
    """``epoch_N.pdparams`` as v1's CheckpointHook writes it after epoch ``epoch``."""
    optimizer, lr_scheduler = optimizer_states(model)
    save({"epoch": epoch, "state_dict": model.state_dict(), "optimizer": optimizer,
          "lr_scheduler": lr_scheduler}, file_name)


def extract_weight(checkpoint, output, prefix="backbone", remove_prefix=True):
    """v1's tools/extract_weight.py: paddle.load, keep ``prefix*`` tensors, paddle.save."""
    ckpt = paddle.load(checkpoint)
    output_dict = {}
    for key, value in ckpt["state_dict"].items():
        if key.startswith(prefix):
            output_dict[key[len(prefix) + 1:] if remove_prefix else key] = value
    paddle.save(output_dict, output)
