"""Run the built-in demo end to end: SwAV features against random init and raw pixels.

    python tools/run_demo.py                      # 5 min on 2 quiet cores
    python tools/run_demo.py --epochs 1 --linear-epochs 1 --finetune-epochs 1 --output-dir /tmp/demo
    python tools/run_demo.py --pictures-dir docs/images   # the README's pictures (docs/visualize.md)

Steps (each one the README's command, run as a subprocess whose progress is shown as it
runs): pretrain with configs/swav/swav_r18_digits.yaml and extract the backbone; then, for
the SwAV backbone and for the same backbone at random init (same seed, same protocol), kNN,
a linear classifier on the frozen backbone (swav_clas_r18_digits.yaml) and fine-tuning of
the whole network (swav_semisup_r18_digits.yaml), each with all 1,442 training labels and
with 5 labels per class; finally raw pixels, with the same kNN and a logistic regression
(scikit-learn). Prints one table of val top-1 accuracies. Also draws what SwAV learned
(tools/visualize.py) into OUTPUT_DIR/pictures or --pictures-dir.
"""
import collections
import json
import logging
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from passl.cli import ArgumentParser, run_cli  # noqa: E402
from passl.errors import UserError  # noqa: E402

CONFIGS = os.path.join(ROOT, "configs", "swav")
PRETRAIN_CFG = os.path.join(CONFIGS, "swav_r18_digits.yaml")
CLAS_CFG = os.path.join(CONFIGS, "swav_clas_r18_digits.yaml")
FINETUNE_CFG = os.path.join(CONFIGS, "swav_semisup_r18_digits.yaml")
FEW = 5  # labels per class of the low-shot columns (swav_semisup_r18_digits.yaml's subset)

#: ``-o`` overrides that select the labels: (column, {protocol: overrides}). The fine-tuning
#: config holds the 5-per-class subset; the kNN and linear configs use every label.
LABELS = (
    ("all labels", {
        "kNN": [],
        "linear": [],
        "fine-tune": ["dataloader.train.dataset.subset=null",
                      "dataloader.train.sampler.batch_size=64", "epochs=15"],
    }),
    (f"{FEW} per class", {
        "kNN": [f"+dataloader.train.dataset.subset.per_class={FEW}"],
        "linear": [f"+dataloader.train.dataset.subset.per_class={FEW}",
                   "dataloader.train.sampler.batch_size=10"],
        "fine-tune": [],
    }),
)
PROTOCOLS = ("kNN", "linear", "fine-tune")
#: A progress line of tools/train.py at the end of an epoch, and an evaluation line.
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+) iter (\d+)/(\d+) loss (\S+) .*?eta (\S+)")
EVAL_LINE = re.compile(r"evaluation after epoch (\d+): (.*)")


def parse_args(argv):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", default="output/demo", help="where every step writes")
    parser.add_argument("--epochs", type=int, help="pretraining epochs (default: the config's)")
    parser.add_argument("--linear-epochs", type=int, help="linear epochs (default: the config's)")
    parser.add_argument("--pictures-dir", help="where the PNGs go (default: OUTPUT_DIR/pictures)")
    parser.add_argument("--finetune-epochs", type=int,
                        help="fine-tuning epochs, both label columns (default: the configs')")
    return parser.parse_args(argv)


