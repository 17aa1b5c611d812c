"""ResNet backbones (He et al. 2016) as SwAV trains them, without the classifier.

Parameter names follow ``paddle.vision.models.resnet`` (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.downsample.0`` ...), so ImageNet weights saved
from ``paddle.vision`` load by name. Initialisation follows the SwAV reference
(torchvision's): Kaiming-normal (fan_out) convolutions, BatchNorm gamma 1 and
beta 0, optionally gamma 0 for the last BatchNorm of every residual block.
"""
import re

import paddle
import paddle.nn as nn

from passl.errors import ConfigError
from passl.models.registry import BACKBONES
from passl.models.torch_names import LEAF, rename


def conv_bn(in_channels, out_channels, kernel_size, stride, data_format):
    """A bias-free convolution with 'same'-style padding, and the BatchNorm that follows it."""
    conv = nn.Conv2D(in_channels, out_channels, kernel_size, stride=stride,
                     padding=kernel_size // 2, bias_attr=False, data_format=data_format)
    return conv, nn.BatchNorm2D(out_channels, data_format=data_format)


def residual_sum(branch, shortcut):
    """``branch + shortcut``, the same sum in a traced graph without a Paddle log line.

    While ``paddle.jit.save`` traces a model (tools/export_model.py, the inference backbone
    engine), ``+`` of two tensors becomes ``paddle.add``, which hands its kernel an ``out``
    argument and Paddle 3.x logs "static graph(PIR) not support input out tensor" for it,
    a line no user can act on; ``add_n`` adds the two without it. Training keeps ``+``.
    """
    if paddle.in_dynamic_mode():
        return branch + shortcut
    return paddle.add_n([branch, shortcut])


class BasicBlock(nn.Layer):
    """Two 3x3 convolutions plus the shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels, planes, stride, downsample, data_format):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_channels, planes, 3, stride, data_format)
        self.conv2, self.bn2 = conv_bn(planes, planes, 3, 1, data_format)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def last_bn(self):
        return self.bn2

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(residual_sum(out, shortcut))


class BottleneckBlock(nn.Layer):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision), 1x1 expand x4, plus the shortcut."""

    expansion = 4

    def __init__(self, in_channels, planes, stride, downsample, data_format):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_channels, planes, 1, 1, data_format)
        self.conv2, self.bn2 = conv_bn(planes, planes, 3, stride, data_format)
        self.conv3, self.bn3 = conv_bn(planes, planes * self.expansion, 1, 1, data_format)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def last_bn(self):
        return self.bn3

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(residual_sum(out, shortcut))


#: depth -> (block, residual blocks per stage)
DEPTHS = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (BottleneckBlock, [3, 4, 6, 3]),
    101: (BottleneckBlock, [3, 4, 23, 3]),
    152: (BottleneckBlock, [3, 8, 36, 3]),
}

#: stem -> (first conv kernel, its stride, max-pool after it)
STEMS = {
    "imagenet": (7, 2, True),   # 224-pixel images: /4 before layer1
    "cifar": (3, 1, False),     # 32-pixel images: full resolution into layer1
    "small": (3, 2, False),     # tiny CPU demos: /2 before layer1
}


