"""Predict with an exported model (tools/export_model.py) on image files or folders.

    python tools/predict.py inference/digits img1.png img2.png --topk 3
    python tools/predict.py inference/r50_features photos/ --features features.npy

Either kind of export runs: a Paddle one with Paddle Inference, an ONNX one (--format onnx)
with onnxruntime; the output is the same. A classifier export prints one line per image: the file, then the top-k class names with
their probabilities. --features OUT.npy writes the model's outputs instead (pooled features
for a backbone export, logits for a classifier), one float32 row per image, and the image
paths in row order to OUT.txt. Unreadable images are reported by name and skipped.

A model directory is a program: its graph runs only when every operator in it is one
export_model.py writes (--trust-model for a model made elsewhere; operators that touch files
are refused always), and inference.yml is checked before anything is allocated from it.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from passl.cli import ArgumentParser, run_cli  # noqa: E402
from passl.errors import UserError  # noqa: E402


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", metavar="DIR",
                        help="directory written by export_model.py (Paddle or --format onnx)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders")
    parser.add_argument("--topk", type=int, default=5, help="classes printed per image (5)")
    parser.add_argument("--features", metavar="OUT.npy",
                        help="write the outputs (+ OUT.txt, the file list) instead of printing")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="images per run for a dynamic-batch export (16)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"),
                        help="Paddle Inference or onnxruntime device (auto: GPU when the "
                             "runtime sees one)")
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16"),
                        help="bfloat16: oneDNN on CPUs with AVX512-BF16, ~2x faster, "
                             "~1e-2 relative error (default float32)")
    parser.add_argument("--trust-model", action="store_true",
                        help="run a graph with operators tools/export_model.py does not write "
                             "(a model made elsewhere): it runs with your rights, so only for "
                             "a source you trust; operators that read or write files stay "
                             "refused")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.topk < 1 or args.batch_size < 1:
        raise UserError(f"--topk and --batch-size must be positive, got {args.topk} and "
                        f"{args.batch_size}")
    if args.features and not args.features.endswith(".npy"):
        raise UserError(f"--features {args.features}: feature files end in .npy "
                        f"(e.g. --features features.npy)")
    from passl.runtime import configure_cpu_threads
    configure_cpu_threads()
    from passl.deploy.predict import Predictor, list_images, write_features
    if args.trust_model:
        print(f"warning: --trust-model: running the graph in {args.model_dir} without checking "
              f"its operators; it runs with your rights", file=sys.stderr, flush=True)
    predictor = Predictor(args.model_dir, device=args.device, batch_size=args.batch_size,
                          precision=args.precision, trust_model=args.trust_model)
    if predictor.meta["output"] == "features" and not args.features:
        raise UserError(f"model dir {args.model_dir}: this export outputs features, not "
                        f"classes; pass --features OUT.npy to write them")
    files = list_images(args.inputs)
    kept, outputs = predictor.predict_files(files)
    if args.features:
        list_path = write_features(args.features, kept, outputs)
        print(f"wrote {outputs.shape[0]} x {outputs.shape[1]} {predictor.meta['output']} to "
              f"{args.features} (file list {list_path}); skipped {len(files) - len(kept)}")
        return 0
    for path, top in zip(kept, predictor.top_k(outputs, args.topk)):
        print(f"{path}: " + " | ".join(f"{label} {p:.3f}" for label, p in top))
    return 0


if __name__ == "__main__":
    run_cli(main)
