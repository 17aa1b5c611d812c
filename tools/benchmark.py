"""Run a benchmark: ``python tools/benchmark.py <name> [--json] [options]``.

Each subcommand is a module under ``benchmarks/`` with ``add_arguments(parser)`` and
``main(args) -> exit code``; with ``--json`` its last output line is one JSON object.
To add one, add a line to BENCHMARKS.
"""
import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: subcommand -> (module under benchmarks/, one-line help)
BENCHMARKS = {
    "data": ("benchmarks.data_pipeline",
             "multi-crop images/s: PASSL's OpenCV pipeline vs Pillow + paddle.vision.transforms"),
    "train": ("benchmarks.train_step",
              "SwAV training step: images/s, GFLOP/s, peak RSS (model, loss, LARS)"),
    "infer": ("benchmarks.infer",
              "ResNet feature extraction images/s: Paddle dygraph vs Paddle Inference vs PyTorch"),
    "kmeans": ("benchmarks.kmeans",
               "DeepCluster-v2 k-means seconds per epoch on a synthetic bank, projected to "
               "ImageNet"),
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subcommands = parser.add_subparsers(dest="benchmark", required=True, metavar="|".join(BENCHMARKS))
    for name, (module_name, help_text) in BENCHMARKS.items():
        sub = subcommands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--json", action="store_true", help="end with one JSON line of the results")
        sub.set_defaults(module_name=module_name)
        importlib.import_module(module_name).add_arguments(sub)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return importlib.import_module(args.module_name).main(args)


if __name__ == "__main__":
    sys.exit(main())
