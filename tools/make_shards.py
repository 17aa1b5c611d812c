"""Pack an ImageFolder or an image list into tar shards for the ``TarShards`` dataset.

    python tools/make_shards.py data/imagenet/train --output data/imagenet_shards/train
    python tools/make_shards.py data/images --list train.txt --output shards/ --shard-size 2000

Shards hold ``--shard-size`` images each (default 1000, ~110 MB of ImageNet JPEGs), as
WebDataset-compatible members ``KEY.jpg`` (the original bytes) and ``KEY.cls`` (the label),
plus ``index.npz`` (see passl/io/tar_shards.py). Images are written in a random order drawn
from ``--seed`` (``--no-shuffle`` keeps the source order), so that every shard mixes classes.
Images are not decoded: check them first with ``ImageFolder`` if the source may be corrupt.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from passl.cli import ArgumentParser, run_cli  # noqa: E402
from passl.errors import UserError  # noqa: E402


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="ImageFolder root (root/<class>/<image>), or the root of "
                                     "the paths in --list")
    parser.add_argument("--list", metavar="FILE",
                        help="image list ('relative/path [label]' per line) instead of folders")
    parser.add_argument("--output", required=True, help="directory for the shards and index")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the writing order")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    return parser.parse_args(argv)


def source_dataset(args):
    from passl.data.datasets import ImageFolder, ImageList
    if args.list:
        return ImageList(args.root, args.list)
    return ImageFolder(args.root)


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.root):
        raise UserError(f"{args.root}: directory not found; give the ImageFolder root "
                        f"(root/<class>/<image>), or with --list the root of its paths")
    if args.shard_size < 1:
        raise UserError(f"--shard-size {args.shard_size}: expected a positive number of images")
    if os.path.exists(os.path.join(args.output, "index.npz")):
        raise UserError(f"--output {args.output}: already holds shards (index.npz); choose "
                        f"another directory or delete it")
    import numpy as np

    from passl.io.tar_shards import image_extension, write_shards

    dataset = source_dataset(args)
    order = np.arange(len(dataset)) if args.no_shuffle else \
        np.random.default_rng(args.seed).permutation(len(dataset))

    def samples():
        for number in order:
            path = dataset.path(number)
            with open(path, "rb") as f:
                yield image_extension(path), f.read(), int(dataset.labels[number])

    index = write_shards(samples(), args.output, args.shard_size, getattr(dataset, "classes", ()))
    total = int(sum(index["shard_bytes"]))
    print(f"{len(index['label'])} images in {len(index['shard_names'])} shard(s) of up to "
          f"{args.shard_size}, {total / 2**20:.1f} MiB, in {args.output}")
    return 0


if __name__ == "__main__":
    run_cli(main)
