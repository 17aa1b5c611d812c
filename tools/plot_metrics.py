"""Plot loss, learning rate, prototypes used (SwAV) and top-1 / kNN top-1 curves of a run as a PNG.

    python tools/plot_metrics.py OUTPUT_DIR                 # writes OUTPUT_DIR/metrics.png
    python tools/plot_metrics.py OUTPUT_DIR --output curves.png

Needs matplotlib: pip install -e .[plot]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from passl.cli import ArgumentParser, run_cli  # noqa: E402


def parse_args(argv):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("run", metavar="OUTPUT_DIR",
                        help="a run's output_dir (or its metrics.jsonl file)")
    parser.add_argument("--output", help="PNG to write (default: metrics.png next to metrics.jsonl)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from passl.utils.plot_metrics import METRICS_FILE, plot_metrics
    metrics = args.run if os.path.isfile(args.run) else os.path.join(args.run, METRICS_FILE)
    output = args.output or os.path.join(os.path.dirname(metrics), "metrics.png")
    curves = plot_metrics(metrics, output)
    print(f"wrote {output} ({', '.join(curves)})")
    return 0


if __name__ == "__main__":
    run_cli(main)
