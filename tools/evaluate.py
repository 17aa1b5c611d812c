"""Did pretraining help on my data? Every weights file against random init and raw pixels,
with kNN, a linear probe and (optionally) fine-tuning, with all labels and with few.

    python tools/evaluate.py --data DIR --pretrained backbone.pdparams --output out/eval
    python tools/evaluate.py --data DIR --pretrained ep100=a.pdparams ep200=b.pdparams \\
        -c configs/swav/swav_clas_r50.yaml --shots 1 5 10 --draws 5 --output out/eval
    python tools/evaluate.py --data ~/.cache/passl/digits/digits_32px --pretrained swav=W \\
        -c configs/swav/swav_clas_r18_digits.yaml --shots 5 \\
        --finetune configs/swav/swav_semisup_r18_digits.yaml --output out/digits

DIR holds DIR/train/CLASS/* and DIR/val/CLASS/* (or list files DIR/train.txt, DIR/val.txt).
-c gives the backbone and the evaluation transforms. Prints a table (rows: features;
columns: protocol x labels per class, mean±std over disjoint draws) and which rows beat
which baseline beyond the spread; writes OUT/results.json, OUT/results.png and, per
fine-tuning run, a training folder under OUT/finetune/. See docs/evaluation.md.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from passl.cli import (ArgumentParser, add_config_arguments, add_trust_file_argument,  # noqa: E402
                       load_run_config, run_cli)
from passl.errors import UserError  # noqa: E402

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "swav", "swav_clas_r50.yaml")
DEFAULT_RECIPE = os.path.join(ROOT, "configs", "swav", "swav_semisup_r50_10pct.yaml")
BASELINES = ("random", "pixels")


def parse_args(argv):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="DIR/train/CLASS/* and DIR/val/CLASS/* (or DIR/train.txt, val.txt)")
    parser.add_argument("--pretrained", nargs="*", default=[], metavar="[NAME=]W",
                        help="backbone weights (.pdparams), one row each, named NAME or by "
                             "the file name")
    add_config_arguments(parser, required=False,
                         config_help="classification config: backbone and evaluation "
                                     "transforms (default configs/swav/swav_clas_r50.yaml)")
    parser.add_argument("--output", required=True, metavar="OUT",
                        help="folder for results.json, results.png and fine-tuning runs")
    parser.add_argument("--shots", nargs="*", type=int, default=[1, 5, 10], metavar="N",
                        help="labels per class of the few-label columns (default 1 5 10)")
    parser.add_argument("--draws", type=int, default=5,
                        help="disjoint draws per few-label column (default 5)")
    parser.add_argument("--draw-seed", type=int, default=0,
                        help="seed of the draws (and of --val-fraction's split)")
    parser.add_argument("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES),
                        help="baseline rows (default: random pixels; none: --baselines)")
    parser.add_argument("--knn-k", type=int, default=20, help="kNN neighbours (default 20)")
    parser.add_argument("--knn-temperature", type=float, default=0.07,
                        help="kNN vote weight exp(similarity / T) (default 0.07)")
    parser.add_argument("--engine", choices=("dygraph", "inference", "onnxruntime"),
                        default="dygraph",
                        help="compute features with the dygraph model, a Paddle Inference "
                             "predictor or onnxruntime (the last two: faster for large models "
                             "and sets; onnxruntime needs the [onnx] extra)")
    parser.add_argument("--val-fraction", type=float, metavar="F",
                        help="for a folder without val: hold out F of every train class")
    parser.add_argument("--finetune", nargs="?", const=DEFAULT_RECIPE, metavar="RECIPE",
                        help="also fine-tune the whole network with this semi-supervised "
                             "config (default configs/swav/swav_semisup_r50_10pct.yaml)")
    parser.add_argument("--finetune-override", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the fine-tuning recipe (repeatable)")
    parser.add_argument("--finetune-all-override", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a recipe key only when fine-tuning with all labels "
                             "(e.g. a larger batch and fewer epochs; repeatable)")
    add_trust_file_argument(parser)
    return parser.parse_args(argv)


def parse_rows(specs, baselines):
    """``[Row]`` of ``--pretrained [NAME=]W ...`` and the baselines (see docs)."""
    from passl.evaluation.suite import Row
    rows = []
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec and not os.path.exists(spec) \
            else ("", "", spec)
        name = name or os.path.splitext(os.path.basename(path))[0]
        if not os.path.isfile(path):
            raise UserError(f"--pretrained {spec}: file not found: {path}")
        if name in BASELINES:
            raise UserError(f"--pretrained {spec}: {name!r} names a baseline row; call it "
                            f"otherwise (NAME={path})")
        if name in [row.name for row in rows]:
            raise UserError(f"--pretrained {spec}: a second row named {name!r}; name them "
                            f"with NAME=W (e.g. run2={path})")
        rows.append(Row(name, path))
    rows += [Row("random")] if "random" in baselines else []
    rows += [Row("pixels", pixels=True)] if "pixels" in baselines else []
    if not rows:
        raise UserError("nothing to evaluate: give --pretrained W or keep a baseline")
    return rows


def finetuner(args):
    """``FinetuneJob -> top-1`` with the --finetune recipe and its overrides, or None."""
    if not args.finetune:
        return None
    from passl.config import load_config
    from passl.engine.finetune import finetune_top1
    recipe = load_config(args.finetune, args.finetune_override)
    recipe_all = load_config(args.finetune, args.finetune_override + args.finetune_all_override)
    return lambda job: finetune_top1(recipe_all if job.per_class is None else recipe, job,
                                     args.trust_file)


def main(argv=None):
    args = parse_args(argv)
    args.config = args.config or DEFAULT_CONFIG
    rows = parse_rows(args.pretrained, args.baselines)
    cfg = load_run_config(args)
    finetune = finetuner(args)
    from passl.evaluation import suite
    from passl.runtime import select_device
    select_device(cfg.get("device", "auto"))
    records, split = suite.run_suite(
        cfg, os.path.expanduser(args.data), rows, args.output, args.shots, args.draws,
        args.knn_k, args.knn_temperature, args.engine, args.val_fraction, finetune,
        args.draw_seed, args.trust_file)
    print("\n" + suite.format_table(records) + "\n")
    for line in suite.comparison_lines(records):
        print(line)
    print(f"\nresults: {os.path.join(args.output, 'results.json')}")
    try:
        from passl.evaluation.plot_suite import plot_suite
        picture = plot_suite(records, len(split.train_labels) / len(split.classes),
                             os.path.join(args.output, "results.png"))
        print(f"picture: {picture}")
    except UserError as missing:  # matplotlib is an optional extra
        print(f"no picture: {missing}")
    return 0


if __name__ == "__main__":
    run_cli(main)
