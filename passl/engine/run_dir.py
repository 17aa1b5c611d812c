"""One run, one folder: a new run never mixes its files with another run's.

A fresh start (no ``--resume``) in an ``output_dir`` that holds checkpoints of another run
stops with one line offering ``--resume auto``, another ``output_dir`` or
``--archive-old-run``; the latter moves the old run's files into
``output_dir/previous_runs/<time>/`` once the new run has been built.
"""
import datetime
import os
import shutil

from passl.errors import UserError
from passl.io import checkpoint

#: What a training run writes into its output_dir (and what --archive-old-run moves).
RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.previous.jsonl", "metrics.png",
             "checkpoints", "visualdl")
ARCHIVE_DIR = "previous_runs"


def existing_checkpoints(output_dir):
    """Checkpoint files of an earlier run in ``output_dir`` (empty when there are none)."""
    directory = checkpoint.checkpoint_dir(output_dir)
    if not os.path.isdir(directory):
        return []
    return sorted(name for name in os.listdir(directory) if name.endswith(".pd"))


def check_fresh_start(output_dir, archive_old_run=False):
    """Refuse to start a new run over another run's checkpoints (see module doc)."""
    found = existing_checkpoints(output_dir)
    if found and not archive_old_run:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise UserError(f"output_dir {output_dir} already holds a run (checkpoints/{shown}); "
                        f"continue it with --resume auto, start elsewhere with "
                        f"-o output_dir=NEW_DIR, or pass --archive-old-run to move it aside")


def _run_files(output_dir):
    names = [n for n in os.listdir(output_dir) if n in RUN_FILES
             or (n.startswith("train") and n.endswith(".log"))]
    return sorted(names)


def archive_run(output_dir):
    """Move the run files of ``output_dir`` to ``previous_runs/<time>/``; returns that
    folder, or None when there was nothing to move."""
    if not os.path.isdir(output_dir):
        return None
    names = _run_files(output_dir)
    if not names:
        return None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = os.path.join(output_dir, ARCHIVE_DIR, stamp)
    suffix = 0
    while os.path.exists(target):
        suffix += 1
        target = os.path.join(output_dir, ARCHIVE_DIR, f"{stamp}-{suffix}")
    os.makedirs(target)
    for name in names:
        shutil.move(os.path.join(output_dir, name), os.path.join(target, name))
    return target
