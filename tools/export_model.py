"""Export a trained model for Paddle Inference or ONNX: graph + weights + preprocessing.

    python tools/export_model.py -c configs/swav/swav_clas_r18_digits.yaml \
        --load output/swav_clas_r18_digits/checkpoints/latest.pd --output inference/digits
    python tools/export_model.py -c configs/swav/swav_clas_r50.yaml \
        --pretrained backbone.pdparams --output inference/r50_features

    python tools/export_model.py -c configs/swav/swav_clas_r50.yaml \
        --pretrained backbone.pdparams --output inference/r50_onnx --format onnx

--load exports the classifier (logits, class names from the training set); --pretrained
exports the backbone (pooled features). The directory is what tools/predict.py runs; its
inference.yml holds the config's val transforms, so inference needs no training config.
--format onnx writes model.onnx (for onnxruntime and any ONNX runtime) instead of the Paddle
graph and weights, beside the same inference.yml.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from passl.cli import ArgumentParser, add_config_arguments, load_run_config, run_cli  # noqa: E402
from passl.errors import UserError  # noqa: E402


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, config_help="YAML config the model was trained with")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--pretrained", metavar="W", help="backbone weights (.pdparams)")
    weights.add_argument("--load", metavar="CKPT",
                         help="whole-model checkpoint (epoch_N.pd, latest.pd) or state dict")
    parser.add_argument("--output", required=True, metavar="DIR", help="directory to write")
    parser.add_argument("--what", choices=("features", "logits"),
                        help="export pooled backbone features or class logits (default: logits "
                             "with --load of a classifier, else features)")
    parser.add_argument("--batch-size", type=int, metavar="B",
                        help="fixed batch size (default: dynamic)")
    parser.add_argument("--format", dest="model_format", choices=("paddle", "onnx"),
                        default="paddle",
                        help="paddle: a Paddle Inference graph + weights (default); onnx: "
                             "model.onnx for onnxruntime and other ONNX runtimes (needs "
                             "pip install -e \".[onnx]\")")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for flag, path in (("--pretrained", args.pretrained), ("--load", args.load)):
        if path and not os.path.isfile(path):
            raise UserError(f"{flag} {path}: file not found")
    cfg = load_run_config(args)
    from passl.utils.logger import setup_logger
    setup_logger()  # the one-line notes of loading (e.g. a PASSL v1 file) on the console
    from passl.deploy.export import export_model
    from passl.runtime import select_device
    # The export is checked against the model's dygraph output at 1e-5 relative; on a GPU that
    # reference would use TF32 (Paddle's default on Ampere and newer, 1e-4..1e-3 off), so the
    # model is built and run on the CPU, like the predictor that checks it.
    select_device("cpu")
    result = export_model(cfg, args.output, pretrained=args.pretrained, load=args.load,
                          what=args.what, batch_size=args.batch_size, overwrite=args.overwrite,
                          model_format=args.model_format)
    classes = f", {result['classes']} class names" if result["classes"] else ""
    print(f"exported {result['output']} for input {result['input_shape']} to {args.output} "
          f"({os.path.basename(result['meta'])}{classes}); max relative difference to "
          f"dygraph {result['relative_error']:.1e}")
    return 0


if __name__ == "__main__":
    run_cli(main)
