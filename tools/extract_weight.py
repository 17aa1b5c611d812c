"""Write the backbone tensors of a training checkpoint to a weights file (.pdparams).

    python tools/extract_weight.py OUTPUT_DIR/checkpoints/latest.pd --output backbone.pdparams --remove-prefix

The weights file feeds `tools/train.py --pretrained` and `tools/knn_eval.py --pretrained`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from passl.cli import ArgumentParser, add_trust_file_argument, run_cli  # noqa: E402


def parse_args(argv):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", help="a training checkpoint (checkpoints/epoch_N.pd or "
                                           "latest.pd; a PASSL v1 epoch_N.pdparams too)")
    parser.add_argument("--output", required=True, help="weights file to write, ending in .pdparams")
    parser.add_argument("--prefix", default="backbone",
                        help="keep the model tensors named PREFIX.* (default: backbone)")
    parser.add_argument("--remove-prefix", action="store_true",
                        help="drop 'PREFIX.' from the names, as --pretrained expects")
    add_trust_file_argument(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import passl.models  # noqa: F401  (registers the PASSL v1 layout the reader recognises)
    from passl.io.weights import extract_weights
    written = extract_weights(args.checkpoint, args.output, args.prefix, args.remove_prefix,
                              trust=args.trust_file)
    if written["recognised"]:
        print(written["recognised"])
    print(f"wrote {written['tensors']} tensors ({written['values']:,} values) "
          f"under '{args.prefix}.' to {written['output']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
