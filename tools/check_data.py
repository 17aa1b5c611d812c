"""Decode every image of a dataset on all cores and list the unreadable ones.

examples:
    python tools/check_data.py data/ILSVRC2012/train                    # an ImageFolder root
    python tools/check_data.py train_list.txt --root data/images         # an ImageList file
    python tools/check_data.py data/ILSVRC2012/train --output bad_train.txt

The bad images are printed with the reason and written, relative to the root, one per line
to --output (default bad_images.txt in the current directory, only when there are any). Leave
them out of training with the dataset key `exclude`:
    python tools/train.py -c CFG -o +dataloader.train.dataset.exclude=bad_train.txt
Exit status: 0 when every image decodes, 1 when some do not, 2 on a usage error.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from passl.cli import ArgumentParser, run_cli  # noqa: E402


def parse_args(argv):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("data", metavar="ROOT|LIST",
                        help="an ImageFolder root (root/<class>/<image>) or an ImageList file")
    parser.add_argument("--root", help="for a LIST: the folder its paths are relative to "
                                       "(default: the list file's folder)")
    parser.add_argument("--output", default="bad_images.txt",
                        help="where to write the bad images' relative paths")
    parser.add_argument("--processes", type=int, default=None,
                        help="decoding processes (default: all cores)")
    return parser.parse_args(argv)


def open_dataset(args):
    from passl.data.datasets import ImageFolder, ImageList
    if os.path.isfile(args.data):
        root = args.root or os.path.dirname(os.path.abspath(args.data))
        return ImageList(root, args.data, skip_corrupt=True)
    return ImageFolder(args.data, skip_corrupt=True)  # empty class folders: warn, go on


def main(argv=None):
    args = parse_args(argv)
    from passl.data.check import find_unreadable, write_exclude_list
    dataset = open_dataset(args)
    bad = find_unreadable(dataset.root, dataset.relative_paths(), args.processes)
    for rel, reason in bad:
        print(f"bad: {reason}")
    print(f"{len(dataset) - len(bad)} of {len(dataset)} images decode; {len(bad)} do not")
    if not bad:
        return 0
    write_exclude_list(bad, args.output)
    print(f"wrote {args.output}; leave these out with the dataset key "
          f"exclude: {os.path.abspath(args.output)}")
    return 1


if __name__ == "__main__":
    run_cli(main)
