"""See what SwAV learned, as PNG pictures: prototype galleries, assignment health, feature maps.

    python tools/visualize.py prototypes -c CFG --load CKPT [--top 8] [--prototypes N | --ids 3,7]
                                         --output gallery.png
    python tools/visualize.py usage -c CFG (--load CKPT | --run OUTPUT_DIR) --output usage.png
    python tools/visualize.py features -c CFG (--load CKPT | --pretrained W) [--method tsne|pca]
                                       --output features.png

Images come from the config's KNNHook train/val blocks, from dataloader.train/val of a
Classification config, or else from the training folder alone (a SwAV config on your own
images: galleries and usage need no labels). --data CFG takes them from another config;
--data DIR from a folder with one subfolder per class, which is all the feature map needs
for its labels (a fifth of every class becomes the kNN queries). Works under
python -m paddle.distributed.launch too (every rank computes its share, rank 0 draws).
Needs matplotlib: pip install -e .[plot]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from passl.cli import ArgumentParser, add_config_arguments, load_run_config, run_cli  # noqa: E402
from passl.errors import UserError  # noqa: E402

VERBS = {
    "prototypes": "one row per prototype (most used first, or --ids): the images scoring "
                  "highest on it",
    "usage": "images per prototype (hard assignments) and their entropy, for one checkpoint or "
             "over training (the checkpoints of a run)",
    "features": "2-D t-SNE/PCA of the backbone's val features coloured by class, random init "
                "next to the given weights, kNN top-1 in each title",
}


def prototype_ids(text):
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of prototype "
                                         f"numbers, e.g. --ids 3,7,12") from None


def positive(flag, value):
    if value < 1:
        raise UserError(f"{flag} {value}: expected a positive number")


def verb_parser(verb):
    """The flags of one verb (each its own parser, so unknown flags are reported per verb)."""
    parser = ArgumentParser(prog=f"visualize.py {verb}", description=VERBS[verb])
    add_config_arguments(parser, config_help="YAML config of the model (e.g. the SwAV one)")
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--data", metavar="CFG|DIR",
                        help="take the images from this config, or from this folder with one "
                             "subfolder per class (see the tool's --help)")
    if verb in ("prototypes", "usage"):
        parser.add_argument("--split", choices=("val", "train"),
                            help="which image set to score (default: val when there is one, "
                                 "else train)")
        parser.add_argument("--head", type=int, default=0,
                            help="prototype head (DeepCluster-v2 has several; default 0)")
    if verb == "prototypes":
        parser.add_argument("--load", required=True, metavar="CKPT",
                            help="SwAV/DeepCluster-v2 checkpoint or converted model "
                                 "(the prototypes are needed)")
        parser.add_argument("--top", type=int, default=8, help="images per prototype (default 8)")
        parser.add_argument("--prototypes", type=int, default=10, metavar="N",
                            help="rows: the N most used prototypes (default 10)")
        parser.add_argument("--ids", type=prototype_ids, help="rows: these prototypes instead")
        parser.add_argument("--thumb", type=int, default=48, help="thumbnail pixels (default 48)")
    elif verb == "usage":
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--load", metavar="CKPT", help="one checkpoint")
        source.add_argument("--run", metavar="OUTPUT_DIR",
                            help="a training run: its checkpoints/epoch_N.pd, oldest first")
        parser.add_argument("--max-checkpoints", type=int, default=20,
                            help="evenly spaced checkpoints of --run to score (default 20)")
    else:
        weights = parser.add_mutually_exclusive_group(required=True)
        weights.add_argument("--load", metavar="CKPT", help="checkpoint or model state dict")
        weights.add_argument("--pretrained", metavar="W", help="backbone weights (.pdparams)")
        parser.add_argument("--method", choices=("tsne", "pca"), default="tsne",
                            help="2-D projection (default tsne)")
        parser.add_argument("--max-points", type=int, default=5000,
                            help="val images drawn at most, evenly spaced (default 5000)")
        parser.add_argument("--k", type=int, default=20, help="kNN neighbours (default 20)")
    return parser


def parse_args(argv):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in VERBS:
        verbs = "\n".join(f"  {verb:<11} {text}" for verb, text in VERBS.items())
        top = ArgumentParser(prog="visualize.py", description=__doc__.splitlines()[0],
                             epilog=f"verbs:\n{verbs}\n\n{__doc__.split(chr(10) * 2, 1)[1]}",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        top.add_argument("verb", choices=list(VERBS))
        top.parse_args(argv[:1])  # --help, or an error naming the verbs
    return argv[0], verb_parser(argv[0]).parse_args(argv[1:])


def check_paths(args):
    for flag in ("load", "pretrained"):
        path = getattr(args, flag, None)
        if path and not os.path.isfile(path):
            raise UserError(f"--{flag} {path}: file not found")
    if args.data and not os.path.exists(args.data):
        raise UserError(f"--data {args.data}: not found; pass a config file or a folder with one "
                        f"subfolder of images per class")
    if getattr(args, "run", None) and not os.path.isdir(args.run):
        raise UserError(f"--run {args.run}: directory not found; pass a training run's output_dir")
    if not args.output.endswith(".png"):
        raise UserError(f"--output {args.output}: the pictures are PNG files; end it in .png")
    for flag in ("top", "prototypes", "thumb", "max_checkpoints", "max_points", "k"):
        if getattr(args, flag, None) is not None:
            positive("--" + flag.replace("_", "-"), getattr(args, flag))


def main(argv=None):
    verb, args = parse_args(argv)
    check_paths(args)
    cfg = load_run_config(args)
    from passl.config import load_config
    from passl.evaluation import visualize
    data_cfg = load_config(args.data) if args.data and os.path.isfile(args.data) else args.data
    if verb == "prototypes":
        result = visualize.prototype_gallery(cfg, args.load, args.output, args.top, args.prototypes,
                                             args.ids, args.split, data_cfg, args.thumb,
                                             args.head)
        summary = f"prototypes {', '.join(map(str, result['prototypes']))}"
    elif verb == "usage":
        history = visualize.assignment_usage(cfg, args.output, args.load, args.run, args.split,
                                             data_cfg, args.max_checkpoints, args.head)
        last = history[-1]
        summary = (f"{len(history)} checkpoint(s); last: entropy {last['entropy']:.3f} nats, "
                   f"{int((last['counts'] > 0).sum())}/{len(last['counts'])} prototypes used")
    else:
        panels = visualize.feature_maps(cfg, args.output, args.load, args.pretrained, args.method,
                                        data_cfg, k=args.k, max_points=args.max_points)
        summary = "; ".join(panel["title"] for panel in panels)
    from passl import distributed
    if distributed.get_rank() == 0:
        print(f"wrote {args.output} ({summary})")
    return 0


if __name__ == "__main__":
    run_cli(main)