def progress_of(line):
    """A short progress note for a tool's log line, or None: every evaluation, and the end
    of every tenth of the epochs (and of the last one)."""
    epoch = EPOCH_LINE.search(line)
    if epoch and epoch.group(3) == epoch.group(4):
        done, total, _, _, loss, eta = epoch.groups()
        if int(done) % max(1, int(total) // 10) and done != total:
            return None
        return f"epoch {done}/{total}  loss {float(loss):.3f}  about {eta} left"
    evaluation = EVAL_LINE.search(line)
    if evaluation:
        return f"after epoch {evaluation.group(1)}: {evaluation.group(2)}"
    return None


def run_step(name, script, *args):
    """Run one tool, printing its progress as it comes; returns its wall time in seconds.

    A failing step stops the demo with the last line its output had.
    """
    print(f"- {name} ...", flush=True)
    start = time.time()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", script), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = collections.deque(maxlen=1)
    for line in proc.stdout:
        if line.strip():
            tail.append(line.strip())
        note = progress_of(line)
        if note:
            print(f"    {note}", flush=True)
    if proc.wait():
        raise UserError(f"demo step '{name}' failed ({script} exit {proc.returncode}): "
                        f"{tail[-1] if tail else '(no output)'}")
    seconds = time.time() - start
    print(f"  done in {seconds:.0f} s", flush=True)
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


def evaluate_backbone(out, tag, label, init_args, epoch_opts):
    """kNN, linear and fine-tune top-1 of one backbone ('swav' or 'random') for every label
    column: ``{(column, protocol): top-1}``."""
    results = {}
    for column, overrides in LABELS:
        slug = "all" if column == "all labels" else f"{FEW}shot"
        for protocol, script, cfg, key in (("kNN", "knn_eval.py", CLAS_CFG, "knn_top1"),
                                           ("linear", "train.py", CLAS_CFG, "top1"),
                                           ("fine-tune", "train.py", FINETUNE_CFG, "top1")):
            step_dir = os.path.join(out, f"{protocol.replace('-', '')}_{tag}_{slug}")
            flags = [flag for value in overrides[protocol] for flag in ("-o", value)]
            run_step(f"{protocol}, {label}, {column}", script, "-c", cfg,
                     "-o", f"output_dir={step_dir}", *flags,
                     *epoch_opts.get(protocol, []), *init_args)
            results[(column, protocol)] = last_record(step_dir, key)[key]
    return results


def raw_pixels():
    """Raw-pixel kNN and logistic regression for every label column (in this process)."""
    from passl.config import load_config
    from passl.evaluation.pixel_baselines import raw_pixel_baselines
    from passl.utils.logger import get_logger

    print("- raw pixels: kNN and logistic regression ...", flush=True)
    get_logger().setLevel(logging.WARNING)  # the dataset's "labelled subset" note: said above
    results = {}
    for column, overrides in LABELS:
        scores = raw_pixel_baselines(load_config(CLAS_CFG, overrides["kNN"]))
        results[(column, "kNN")] = scores["knn_top1"]
        results[(column, "linear")] = scores["logreg_top1"]
    return results


def format_table(rows):
    """The demo's table: one row per features, kNN/linear/fine-tune per label column.

    ``rows`` is ``[(name, {(column, protocol): top-1})]``; a missing entry prints as '-'.
    """
    width = 10
    columns = [column for column, _ in LABELS]
    lines = ["val top-1 (%)".ljust(14) + "".join(c.center(width * 3) for c in columns),
             "features".ljust(14) + "".join(p.rjust(width) for p in PROTOCOLS) * len(columns)]
    for name, scores in rows:
        cells = [scores.get((column, protocol)) for column in columns for protocol in PROTOCOLS]
        lines.append(name.ljust(14) + "".join(
            ("-" if value is None else f"{value:.2f}").rjust(width) for value in cells))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    out = os.path.abspath(args.output_dir)
    pretrain_dir, weights = os.path.join(out, "pretrain"), os.path.join(out, "backbone.pdparams")
    pretrain_opts = ["-o", f"output_dir={pretrain_dir}"]
    pretrain_opts += ["-o", f"epochs={args.epochs}"] if args.epochs else []
    epoch_opts = {"linear": ["-o", f"epochs={args.linear_epochs}"] if args.linear_epochs else [],
                  "fine-tune": ["-o", f"epochs={args.finetune_epochs}"]
                  if args.finetune_epochs else []}

    print(f"PASSL-SwAV demo, output in {out}", flush=True)
    start = time.time()
    pretrain_seconds = run_step("SwAV pretraining", "train.py", "-c", PRETRAIN_CFG,
                                *pretrain_opts)
    run_step("extract the backbone", "extract_weight.py",
             os.path.join(pretrain_dir, "checkpoints", "latest.pd"), "--output", weights,
             "--remove-prefix")
    write_pictures(pretrain_dir, args.pictures_dir or os.path.join(out, "pictures"))
    rows = [("SwAV", evaluate_backbone(out, "swav", "SwAV", ["--pretrained", weights],
                                       epoch_opts)),
            ("random init", evaluate_backbone(out, "random", "random init", [], epoch_opts)),
            ("raw pixels", raw_pixels())]

    print("\n" + format_table(rows))
    print(f"\nTop-1 on the 355 val digits. kNN: k=20 cosine vote (T=0.07), the train images as "
          f"the bank.\nlinear: a linear layer on the frozen backbone (raw pixels: logistic "
          f"regression). fine-tune: the whole network.\n{FEW} per class: the same 50 images for "
          f"every row. Pretraining took {pretrain_seconds / 60:.1f} min, the whole demo "
          f"{(time.time() - start) / 60:.1f} min.")
    return 0


if __name__ == "__main__":
    run_cli(main)
