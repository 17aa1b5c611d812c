"""Run the built-in demo end to end and compare SwAV features with a random-init backbone.

    python tools/run_demo.py                      # pretrain, extract, kNN and linear, ~4 min on 2 cores
    python tools/run_demo.py --epochs 1 --linear-epochs 1 --output-dir /tmp/demo   # a smoke run
    python tools/run_demo.py --pictures-dir docs/images   # the README's pictures (docs/visualize.md)

Steps (each one the README's command, run as a subprocess so this script only orchestrates):
pretrain with configs/swav/swav_r18_digits.yaml, extract the backbone, kNN and linear
evaluation with configs/swav/swav_clas_r18_digits.yaml for the SwAV backbone and for the same
backbone at random init (same seed, same protocol). Prints a table and the two bars of the
demo: SwAV kNN top-1 >= random kNN top-1 + 3 points, SwAV linear top-1 >= random linear top-1.
Also draws what SwAV learned (tools/visualize.py) into OUTPUT_DIR/pictures or --pictures-dir.
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from passl.cli import ArgumentParser, run_cli  # noqa: E402
from passl.errors import UserError  # noqa: E402

PRETRAIN_CFG = os.path.join(ROOT, "configs", "swav", "swav_r18_digits.yaml")
CLAS_CFG = os.path.join(ROOT, "configs", "swav", "swav_clas_r18_digits.yaml")
KNN_MARGIN = 3.0  # points the SwAV kNN top-1 must add over random init


def parse_args(argv):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", default="output/demo", help="where every step writes")
    parser.add_argument("--epochs", type=int, help="pretraining epochs (default: the config's)")
    parser.add_argument("--linear-epochs", type=int, help="linear epochs (default: the config's)")
    parser.add_argument("--pictures-dir", help="where the PNGs go (default: OUTPUT_DIR/pictures)")
    return parser.parse_args(argv)


def run_step(name, script, *args):
    """Run one tool; returns its wall time. A failing step stops the demo with its stderr tail."""
    start = time.time()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", script), *args],
                          capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"demo step '{name}' failed ({script} exit {proc.returncode}): {tail}")
    seconds = time.time() - start
    print(f"  {name:<28} {seconds:6.1f} s", flush=True)
    return seconds


def write_pictures(pretrain_dir, pictures_dir):
    """Prototype gallery, assignment health over the run's checkpoints and the feature maps of
    SwAV vs random init, from the pretraining run (tools/visualize.py, docs/visualize.md)."""
    latest = os.path.join(pretrain_dir, "checkpoints", "latest.pd")
    for name, verb, source in (("prototype gallery", "prototypes", ["--load", latest]),
                               ("assignment health", "usage", ["--run", pretrain_dir]),
                               ("feature maps", "features", ["--load", latest])):
        run_step(name, "visualize.py", verb, "-c", PRETRAIN_CFG, *source,
                 "--output", os.path.join(pictures_dir, f"demo_{verb}.png"))


def last_record(output_dir, key):
    """The last metrics.jsonl record of ``output_dir`` that has ``key``."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    matching = [r for r in records if key in r]
    if not matching:
        raise UserError(f"{output_dir}/metrics.jsonl has no record with {key!r}")
    return matching[-1]


def main(argv=None):
    args = parse_args(argv)
    out = os.path.abspath(args.output_dir)
    pretrain_dir, weights = os.path.join(out, "pretrain"), os.path.join(out, "backbone.pdparams")
    pretrain_opts = ["-o", f"output_dir={pretrain_dir}"]
    pretrain_opts += ["-o", f"epochs={args.epochs}"] if args.epochs else []
    linear_opts = ["-o", f"epochs={args.linear_epochs}"] if args.linear_epochs else []

    print(f"PASSL-SwAV demo, output in {out}")
    times = {"pretrain": run_step("SwAV pretraining", "train.py", "-c", PRETRAIN_CFG, *pretrain_opts)}
    run_step("extract backbone", "extract_weight.py",
             os.path.join(pretrain_dir, "checkpoints", "latest.pd"), "--output", weights,
             "--remove_prefix")
    write_pictures(pretrain_dir, args.pictures_dir or os.path.join(out, "pictures"))
    results = {}
    for init, extra in (("random init", []), ("SwAV", ["--pretrained", weights])):
        tag = "swav" if extra else "random"
        knn_dir, linear_dir = os.path.join(out, f"knn_{tag}"), os.path.join(out, f"linear_{tag}")
        run_step(f"kNN ({init})", "knn_eval.py", "-c", CLAS_CFG, "-o", f"output_dir={knn_dir}",
                 *extra)
        times[f"linear {tag}"] = run_step(f"linear ({init})", "train.py", "-c", CLAS_CFG,
                                          "-o", f"output_dir={linear_dir}", *linear_opts, *extra)
        results[init] = (last_record(knn_dir, "knn_top1")["knn_top1"],
                         last_record(linear_dir, "top1")["top1"])

    (rand_knn, rand_lin), (swav_knn, swav_lin) = results["random init"], results["SwAV"]
    print(f"\n{'backbone':<12} {'kNN top-1':>10} {'linear top-1':>13}")
    for init, (knn, lin) in results.items():
        print(f"{init:<12} {knn:>10.2f} {lin:>13.2f}")
    print(f"\npretraining {times['pretrain'] / 60:.1f} min, "
          f"linear {times['linear swav'] / 60:.1f} min")
    knn_ok, lin_ok = swav_knn >= rand_knn + KNN_MARGIN, swav_lin >= rand_lin
    print(f"bar kNN: SwAV {swav_knn:.2f} >= random {rand_knn:.2f} + {KNN_MARGIN:g}: "
          f"{'met' if knn_ok else 'MISSED'}")
    print(f"bar linear: SwAV {swav_lin:.2f} >= random {rand_lin:.2f}: "
          f"{'met' if lin_ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
