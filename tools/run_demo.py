"""Run the built-in demo end to end: pretrained features against random init and raw pixels.

    python tools/run_demo.py                      # about 5-10 min on 2 cores
    python tools/run_demo.py --epochs 1 --finetune-epochs 1 --draws 2 --output-dir /tmp/demo
    python tools/run_demo.py --pictures-dir docs/images   # the README's pictures (docs/visualize.md)
    python tools/run_demo.py --fresh              # pretrain again (the earlier run is kept aside)

Steps (each one a README command, run as a subprocess whose progress is shown): pretrain
every method of METHODS on the digits (tools/train.py) and extract its backbone
(tools/extract_weight.py); draw what SwAV learned (tools/visualize.py) into
OUTPUT_DIR/pictures or --pictures-dir; then the evaluation suite (tools/evaluate.py) on the
digits folder: each method's backbone, the same backbone at random init and the raw pixels,
with kNN, a linear probe and fine-tuning of the whole network, with all 1,442 training labels
and with 5 labels per class (mean ± std over 5 disjoint draws). It prints one table of val
top-1 accuracies and writes OUTPUT_DIR/evaluate/results.json and results.png.

Running it again reuses a finished pretraining whose config is the same (an unfinished one
is continued); a pretraining with another config stops the demo with one line offering
--fresh, which moves the earlier run to OUTPUT_DIR/pretrain_METHOD/previous_runs/ and
pretrains again.
"""
import collections
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from passl.cli import ArgumentParser, run_cli  # noqa: E402
from passl.errors import UserError  # noqa: E402

CONFIGS = os.path.join(ROOT, "configs")
#: Pretraining methods the demo compares: {row name: pretraining config on the digits}.
#: Every config must pretrain the backbone of CLAS_CFG.
METHODS = {
    "swav": os.path.join(CONFIGS, "swav", "swav_r18_digits.yaml"),
    "deepclusterv2": os.path.join(CONFIGS, "deepclusterv2", "deepclusterv2_r18_digits.yaml"),
}
#: The method whose run tools/visualize.py draws (prototype gallery, usage, feature maps).
PICTURED = "swav"
CLAS_CFG = os.path.join(CONFIGS, "swav", "swav_clas_r18_digits.yaml")
FINETUNE_CFG = os.path.join(CONFIGS, "swav", "swav_semisup_r18_digits.yaml")
FEW = 5  # labels per class of the low-shot columns (swav_semisup_r18_digits.yaml's recipe)
#: Fine-tuning with all 1,442 labels: a larger batch and fewer epochs than the 5-per-class
#: recipe (330 steps instead of 250).
FINETUNE_ALL = ("dataloader.train.sampler.batch_size=64", "epochs=15")
#: A progress line of tools/train.py at the end of an epoch, and an evaluation line.
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+) iter (\d+)/(\d+) loss (\S+) .*?eta (\S+)")
EVAL_LINE = re.compile(r"evaluation after epoch (\d+): (.*)")


def parse_args(argv):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", default="output/demo", help="where every step writes")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS),
                        help=f"pretraining methods to compare (default: {' '.join(METHODS)})")
    parser.add_argument("--epochs", type=int, help="pretraining epochs (default: the config's)")
    parser.add_argument("--finetune-epochs", type=int,
                        help="fine-tuning epochs, both label columns (default: the recipe's)")
    parser.add_argument("--draws", type=int, default=5,
                        help="disjoint draws of 5 labels per class (default 5)")
    parser.add_argument("--pictures-dir", help="where the PNGs go (default: OUTPUT_DIR/pictures)")
    parser.add_argument("--fresh", "--archive-old-run", dest="fresh", action="store_true",
                        help="pretrain again even when a finished pretraining is there; the "
                             "earlier run is moved to previous_runs/ of its folder")
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


def pretraining_plan(config_path, overrides, run_dir, fresh):
    """What to do about ``run_dir``: ``('reuse' | 'resume' | 'start', extra train.py flags)``.

    A finished run (its last epoch's checkpoint is there) with the same resolved config is
    reused, an unfinished one with the same config continued; another config stops here with
    one line, unless ``fresh`` (the earlier run is archived by train.py).
    """
    import yaml
    from passl.config import load_config, to_plain
    from passl.io.checkpoint import checkpoint_dir, epoch_checkpoints, latest_checkpoint

    if not latest_checkpoint(run_dir):
        return "start", []
    if fresh:
        return "start", ["--archive-old-run"]
    wanted = to_plain(load_config(config_path, overrides))
    saved_path = os.path.join(run_dir, "config.yaml")
    saved = None
    if os.path.isfile(saved_path):
        with open(saved_path) as f:
            saved = yaml.safe_load(f)
    if saved != wanted:
        changed = sorted(key for key in set(wanted) | set(saved or {})
                         if (saved or {}).get(key) != wanted.get(key))
        raise UserError(f"{run_dir} holds a pretraining with another config (differs in: "
                        f"{', '.join(changed) or 'config.yaml missing'}); pass --fresh to move "
                        f"it aside and pretrain again, or --output-dir NEW_DIR")
    done = [epoch for epoch, _ in epoch_checkpoints(checkpoint_dir(run_dir))]
    if done and done[-1] >= wanted["epochs"]:
        return "reuse", []
    return "resume", ["--resume", "auto"]


