"""Train or evaluate from a YAML config.

examples:
    python tools/train.py -c configs/swav/swav_r18_digits.yaml [-o key.path=value ...]
    python -m paddle.distributed.launch --nproc_per_node 2 tools/train.py -c CFG
    python tools/train.py -c CFG --resume auto            # newest readable checkpoint in output_dir
    python tools/train.py -c CLS_CFG --pretrained backbone.pdparams
    python tools/train.py -c CLS_CFG --load CKPT --evaluate-only

output (in the config's output_dir, relative paths from the current directory):
    config.yaml            the resolved config of the run
    train.log              the log (train.rankN.log for the other processes)
    metrics.jsonl          one JSON record per logged step, evaluation and run summary
    checkpoints/           epoch_N.pd and latest.pd (resume with --resume auto)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from passl.cli import (ArgumentParser, add_config_arguments, add_trust_file_argument,  # noqa: E402
                       load_run_config, run_cli)
from passl.errors import UserError  # noqa: E402


def parse_args(argv):
    parser = ArgumentParser(description=__doc__)
    add_config_arguments(parser)
    parser.add_argument("--resume", metavar="PATH|auto",
                        help="continue from a checkpoint, or 'auto' for the newest readable one in "
                             "output_dir")
    parser.add_argument("--pretrained", metavar="PATH",
                        help="backbone weights (.pdparams) to start from")
    parser.add_argument("--pretrained-nonstrict", action="store_true",
                        help="load only the --pretrained tensors that fit the backbone "
                             "(default: any missing, unexpected or mis-shaped tensor is an error)")
    parser.add_argument("--load", metavar="PATH",
                        help="whole-model weights: a checkpoint or a model state dict")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="evaluate the --load weights on the val set and exit")
    parser.add_argument("--as-built", action="store_true",
                        help="with --evaluate-only and no --load: evaluate the model as the config "
                             "builds it (random init, or --pretrained backbone with an untrained "
                             "head), e.g. as a baseline")
    parser.add_argument("--archive-old-run", action="store_true",
                        help="start afresh in an output_dir that holds another run: move that "
                             "run's files into output_dir/previous_runs/<time>/ first")
    add_trust_file_argument(parser)
    return parser.parse_args(argv)


def check_flags(args):
    if args.resume and (args.pretrained or args.load):
        raise UserError("--resume restores the whole run; do not combine it with "
                        "--pretrained or --load")
    if args.resume and args.evaluate_only:
        raise UserError("--evaluate-only scores weights, it does not continue a run: pass the "
                        "checkpoint with --load instead of --resume")
    if args.resume and args.archive_old_run:
        raise UserError("--archive-old-run starts a new run; do not combine it with --resume")
    if args.evaluate_only and not args.load and not args.as_built:
        raise UserError("--evaluate-only needs trained weights: add --load CKPT (a checkpoint "
                        "or model state dict); to score the model as the config builds it "
                        "(random init or --pretrained backbone), add --as-built")
    if args.as_built and not args.evaluate_only:
        raise UserError("--as-built only applies to --evaluate-only")
    for flag, path in (("--pretrained", args.pretrained), ("--load", args.load),
                       ("--resume", None if args.resume == "auto" else args.resume)):
        if path and not os.path.exists(path):
            raise UserError(f"{flag} {path}: file not found")


def main(argv=None):
    args = parse_args(argv)
    check_flags(args)
    cfg = load_run_config(args)  # loads Paddle, so the signal handlers below replace its own
    from passl.io.checkpoint import RunAlreadyComplete
    from passl.engine.continuation import how_to_continue
    from passl.engine.trainer import Trainer
    from passl.preemption import interrupt_on_stop_signals
    interrupt_on_stop_signals()
    try:
        trainer = Trainer(cfg, resume=args.resume, pretrained=args.pretrained, load=args.load,
                          pretrained_strict=not args.pretrained_nonstrict,
                          evaluate_only=args.evaluate_only,
                          archive_old_run=args.archive_old_run, trust_file=args.trust_file)
        if args.evaluate_only:
            trainer.evaluate()
            return 0
        return train_until_stopped(trainer)
    except RunAlreadyComplete as complete:  # nothing to do, and nothing written
        print(complete)
        return 0
    except KeyboardInterrupt:  # a second Ctrl-C: say what survives (run_cli prints it)
        if args.evaluate_only:
            raise
        raise KeyboardInterrupt(how_to_continue(cfg.get("output_dir") or "output")) from None


def train_until_stopped(trainer):
    """``trainer.train()``; a run stopped by a signal (exit status ``STOPPED_STATUS``) or by its
    surroundings (a full disk, a killed data worker) ends with one line saying how to continue."""
    from passl.engine.continuation import how_to_continue, training_command
    from passl.errors import ResumableError
    from passl.preemption import STOPPED_STATUS, TrainingStopped
    try:
        trainer.train()
    except TrainingStopped as stopped:
        print(f"{stopped}; continue with: {training_command()}", file=sys.stderr)
        return STOPPED_STATUS
    except ResumableError as error:
        raise UserError(f"{error}; {how_to_continue(trainer.output_dir)}") from None
    return 0


if __name__ == "__main__":
    run_cli(main)
