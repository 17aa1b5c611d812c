"""Linear classification on top of a (frozen) backbone: the SwAV linear-evaluation protocol."""
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from passl.errors import ConfigError
from passl.models.backbones.resnet import backbone_from_passl_v1, resnet_from_torch
from passl.models.registry import BACKBONES, MODELS
from passl.models.torch_names import rename, rename_exact
from passl.utils.accuracy import topk_accuracy


#: ``model.backbone_engine`` values: how a frozen backbone runs
BACKBONE_ENGINES = ("dygraph", "inference", "onnxruntime")


@MODELS.register()
class Classification(nn.Layer):
    """A backbone followed by one linear layer.

    With ``freeze_backbone`` (the linear protocol) the backbone gets no gradient and always
    runs in eval mode, so its BatchNorm layers use and keep their pretrained running
    statistics even while the classifier trains; only the linear layer learns.

    Args:
        backbone: config block of the backbone (``BACKBONES``); its forward returns pooled
            ``[B, C]`` features (global average pooling is part of the backbone).
        num_classes: number of output classes.
        in_dim: feature width ``C``; defaults to ``backbone.out_channels``.
        freeze_backbone: train only the linear layer (True) or fine-tune everything.
        topk: the top-k accuracies logged during training.
        backbone_engine: ``dygraph`` (default), ``inference`` or ``onnxruntime``: run the
            frozen backbone as a Paddle Inference predictor (oneDNN on CPU) or an
            onnxruntime session (the ``[onnx]`` extra), compiled from its weights at the
            first forward pass and again after ``set_state_dict``. Its features equal
            dygraph's to ~1e-6 relative and a ResNet-50 runs about twice as fast on CPU
            (docs/benchmarks.md); needs ``freeze_backbone: true``.
    """

    def __init__(self, backbone, num_classes, in_dim=None, freeze_backbone=True, topk=(1, 5),
                 backbone_engine="dygraph"):
        super().__init__()
        if backbone_engine not in BACKBONE_ENGINES:
            raise ConfigError(f"model.backbone_engine: {backbone_engine!r} is not one of "
                              f"{', '.join(BACKBONE_ENGINES)}")
        if backbone_engine != "dygraph" and not freeze_backbone:
            raise ConfigError(f"model.backbone_engine: {backbone_engine} runs a frozen copy of "
                              f"the backbone; set freeze_backbone: true or backbone_engine: "
                              f"dygraph")
        self.backbone_engine = backbone_engine
        self._compiled_backbone = None
        self.backbone = BACKBONES.build(backbone)
        if in_dim is None:
            in_dim = getattr(self.backbone, "out_channels", None)
            if in_dim is None:
                raise ConfigError(f"model.in_dim: backbone {type(self.backbone).__name__} has no "
                                  "'out_channels'; set in_dim to its feature width")
        self.freeze_backbone = freeze_backbone
        self.topk = tuple(topk)
        # The paper's initialisation of the linear classifier: N(0, 0.01) weights, zero bias.
        self.fc = nn.Linear(
            in_dim, num_classes,
            weight_attr=paddle.ParamAttr(initializer=nn.initializer.Normal(0.0, 0.01)),
            bias_attr=paddle.ParamAttr(initializer=nn.initializer.Constant(0.0)))
        if freeze_backbone:
            for param in self.backbone.parameters():
                param.stop_gradient = True
            self._hold_backbone_in_eval()

    def _hold_backbone_in_eval(self):
        """Put a frozen backbone in eval mode (BN uses and keeps its running statistics).

        Sets the sublayers' flags directly: ``Layer.eval()`` would also switch Paddle's global
        tracer to eval mode while the classifier itself trains.
        """
        if self.freeze_backbone:
            for layer in self.backbone.sublayers(include_self=True):
                layer.training = False

    def train(self, mode=True):
        super().train(mode)
        self._hold_backbone_in_eval()
        return self

    def extract_features(self, images):
        """Pooled backbone features ``[B, C]`` (what kNN and the linear layer see)."""
        if self.backbone_engine == "dygraph" or not paddle.in_dynamic_mode():
            return self.backbone(images)  # also while paddle.jit.save traces this model
        if self._compiled_backbone is None:
            from passl.deploy.engine import compile_layer
            self._compiled_backbone = compile_layer(self.backbone, [-1, 3, -1, -1],
                                                    engine=self.backbone_engine)
        return paddle.to_tensor(self._compiled_backbone(images.numpy()))

    def set_state_dict(self, state_dict, *args, **kwargs):
        self._compiled_backbone = None  # new weights: compile again when next used
        return super().set_state_dict(state_dict, *args, **kwargs)

    def forward(self, batch):
        images, labels = batch
        # A wrapper's train() (e.g. paddle.DataParallel's) sets every sublayer's flag
        # directly, bypassing the override above; re-assert eval mode before every step.
        self._hold_backbone_in_eval()
        logits = self.fc(self.extract_features(images))
        if not self.training:
            return {"logits": logits, "labels": labels}
        loss = F.cross_entropy(logits, labels.reshape([-1, 1]).astype("int64"))
        return {"loss": loss, "logs": topk_accuracy(logits.detach(), labels, self.topk)}


# ---------------------------------------------------------------- PyTorch weights
# facebookresearch/swav eval_linear.py trains RegLog on the frozen trunk and saves
# {"epoch", "state_dict", "optimizer", "scheduler", "best_acc"} (e.g. the published
# swav_800ep_eval_linear.pth.tar); its state_dict is the classifier alone, inside
# DistributedDataParallel:
#   module.linear.weight [1000, 2048w], module.linear.bias [1000]          -> fc
# (global_pooling true, the default; with global_pooling false the weight is [1000, 8192] over
# a 2x2 pooled map, and use_bn adds module.bn.*: neither fits this model, and both are refused).
# The trunk comes from the pretrained file converted alongside. A torchvision ResNet's own
# classifier, fc.{weight [1000, 2048], bias}, maps to fc too.
CLASSIFIER_NAMES = r"(linear|fc)\.(weight|bias)"


def classification_from_torch(name):
    """Our Classification name for a reference trunk or linear-classifier tensor, else None."""
    trunk = resnet_from_torch(name)
    return "backbone." + trunk if trunk else rename(CLASSIFIER_NAMES, r"fc.\2", name)


# ---------------------------------------------------------------- PASSL v1 weights
# PASSL v1's Classification (passl/modeling/architectures/clas.py) is backbone.* (ResNetswav,
# our names) + ClasHead, whose linear layer head.fc_cls.{weight [in, classes], bias} is ours
# as fc, in the same Paddle layout. Its linear-evaluation checkpoints hold both.
CLASSIFIER_V1_NAMES = r"head\.fc_cls\.(weight|bias)"


def classification_from_passl_v1(name):
    """Our Classification name for the tensor ``name`` of a PASSL v1 classifier, else None."""
    return backbone_from_passl_v1(name) or rename_exact(CLASSIFIER_V1_NAMES, r"fc.\1", name)