@BACKBONES.register()
class ResNet(nn.Layer):
    """ResNet trunk: stem, four residual stages, global average pool.

    Config keys (``model.backbone``):
        depth: 18, 34, 50, 101 or 152; selects the block type and, unless
            ``layers`` is given, the blocks per stage.
        width_multiplier: widens the stem and every stage, as the SwAV paper's
            ResNet-50 w2/w4/w5 (``out_channels`` 2048 x width_multiplier).
        zero_init_residual: start each residual branch at zero (last BN gamma 0).
        stem: ``imagenet`` (7x7/2 conv + 3x3/2 max-pool), ``cifar`` (3x3/1 conv,
            no pool) or ``small`` (3x3/2 conv, no pool).
        layers: residual blocks per stage, e.g. ``[1, 1, 1, 1]``; default from depth.
        base_width: channels of the stem and first stage (64); stages double it.
        data_format: ``NCHW`` or ``NHWC`` for the internal layers (NHWC can be
            faster on GPUs with AMP); inputs are always NCHW.
        pool_size: the average pool's output grid, flattened into the features: 1 (the
            paper's global pool) or e.g. 2 (a 2x2 grid keeps where a stroke is, which kNN
            on small images uses; ``out_channels`` is then channels x 4). It has no
            weights, so an evaluation may use another size than pretraining.

    ``forward(x)`` returns pooled features ``[N, out_channels]``;
    ``feature_map(x)`` the last stage's map ``[N, out_channels, h, w]``.
    """

    def __init__(self, depth=50, width_multiplier=1, zero_init_residual=False, stem="imagenet",
                 layers=None, base_width=64, data_format="NCHW", pool_size=1):
        super().__init__()
        if depth not in DEPTHS:
            raise ConfigError(f"ResNet depth {depth!r} is not supported; choose one of "
                              f"{', '.join(map(str, DEPTHS))}")
        if stem not in STEMS:
            raise ConfigError(f"ResNet stem {stem!r} is not supported; choose one of "
                              f"{', '.join(STEMS)}")
        if data_format not in ("NCHW", "NHWC"):
            raise ConfigError(f"ResNet data_format {data_format!r} must be NCHW or NHWC")
        block, default_layers = DEPTHS[depth]
        layers = list(layers) if layers is not None else default_layers
        if len(layers) != 4 or min(layers) < 1:
            raise ConfigError(f"ResNet layers {layers!r} must be 4 positive block counts")
        self.data_format = data_format

        width = base_width * width_multiplier
        kernel, stride, with_pool = STEMS[stem]
        self.conv1, self.bn1 = conv_bn(3, width, kernel, stride, data_format)
        self.relu = nn.ReLU()
        self.maxpool = (nn.MaxPool2D(3, stride=2, padding=1, data_format=data_format)
                        if with_pool else None)
        in_channels = width
        for index, blocks in enumerate(layers):
            stage, in_channels = self._make_stage(block, in_channels, width * 2 ** index, blocks,
                                                  stride=1 if index == 0 else 2)
            setattr(self, f"layer{index + 1}", stage)
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ConfigError(f"ResNet pool_size {pool_size!r} must be a positive integer")
        self.avgpool = nn.AdaptiveAvgPool2D(pool_size, data_format=data_format)
        self.out_channels = in_channels * pool_size ** 2
        self._init_weights(zero_init_residual)

    def _make_stage(self, block, in_channels, planes, blocks, stride):
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(*conv_bn(in_channels, out_channels, 1, stride,
                                                self.data_format))
        stage = [block(in_channels, planes, stride, downsample, self.data_format)]
        stage += [block(out_channels, planes, 1, None, self.data_format) for _ in range(1, blocks)]
        return nn.Sequential(*stage), out_channels

    def _init_weights(self, zero_init_residual):
        conv_init = nn.initializer.KaimingNormal(nonlinearity="relu", mode="fan_out")
        for layer in self.sublayers():
            if isinstance(layer, nn.Conv2D):
                conv_init(layer.weight)
            elif isinstance(layer, nn.BatchNorm2D):
                nn.initializer.Constant(1.0)(layer.weight)
                nn.initializer.Constant(0.0)(layer.bias)
        if zero_init_residual:
            for layer in self.sublayers():
                if isinstance(layer, (BasicBlock, BottleneckBlock)):
                    nn.initializer.Constant(0.0)(layer.last_bn().weight)

    def _trunk(self, x):
        """NCHW images -> the last stage's map in ``self.data_format``."""
        if self.data_format == "NHWC":
            x = x.transpose([0, 2, 3, 1])
        x = self.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def feature_map(self, x):
        """NCHW images -> the last stage's feature map ``[N, out_channels, h, w]``."""
        x = self._trunk(x)
        return x.transpose([0, 3, 1, 2]) if self.data_format == "NHWC" else x

    def forward(self, x):
        """NCHW images -> average-pooled features ``[N, out_channels]`` (channel-major:
        the ``pool_size`` x ``pool_size`` cells of channel 0, then of channel 1, ...)."""
        pooled = self.avgpool(self._trunk(x))
        if self.data_format == "NHWC":
            pooled = pooled.transpose([0, 3, 1, 2])
        return paddle.flatten(pooled, 1)


# ---------------------------------------------------------------- PyTorch weights
# torchvision.models.resnet and the SwAV reference's src/resnet50.py (facebookresearch/swav,
# also its wide resnet50w2/w4/w5: every width times `widen`) name a trunk's tensors alike:
#   conv1.weight [64w, 3, 7, 7]        bn1.{weight, bias, running_mean, running_var}
#   layer{1-4}.{i}.conv{1,2,3}.weight  layer{1-4}.{i}.bn{1,2,3}.*   (Bottleneck; BasicBlock: 1-2)
#   layer{1-4}.0.downsample.0.weight (1x1 conv)  layer{1-4}.0.downsample.1.* (BatchNorm)
#   + num_batches_tracked per BatchNorm (PyTorch >= 1.1); torchvision adds fc.{weight, bias}.
# The reference's stem pads by 1 with a parameter-free ConstantPad2d before a conv with
# padding 2: the same zero padding of 3 as ours (and torchvision's), so no tensor differs.
# Our names are the same, with Paddle's BatchNorm statistics (_mean, _variance).
TORCH_TRUNK = r"(conv1|bn1|layer[1-4]\.\d+\.(conv[1-3]|bn[1-3]|downsample\.[01]))\." + LEAF


def resnet_from_torch(name):
    """Our name for the tensor ``name`` of a torchvision-layout ResNet trunk, else None."""
    return rename(TORCH_TRUNK, r"\g<0>", name)


# ---------------------------------------------------------------- PASSL v1 weights
# PASSL v1's ResNetswav (passl/modeling/backbones/resnetswav.py) is paddle.vision's ResNet
# without classifier or pool, plus a parameter-free Pad2D(1) before a conv1 of padding 2 (the
# same zero padding of 3 as ours). Its tensors carry exactly our names, Paddle's BatchNorm
# statistics included; only the pool, which v1 leaves to the neck or head, is ours.
PASSL_V1_TRUNK = (r"(conv1|bn1|layer[1-4]\.\d+\.(conv[1-3]|bn[1-3]|downsample\.[01]))\."
                  r"(weight|bias|_mean|_variance)")


def resnet_from_passl_v1(name):
    """Our name for the tensor ``name`` of a PASSL v1 ResNet trunk (the same), else None."""
    return name if re.fullmatch(PASSL_V1_TRUNK, name) else None


def backbone_from_passl_v1(name):
    """``name`` when it is a trunk tensor under a PASSL v1 model's ``backbone.`` (ours too)."""
    prefix = "backbone."
    return name if name.startswith(prefix) and resnet_from_passl_v1(name[len(prefix):]) else None
