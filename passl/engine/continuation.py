"""What a run that stopped early tells its user: the checkpoint it can continue from and the
command that continues it (``--resume auto``), or that it has to start again."""
import os
import shlex
import sys

from passl.io import checkpoint

#: Flags of tools/train.py that a resumed run must not repeat (``--resume`` restores the run).
_DROPPED_WITH_VALUE = ("--resume", "--pretrained", "--load")
_DROPPED = ("--pretrained-nonstrict", "--evaluate-only")


def _launch_prefix():
    """``python -m paddle.distributed.launch ...`` when this process was started by it."""
    world = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    if world == 1:
        return "python"
    local = int(os.environ.get("PADDLE_LOCAL_SIZE", world))
    options = f"--nproc_per_node {world}" if local == world and not \
        os.environ.get("FLAGS_selected_gpus") else "<the same launch options>"
    return f"python -m paddle.distributed.launch {options}"


def training_command(argv=None, resume=True):
    """This run's ``tools/train.py`` command line, with ``--resume auto`` when ``resume``."""
    argv = sys.argv if argv is None else argv
    if not resume:
        return f"{_launch_prefix()} {shlex.join(argv)}"
    kept, skip_next = [], False
    for arg in argv[1:]:
        flag = arg.split("=", 1)[0]
        if skip_next:
            skip_next = False
        elif flag in _DROPPED_WITH_VALUE:
            skip_next = "=" not in arg
        elif flag not in _DROPPED:
            kept.append(arg)
    return f"{_launch_prefix()} {shlex.join([argv[0], *kept])} --resume auto"


def how_to_continue(output_dir, argv=None):
    """``last checkpoint PATH; continue with: CMD --resume auto`` (or how to start again)."""
    last = checkpoint.last_checkpoint(output_dir)
    if last is None:
        return f"no checkpoint was written yet; start again with: " \
               f"{training_command(argv, resume=False)}"
    return f"last checkpoint {last}; continue with: {training_command(argv)}"
