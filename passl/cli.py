"""Shared command-line plumbing: user errors become one ``error: ...`` line.

A :class:`~passl.errors.UserError` (bad flag, key, name, missing file) exits with
status 2 and a single line on stderr saying what to do; ``--debug`` or
``PASSL_DEBUG=1`` re-raises it with the full traceback for developers. Other
exceptions are bugs and keep their traceback.
"""
import argparse
import os
import sys

from passl.errors import UserError
from passl.registry import did_you_mean

DEBUG_ENV = "PASSL_DEBUG"


def other_spelling(flag):
    """``--remove-prefix`` <-> ``--remove_prefix`` (None for flags with neither in the name)."""
    name = flag[2:]
    if not flag.startswith("--") or ("-" not in name and "_" not in name):
        return None
    return "--" + (name.replace("-", "_") if "-" in name else name.replace("_", "-"))


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a ``--debug`` flag and one-line errors in our format.

    Every long flag is accepted with dashes and with underscores (``--remove-prefix`` and
    ``--remove_prefix``); help and docs show the spelling the tool declares. The module
    docstring of a tool (its usage examples and output locations) is shown by ``--help``.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, allow_abbrev=False, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help=f"show full tracebacks (same as {DEBUG_ENV}=1)")

    def add_argument(self, *flags, **kwargs):
        action = super().add_argument(*flags, **kwargs)
        for flag in flags:
            alias = other_spelling(flag)
            if alias and alias not in self._option_string_actions:
                self._option_string_actions[alias] = action  # accepted, not shown in --help
        return action

    def parse_args(self, args=None, namespace=None):
        """Unknown flags are reported first, with the closest known one (argparse would
        complain about a missing required flag instead when the typo is in that flag)."""
        args = sys.argv[1:] if args is None else args
        known = self._option_string_actions
        for arg in args:
            flag = arg.split("=", 1)[0]
            if flag.startswith("--") and flag not in known:
                self.error(f"unrecognized argument {flag}{did_you_mean(flag, known)}")
        return super().parse_args(args, namespace)

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def add_config_arguments(parser, config_help="YAML config file", required=True):
    """The ``-c/--config`` and repeatable ``-o/--override`` flags every config-driven tool has."""
    parser.add_argument("-c", "--config", required=required, help=config_help)
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted path, YAML value); repeatable; "
                             "+KEY=VALUE adds a key that the config does not have, ~KEY deletes one")


def add_trust_file_argument(parser):
    """``--trust-file`` (also ``--trust_file``): the loud escape hatch of
    :func:`passl.io.paddle_file.load_paddle_file` for a file its safe reader refuses."""
    parser.add_argument("--trust-file", "--trust_file", dest="trust_file", action="store_true",
                        help="read weights/checkpoint files with paddle.load, which runs any code "
                             "a file contains (default: only plain tensors and values are read); "
                             "only for files from a source you trust")


def load_run_config(args):
    """The config of ``args.config`` with ``args.override``, with the CPU thread settings
    applied before Paddle loads (see :mod:`passl.runtime`)."""
    from passl.config import load_config
    cfg = load_config(args.config, args.override)
    from passl.runtime import configure_cpu_threads
    configure_cpu_threads(cfg.get("threads", "auto"))
    return cfg


def debugging(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_cli(main, argv=None):
    """Call ``main(argv)``; turn UserError into ``error: ...`` on stderr and exit code 2."""
    try:
        code = main(argv)
    except UserError as e:
        if debugging(argv):
            raise
        message = " ".join(str(e).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:
        # a tool may say in the interrupt what survives (tools/train.py: the last checkpoint)
        print(f"error: interrupted{'; ' + str(interrupt) if str(interrupt) else ''}",
              file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
