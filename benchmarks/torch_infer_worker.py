"""PyTorch side of ``tools/benchmark.py infer``: ResNet feature extraction images/s.

Runs under any Python with torch (no torchvision, no Paddle needed), e.g. a scratch venv:
``python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy``. Builds the
same ResNet as ``passl.models.backbones.resnet`` (torchvision's layout: stride on the 3x3
conv, global average pool, no fc), in eval mode, and prints one JSON line:
``{variant: {"images_per_s", "step_s"}, "torch": version, "threads": n}``.

Variants: ``torch-eager`` (the reference stack as users run it), ``torch-channels-last``
(NHWC tensors) and ``torch-traced-frozen`` (``torch.jit.trace`` + ``torch.jit.freeze``,
which folds BatchNorm into the convolutions).
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn as nn

VARIANTS = ("torch-eager", "torch-channels-last", "torch-traced-frozen")
#: depth -> (bottleneck?, blocks per stage), as passl's DEPTHS
DEPTHS = {18: (False, [2, 2, 2, 2]), 34: (False, [3, 4, 6, 3]), 50: (True, [3, 4, 6, 3]),
          101: (True, [3, 4, 23, 3]), 152: (True, [3, 8, 36, 3])}
#: stem -> (kernel, stride, max-pool), as passl's STEMS
STEMS = {"imagenet": (7, 2, True), "cifar": (3, 1, False), "small": (3, 2, False)}


def conv_bn(cin, cout, kernel, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(cout))


class Block(nn.Module):
    def __init__(self, cin, planes, stride, bottleneck):
        super().__init__()
        expansion = 4 if bottleneck else 1
        if bottleneck:
            self.branch = nn.Sequential(conv_bn(cin, planes, 1, 1), nn.ReLU(inplace=True),
                                        conv_bn(planes, planes, 3, stride), nn.ReLU(inplace=True),
                                        conv_bn(planes, planes * expansion, 1, 1))
        else:
            self.branch = nn.Sequential(conv_bn(cin, planes, 3, stride), nn.ReLU(inplace=True),
                                        conv_bn(planes, planes, 3, 1))
        self.shortcut = (conv_bn(cin, planes * expansion, 1, stride)
                         if stride != 1 or cin != planes * expansion else nn.Identity())
        self.relu = nn.ReLU(inplace=True)
        self.out_channels = planes * expansion

    def forward(self, x):
        return self.relu(self.branch(x) + self.shortcut(x))


def resnet(depth, layers=None, base_width=64, stem="imagenet"):
    bottleneck, default_layers = DEPTHS[depth]
    kernel, stride, with_pool = STEMS[stem]
    modules = [conv_bn(3, base_width, kernel, stride), nn.ReLU(inplace=True)]
    if with_pool:
        modules.append(nn.MaxPool2d(3, 2, 1))
    channels = base_width
    for index, blocks in enumerate(layers or default_layers):
        for b in range(blocks):
            block = Block(channels, base_width * 2 ** index,
                          2 if index > 0 and b == 0 else 1, bottleneck)
            modules.append(block)
            channels = block.out_channels
    modules += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*modules).eval()


def runner(variant, model, images):
    if variant == "torch-channels-last":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    elif variant == "torch-traced-frozen":
        with torch.no_grad():
            model = torch.jit.freeze(torch.jit.trace(model, images))

    def run():
        with torch.inference_mode():
            return model(images).numpy()
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--layers", type=int, nargs=4)
    parser.add_argument("--base-width", type=int, default=64)
    parser.add_argument("--stem", default="imagenet", choices=tuple(STEMS))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    result = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    for variant in args.variants.split(","):
        run = runner(variant, resnet(args.depth, args.layers, args.base_width, args.stem), images)
        for _ in range(args.warmup):
            run()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        step = statistics.median(times)
        result[variant] = {"images_per_s": args.batch_size / step, "step_s": step}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
