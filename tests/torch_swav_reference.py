"""A PyTorch SwAV model with the tensor names of facebookresearch/swav's src/resnet50.py.

Written for the converter's tests (not copied): the same modules under the same attribute
names, so its ``state_dict()`` has the published files' keys and shapes. Needs torch; used by
tests/fixtures/make_torch_fixtures.py and the optional tests in test_convert_weights.py.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Bottleneck(nn.Module):
    def __init__(self, in_channels, planes, stride):
        super().__init__()
        out_channels = planes * 4
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class MultiPrototypes(nn.Module):
    """Several prototype layers, named prototypes0, prototypes1, ..."""

    def __init__(self, output_dim, nmb_prototypes):
        super().__init__()
        self.heads = len(nmb_prototypes)
        for i, k in enumerate(nmb_prototypes):
            self.add_module(f"prototypes{i}", nn.Linear(output_dim, k, bias=False))

    def forward(self, x):
        return [getattr(self, f"prototypes{i}")(x) for i in range(self.heads)]


class ReferenceSwAV(nn.Module):
    """Trunk (``widen`` x ``width`` channels in the stem), projection head and prototypes.

    ``hidden_mlp`` 0 gives one Linear head; ``head_batch_norm=False`` the RN50-w5 head
    (Linear, ReLU, Linear); a list ``nmb_prototypes`` the MultiPrototypes layout.
    """

    def __init__(self, layers=(3, 4, 6, 3), widen=1, width=64, hidden_mlp=2048, output_dim=128,
                 nmb_prototypes=3000, head_batch_norm=True):
        super().__init__()
        channels = width * widen
        self.padding = nn.ConstantPad2d(1, 0.0)  # the reference's stem: pad 1, then conv pad 2
        self.conv1 = nn.Conv2d(3, channels, 7, stride=2, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = channels
        for index, blocks in enumerate(layers):
            planes = channels * 2 ** index
            stage = [Bottleneck(in_channels, planes, 1 if index == 0 else 2)]
            stage += [Bottleneck(planes * 4, planes, 1) for _ in range(1, blocks)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*stage))
            in_channels = planes * 4
        self.out_channels = in_channels
        if hidden_mlp:
            head = [nn.Linear(in_channels, hidden_mlp)]
            head += [nn.BatchNorm1d(hidden_mlp)] if head_batch_norm else []
            head += [nn.ReLU(inplace=True), nn.Linear(hidden_mlp, output_dim)]
            self.projection_head = nn.Sequential(*head)
        else:
            self.projection_head = nn.Linear(in_channels, output_dim)
        if isinstance(nmb_prototypes, (list, tuple)):
            self.prototypes = MultiPrototypes(output_dim, nmb_prototypes)
        else:
            self.prototypes = nn.Linear(output_dim, nmb_prototypes, bias=False)

    def features(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(self.padding(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x):
        """Pooled features, L2-normalised embeddings and prototype scores (a list per head)."""
        features = self.features(x)
        embeddings = F.normalize(self.projection_head(features), dim=1, p=2)
        scores = self.prototypes(embeddings)
        return features, embeddings, scores if isinstance(scores, list) else [scores]


def randomise(model, seed):
    """Random weights everywhere, BatchNorm statistics included (so renaming them matters)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.dtype != torch.float32:
                continue
            values = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                values = values.abs() + 0.5
            elif name.endswith(".weight") and tensor.ndim == 1:  # BatchNorm gamma
                values = values * 0.1 + 1.0
            elif tensor.ndim > 1:  # keep activations in range through deep stacks
                values = values / tensor[0].numel() ** 0.5
            else:
                values = values * 0.1
            tensor.copy_(values)
    return model.eval()


def published_state_dict(model):
    """The model's state dict as main_swav.py saved it: under DistributedDataParallel."""
    return {"module." + name: tensor for name, tensor in model.state_dict().items()}
