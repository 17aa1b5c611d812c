"""Weighted kNN accuracy of a backbone's features (no training).

    python tools/knn_eval.py -c configs/swav/swav_clas_r18_digits.yaml --pretrained backbone.pdparams
    python tools/knn_eval.py -c configs/swav/swav_clas_r18_digits.yaml      # random-init baseline

The config's dataloader.train set (seen through the val transforms) is the memory bank and
dataloader.val the queries. Prints top-1 and appends a record with knn_top1 to
output_dir/metrics.jsonl.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from passl.cli import (ArgumentParser, add_config_arguments, add_trust_file_argument,  # noqa: E402
                       load_run_config, run_cli)
from passl.errors import UserError  # noqa: E402


def parse_args(argv):
    parser = ArgumentParser(description=__doc__)
    add_config_arguments(parser, config_help="YAML config (a Classification one)")
    parser.add_argument("--pretrained", metavar="PATH",
                        help="backbone weights (.pdparams); without it: random init")
    parser.add_argument("--k", type=int, default=20, help="neighbours that vote (default 20)")
    parser.add_argument("--temperature", type=float, default=0.07,
                        help="vote weight exp(similarity / T) (default 0.07)")
    add_trust_file_argument(parser)
    parser.add_argument("--engine", choices=("dygraph", "inference", "onnxruntime"),
                        default="dygraph",
                        help="compute the features with the dygraph model (default), a Paddle "
                             "Inference predictor of it or an onnxruntime session of its ONNX "
                             "conversion (same features to ~1e-6, faster for large models and "
                             "sets; onnxruntime needs pip install -e \".[onnx]\")")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.pretrained and not os.path.exists(args.pretrained):
        raise UserError(f"--pretrained {args.pretrained}: file not found")
    cfg = load_run_config(args)
    from passl.evaluation.knn_eval import run_knn_eval
    result = run_knn_eval(cfg, args.pretrained, args.k, args.temperature, args.trust_file,
                          args.engine)
    from passl import distributed
    if distributed.get_rank() == 0:
        print(f"kNN top-1 {result['knn_top1']:.2f}  top-5 {result['knn_top5']:.2f}  "
              f"(k={args.k}, T={args.temperature}, {result['count']} queries, "
              f"{'weights ' + args.pretrained if args.pretrained else 'random init'})")
    return 0


if __name__ == "__main__":
    run_cli(main)
