"""Check in about a minute that this machine can train (one line per check, ok or FAILED).

    python tools/doctor.py                      # CPU: build, /dev/shm, a SwAV step, resume, gloo
    python tools/doctor.py --gpus 0,1           # + cards and memory, a step per card, NCCL, SyncBN
    python tools/doctor.py -c CFG --gpus 0,1    # the config's AMP, optimizer and loader settings

Exit status 0 only when every check is ok (1 otherwise, 2 for a bad flag or config).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from passl.cli import ArgumentParser, load_run_config, run_cli  # noqa: E402
from passl.errors import UserError  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "swav", "swav_r50_100ep.yaml")


def parse_gpus(text):
    try:
        gpus = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        gpus = None
    if not gpus or min(gpus) < 0 or len(set(gpus)) != len(gpus):
        raise UserError(f"--gpus {text}: expected distinct card numbers such as 0,1")
    return gpus


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                        help="config whose amp, optimizer and train loader are checked "
                             "(default configs/swav/swav_r50_100ep.yaml)")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted path, YAML value); repeatable")
    parser.add_argument("--gpus", help="cards to check, e.g. 0,1 (default: CPU only)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a rank of the two-rank checks
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from passl import doctor
    if args.worker:
        doctor.collective_worker(args.worker)
        return 0
    gpus = parse_gpus(args.gpus) if args.gpus else []
    return 1 if doctor.run(load_run_config(args), gpus) else 0


if __name__ == "__main__":
    run_cli(main)