def pretrain(method, out, epochs, fresh):
    """Pretrain ``method`` into OUT/pretrain_METHOD (or reuse it) and extract its backbone;
    returns ``(run folder, weights file, pretraining seconds or None when reused)``."""
    config_path = METHODS[method]
    run_dir = os.path.join(out, f"pretrain_{method}")
    overrides = [f"output_dir={run_dir}"] + ([f"epochs={epochs}"] if epochs else [])
    action, flags = pretraining_plan(config_path, overrides, run_dir, fresh)
    seconds = None
    if action == "reuse":
        print(f"- {method} pretraining: reusing the finished run in {run_dir} (same config; "
              f"--fresh pretrains again)", flush=True)
    else:
        label = f"{method} pretraining" + (" (continued)" if action == "resume" else "")
        seconds = run_step(label, "train.py", "-c", config_path,
                           *[flag for o in overrides for flag in ("-o", o)], *flags)
    weights = os.path.join(out, f"{method}_backbone.pdparams")
    run_step(f"extract the {method} backbone", "extract_weight.py",
             os.path.join(run_dir, "checkpoints", "latest.pd"), "--output", weights,
             "--remove-prefix")
    return run_dir, weights, seconds


def write_pictures(config_path, pretrain_dir, pictures_dir):
    """Prototype gallery, assignment health over the run's checkpoints and the feature maps of
    SwAV vs random init, from the pretraining run (tools/visualize.py, docs/visualize.md)."""
    latest = os.path.join(pretrain_dir, "checkpoints", "latest.pd")
    for name, verb, source in (("prototype gallery", "prototypes", ["--load", latest]),
                               ("assignment health", "usage", ["--run", pretrain_dir]),
                               ("feature maps", "features", ["--load", latest])):
        run_step(name, "visualize.py", verb, "-c", config_path, *source,
                 "--output", os.path.join(pictures_dir, f"demo_{verb}.png"))


def evaluate(out, weights, draws, finetune_epochs):
    """The evaluation suite on the digits folder (tools/evaluate.py), its output shown as
    it comes; returns its wall time in seconds."""
    from passl.data.datasets import materialise_digits

    digits = materialise_digits("~/.cache/passl/digits", 32)  # Digits' default cache_dir
    args = ["--data", digits, "-c", CLAS_CFG, "--shots", str(FEW),
            "--draws", str(draws), "--finetune", FINETUNE_CFG,
            "--output", os.path.join(out, "evaluate"),
            "--pretrained", *[f"{method}={path}" for method, path in weights.items()]]
    epochs = [f"epochs={finetune_epochs}"] if finetune_epochs else []
    for override in epochs:
        args += ["--finetune-override", override]
    for override in FINETUNE_ALL + tuple(epochs):  # --finetune-epochs wins over the 15 epochs
        args += ["--finetune-all-override", override]
    print("- evaluation suite (tools/evaluate.py) ...", flush=True)
    start = time.time()
    code = subprocess.call([sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), *args])
    if code:
        raise UserError(f"demo step 'evaluation suite' failed (evaluate.py exit {code}); its "
                        f"error is above")
    return time.time() - start


def main(argv=None):
    args = parse_args(argv)
    out = os.path.abspath(args.output_dir)
    print(f"PASSL-SwAV demo, output in {out}", flush=True)
    start = time.time()
    weights, timings = {}, []
    for method in args.methods:
        run_dir, weights[method], seconds = pretrain(method, out, args.epochs, args.fresh)
        if seconds is not None:
            timings.append(f"{method} pretraining took {seconds / 60:.1f} min")
        if method == PICTURED:
            write_pictures(METHODS[method], run_dir,
                           args.pictures_dir or os.path.join(out, "pictures"))
    evaluate(out, weights, args.draws, args.finetune_epochs)
    print(f"Top-1 on the 355 val digits. kNN: k=20 cosine vote (T=0.07), the labelled train "
          f"images as the bank. linear: logistic regression on the frozen pooled features "
          f"(raw pixels: on the pixels). fine-tune: the whole network "
          f"({os.path.relpath(FINETUNE_CFG, ROOT)}). {FEW} per class: mean±std over "
          f"{args.draws} disjoint draws, the same draws for every row. "
          + "; ".join(timings + [f"the whole demo {(time.time() - start) / 60:.1f} min"])
          + ".")
    return 0


if __name__ == "__main__":
    run_cli(main)
