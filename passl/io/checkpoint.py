"""Training checkpoints: what they hold, how they are written safely, found and read back.

Filling one from a trainer and putting one back into a trainer is
:mod:`passl.engine.trainer_checkpoint`.

Layout: ``output_dir/checkpoints/epoch_N.pd`` (N = epochs completed) and
``checkpoints/latest.pd``, a relative symlink to the newest complete one (a hard link where
the file system has no symlinks). Opening ``latest.pd`` therefore opens a checkpoint, so any
tool that reads checkpoints (``tools/extract_weight.py``) accepts it as is. A run stopped by
a signal (:mod:`passl.preemption`) writes ``epoch_E_step_S.pd``: S optimizer steps into
epoch E, both counted as the log lines count them (1-based epoch, steps done); it is removed
once a later checkpoint is written.

Crash safety: a checkpoint is written to a temporary file of its own in the same folder
(:func:`passl.io.safe_write.replacing`), flushed to disk and renamed (``os.replace`` is
atomic); only then is ``latest.pd`` swapped, again by renaming a freshly made link over it.
A crash at any point leaves ``latest.pd`` pointing at a complete file, and two writers of one
path never see each other's half-written file.

Content (one ``paddle.save`` dict, written by rank 0)::

    kind, version          marker: refuse anything else with a one-line error
    epoch, iter            epochs completed and optimizer steps done (in all)
    steps_in_epoch         optimizer steps done in epoch ``epoch`` (0-based), 0 at an epoch
                           boundary; resuming skips that many batches of the epoch
    model                  model.state_dict() (unwrapped: no DataParallel prefix)
    optimizer              accumulators (LARS/SGD momentum, Adam moments) by parameter path
    lr_scheduler           its state_dict (the iteration it is at)
    amp_scaler             GradScaler state (float16 AMP), else {}
    world_size             processes that wrote it
    global_batch_size      images per step over all of them (resuming on another world
                           size: passl/engine/world_change.py)
    per_rank               one entry per rank: hook states (the SwAV queue) and RNG states
    config                 the resolved config of the run

Optimizer state is keyed by parameter path (``backbone.conv1.weight``) rather than by
Paddle's generated tensor names (``conv2d_0.w_0_velocity_0``), which depend on how many
layers the process created before; that keeps resuming correct in any process.
"""
import glob
import logging
import os
import random
import re

import numpy as np
import paddle

from passl.errors import UserError
from passl.io import foreign_layouts
from passl.io.paddle_file import check_state_dict, load_paddle_file
from passl.io.safe_pickle import printable
from passl.io.safe_write import replacing, temporary_name

# The toolkit's logger, by name: passl.utils.logger (a layer above this one) configures it.
_LOGGER = logging.getLogger("passl")
KIND = "passl-training-checkpoint"
VERSION = 1
LATEST = "latest.pd"
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pd$")
_MID_EPOCH_FILE = re.compile(r"^epoch_(\d+)_step_(\d+)\.pd$")


def checkpoint_dir(output_dir):
    return os.path.join(output_dir, "checkpoints")


# ---------------------------------------------------------------- random number generators

def _current_card():
    """This process's GPU number, None on CPU.

    Only this card's generator is saved: ``paddle.get_rng_state()`` returns one state per
    *visible* GPU and ``set_rng_state`` refuses a list of another length, so a run trained
    seeing 8 cards could not resume with ``CUDA_VISIBLE_DEVICES=0,1,2,3``; and each process
    draws only on its own card.
    """
    device = paddle.get_device()
    return int(device.split(":")[1]) if device.startswith("gpu") else None


def rng_state():
    """Python, NumPy and Paddle (CPU and this process's GPU) generator states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "paddle_cpu": paddle.get_rng_state("cpu")}
    card = _current_card()
    if card is not None:
        state["paddle_device"] = paddle.base.core.default_cuda_generator(card).get_state()
    return state


def check_rng_state(state, where):
    """Raise a one-line UserError unless ``state`` is what :func:`rng_state` returns.

    Python's and NumPy's states are tried on throwaway generators (both check every field);
    Paddle's were checked as they were read (:mod:`passl.io.paddle_file`).
    """
    from paddle.base.core import GeneratorState
    if not isinstance(state, dict):
        raise UserError(f"{where}: a random state that is a {type(state).__name__}, not a dict")
    for key, check in (("python", random.Random().setstate),
                       ("numpy", np.random.RandomState().set_state)):
        try:
            check(state[key])
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as error:
            raise UserError(f"{where}: the {key} random state is malformed "
                            f"({type(error).__name__}); resume from another checkpoint") from None
    paddle_states = [state.get("paddle_cpu"), state.get("paddle_device")]
    for saved in paddle_states[:1] + [s for s in paddle_states[1:] if s is not None]:
        saved = saved if isinstance(saved, list) else [saved]
        if not saved or not all(isinstance(s, GeneratorState) for s in saved):
            raise UserError(f"{where}: the Paddle random state is malformed; resume from "
                            f"another checkpoint")


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    paddle.set_rng_state(state["paddle_cpu"], "cpu")
    card, saved = _current_card(), state.get("paddle_device")  # none in a CPU run's state
    if card is None or saved is None:
        return
    if isinstance(saved, (list, tuple)):  # older checkpoints: one state per visible card
        if card >= len(saved):
            return
        saved = saved[card]
    paddle.base.core.default_cuda_generator(card).set_state(saved)


# ---------------------------------------------------------------- optimizer state by path

def optimizer_state(optimizer, model):
    """``{accumulator: {parameter path: array}}`` of ``optimizer`` (see module doc)."""
    path_of = {param.name: path for path, param in model.named_parameters()}
    return {acc: {path_of[name]: tensor.numpy() for name, tensor in per_param.items()}
            for acc, per_param in optimizer._accumulators.items()}


def load_optimizer_state(optimizer, model, state):
    """Inverse of :func:`optimizer_state`: creates the accumulators, then fills them."""
    params = dict(model.named_parameters())
    for acc, per_param in state.items():
        if not (isinstance(acc, str) and isinstance(per_param, dict)
                and all(isinstance(path, str) and isinstance(value, (np.ndarray, paddle.Tensor))
                        for path, value in per_param.items())):
            raise UserError(f"checkpoint optimizer state {printable(acc)} is not {{parameter "
                            f"path: array}}; resume from another checkpoint")
    paths = sorted({path for per_param in state.values() for path in per_param})
    unknown = [path for path in paths if path not in params]
    if unknown:
        raise UserError(f"checkpoint optimizer state names parameters this model does not have "
                        f"({', '.join(map(printable, unknown[:3]))}); resume with the config it "
                        f"was trained with")
    block = paddle.static.default_main_program().global_block()
    optimizer._create_accumulators(block, [params[path] for path in paths])
    for acc, per_param in state.items():
        if acc not in optimizer._accumulators:
            raise UserError(f"checkpoint optimizer state has {acc!r}, which "
                            f"{type(optimizer).__name__} does not keep; resume with the "
                            f"optimizer it was trained with")
        for path, value in per_param.items():
            target = optimizer._accumulators[acc][params[path].name]
            if list(value.shape) != list(target.shape):
                raise UserError(f"checkpoint optimizer state {printable(acc)} of {path} has shape "
                                f"{list(value.shape)}, the parameter needs {list(target.shape)}; "
                                f"resume from another checkpoint")
            target.set_value(value)


# ---------------------------------------------------------------- writing

def write_atomic(state, path):
    """``paddle.save`` to ``path`` via a temporary file and a rename; never a partial ``path``."""
    with replacing(path) as tmp:
        paddle.save(state, tmp)


def _point_latest(directory, target_name):
    """Atomically make ``directory/latest.pd`` refer to ``directory/target_name``."""
    link = os.path.join(directory, LATEST)
    tmp = temporary_name(link)
    try:
        try:
            os.symlink(target_name, tmp)
        except OSError:  # no symlinks here (e.g. Windows without the privilege)
            os.link(os.path.join(directory, target_name), tmp)
        os.replace(tmp, link)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def checkpoint_name(epoch, steps_in_epoch=0):
    """File name of the checkpoint at a position (``epoch`` epochs and ``steps_in_epoch``
    steps of the next one done), see the module doc."""
    if steps_in_epoch:
        return f"epoch_{epoch + 1}_step_{steps_in_epoch}.pd"
    return f"epoch_{epoch}.pd"


def mid_epoch_checkpoints(directory):
    """``[((epochs completed, steps in epoch), path)]`` of the ``epoch_E_step_S.pd`` files."""
    found = []
    for path in glob.glob(os.path.join(directory, "epoch_*_step_*.pd")):
        match = _MID_EPOCH_FILE.match(os.path.basename(path))
        if match:
            found.append(((int(match.group(1)) - 1, int(match.group(2))), path))
    return sorted(found)


def epoch_checkpoints(directory):
    """``[(epoch, path)]`` of the complete ``epoch_N.pd`` files in ``directory``, oldest first."""
    found = []
    for path in glob.glob(os.path.join(directory, "epoch_*.pd")):
        match = _EPOCH_FILE.match(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(state, directory, keep_last=None):
    """Write ``state`` under :func:`checkpoint_name`, point ``latest.pd`` at it, prune.

    Args:
        keep_last: keep this many newest ``epoch_N.pd`` files up to this epoch (None or 0:
            keep all). Mid-epoch files before this position are always removed.

    Returns:
        The path written.
    """
    os.makedirs(directory, exist_ok=True)
    position = (state["epoch"], state.get("steps_in_epoch", 0))
    name = checkpoint_name(*position)
    path = os.path.join(directory, name)
    write_atomic(state, path)
    _point_latest(directory, name)
    for older, old_path in mid_epoch_checkpoints(directory):
        if older < position:  # later ones may belong to an earlier run in this output_dir
            os.remove(old_path)
    if keep_last:
        # only files up to this epoch: a later-numbered file left by an earlier run in the
        # same output_dir must not push out the checkpoints of this run
        written = [p for epoch, p in epoch_checkpoints(directory) if epoch <= state["epoch"]]
        for old in written[:-keep_last]:
            os.remove(old)
    return path


# ---------------------------------------------------------------- finding and reading

def latest_checkpoint(output_dir):
    """Path of ``output_dir/checkpoints/latest.pd`` when it leads to a file, else None."""
    link = os.path.join(checkpoint_dir(output_dir), LATEST)
    return link if os.path.isfile(link) else None


class RunAlreadyComplete(Exception):
    """``--resume`` of a run that trained all its epochs: nothing to do (tools/train.py exits
    0 with this message and writes nothing)."""


def _position(name):
    """``(epochs completed, steps into the next)`` of a checkpoint file name, else None."""
    match = _EPOCH_FILE.match(name)
    if match:
        return int(match.group(1)), 0
    match = _MID_EPOCH_FILE.match(name)
    return (int(match.group(1)) - 1, int(match.group(2))) if match else None


def resume_candidates(output_dir):
    """The checkpoints ``--resume auto`` tries, in order: what ``latest.pd`` leads to, then
    every ``epoch_N.pd`` and ``epoch_E_step_S.pd`` before it, newest position first.

    Files beyond the position ``latest.pd`` names are left out: they are from an earlier
    timeline of this output_dir (a run resumed from an older checkpoint writes over it).
    Without ``latest.pd`` every checkpoint file is a candidate. Each file appears once.
    """
    directory = checkpoint_dir(output_dir)
    link = os.path.join(directory, LATEST)
    target = os.readlink(link) if os.path.islink(link) else None
    cap = _position(os.path.basename(target)) if target else None
    files = [(position, path) for position, path in
             [(_position(os.path.basename(p)), p) for p in glob.glob(os.path.join(directory,
                                                                                  "epoch_*.pd"))]
             if position is not None and (cap is None or position <= cap)]
    ordered = ([link] if os.path.isfile(link) and target is None else []) + \
        [path for _, path in sorted(files, reverse=True)]
    unique, seen = [], set()
    for path in ordered:
        identity = (os.stat(path).st_dev, os.stat(path).st_ino)
        if identity not in seen:
            seen.add(identity)
            unique.append(path)
    return unique


def find_resume_checkpoint(output_dir, trust=False, report=None):
    """``(path, state)`` of the newest of :func:`resume_candidates` that reads and is a
    checkpoint; each one skipped goes to ``report(message)`` with the reason. Nothing is
    deleted. No candidate at all, or none readable, is a UserError saying what to do."""
    skipped = []
    for path in resume_candidates(output_dir):
        try:
            return path, load_checkpoint(path, trust)
        except UserError as error:
            reason = str(error).removeprefix(f"--resume {path}: ")
            skipped.append(f"{os.path.basename(path)} ({reason})")
            if report:
                report(f"--resume auto: skipped {path}: {reason}")
    directory = checkpoint_dir(output_dir)
    if not skipped:
        raise UserError(f"--resume auto: no checkpoint in {directory} (no epoch_N.pd or "
                        f"{LATEST}); start without --resume, or pass --resume PATH")
    raise UserError(f"--resume auto: none of the {len(skipped)} checkpoint(s) in {directory} "
                    f"can be resumed ({'; '.join(skipped)}); start afresh with "
                    f"--archive-old-run (moves them to previous_runs/), or pass --resume PATH")


def check_not_complete(state, path, epochs):
    """Raise :class:`RunAlreadyComplete` when ``state`` has trained all ``epochs``."""
    if int(state["epoch"]) >= epochs and not state.get("steps_in_epoch", 0):
        raise RunAlreadyComplete(f"{path}: already complete: {int(state['epoch'])} epochs; "
                                 f"pass -o epochs=M to train longer")


def is_training_checkpoint(state):
    """``state`` carries this engine's marker (compared only as a string: the file chose it)."""
    return isinstance(state, dict) and isinstance(state.get("kind"), str) \
        and state["kind"] == KIND


def load_checkpoint(path, trust=False):
    """The checkpoint dict at ``path``, after checking that it is one this code can resume.

    ``trust``: read it with ``paddle.load`` (see :func:`passl.io.paddle_file.load_paddle_file`).
    """
    state = load_paddle_file(path, "--resume", trust)
    if not isinstance(state, dict):
        raise UserError(f"--resume {path}: not a PASSL training checkpoint "
                        f"(holds a {type(state).__name__})")
    if "kind" not in state:
        raise UserError(f"--resume {path}: a weights file, not a training checkpoint; use it "
                        f"with --pretrained (backbone) or --load (whole model)")
    if not is_training_checkpoint(state):
        raise UserError(f"--resume {path}: checkpoint kind {state['kind']!r:.60}, expected "
                        f"{KIND!r}")
    version = state.get("version", 0)
    if not _is_count(version):
        raise UserError(f"--resume {path}: checkpoint version {version!r:.40} is not a number")
    if version > VERSION:
        raise UserError(f"--resume {path}: checkpoint version {state['version']} is newer than "
                        f"this code reads ({VERSION}); update PASSL")
    _check_resumable(state, f"--resume {path}")
    return state


def _is_count(value, least=0):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= least


#: What resuming reads from a checkpoint: key -> (check, what it must be).
_RESUMED = {
    "model": (lambda v: isinstance(v, dict), "a state dict"),
    "optimizer": (lambda v: isinstance(v, dict), "a dict of optimizer accumulators"),
    "lr_scheduler": (lambda v: isinstance(v, dict), "a dict"),
    "epoch": (_is_count, "a count"),
    "iter": (_is_count, "a count"),
    "world_size": (lambda v: _is_count(v, 1), "a positive count"),
    "per_rank": (lambda v: isinstance(v, list) and v, "a list with one entry per process"),
}
_RESUMED_IF_PRESENT = {
    "steps_in_epoch": (_is_count, "a count"),
    "global_batch_size": (lambda v: _is_count(v, 1), "a positive count"),
    "amp_scaler": (lambda v: isinstance(v, dict), "a dict"),
}


def _check_resumable(state, where):
    """Every part of ``state`` that :func:`restore` uses is there and of its type, so a
    damaged checkpoint is one line here instead of a traceback later."""
    missing = [key for key in _RESUMED if key not in state]
    if missing:
        raise UserError(f"{where}: the checkpoint has no '{missing[0]}' (damaged, or not "
                        f"written by tools/train.py); resume from another checkpoint")
    for key, (check, expected) in {**_RESUMED, **_RESUMED_IF_PRESENT}.items():
        if key in state and not check(state[key]):
            value = state[key]
            shown = (printable(repr(value), 40) if isinstance(value, (int, float, np.number))
                     else f"a {type(value).__name__}")
            raise UserError(f"{where}: the checkpoint's '{key}' is {shown}, expected {expected}; "
                            f"resume from another checkpoint")
    check_state_dict(state["model"], f"{where}: 'model'")
    if len(state["per_rank"]) != state["world_size"]:
        raise UserError(f"{where}: the checkpoint holds {len(state['per_rank'])} process "
                        f"states for world_size {state['world_size']}; resume from another "
                        f"checkpoint")
    for rank, own in enumerate(state["per_rank"]):
        if not (isinstance(own, dict) and isinstance(own.get("hooks"), dict)):
            raise UserError(f"{where}: process {rank}'s state is damaged (no 'hooks'); resume "
                            f"from another checkpoint")
        check_rng_state(own.get("rng"), f"{where}: process {rank}")


def last_checkpoint(output_dir):
    """The file ``latest.pd`` leads to (``output_dir/checkpoints/epoch_N.pd``, not the link),
    or None."""
    link = latest_checkpoint(output_dir)
    return os.path.join(os.path.dirname(link), os.path.basename(os.path.realpath(link))) \
        if link else None


def check_model_keys(model, saved, path):
    own = model.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    mismatched = [k for k in own if k in saved and list(own[k].shape) != list(saved[k].shape)]
    if missing or unexpected or mismatched:
        details = "; ".join(f"{len(keys)} {kind} ({', '.join(keys[:3])})" for kind, keys in
                            (("missing", missing), ("unexpected", unexpected),
                             ("shape-mismatched", mismatched)) if keys)
        raise UserError(f"{path}: the checkpoint's model does not fit this config's model: "
                        f"{details}; use the config it was trained with (saved in the checkpoint "
                        f"and in its output_dir/config.yaml)")


def load_model_weights(model, path, trust=False):
    """``--load``: the full model state from a training checkpoint or a model state dict
    (ours, or another toolkit's: :mod:`passl.io.foreign_layouts`).

    Returns the epochs the checkpoint had trained, or None for a plain state dict.
    """
    state = load_paddle_file(path, "--load", trust)
    epoch = None
    layout, foreign = foreign_layouts.recognise(state, f"--load {path}")
    if foreign is not None:
        state, recognised = layout.model_state(foreign, model.state_dict())
        epoch = foreign.epoch
        _LOGGER.info(recognised)
    elif is_training_checkpoint(state):
        epoch, state = state.get("epoch"), state.get("model")
        if not _is_count(epoch):
            epoch = None
    if not isinstance(state, dict):
        raise UserError(f"--load {path}: expected a checkpoint or a model state dict")
    check_state_dict(state, f"--load {path}")
    _refuse_backbone_file(model, state, path)
    check_model_keys(model, state, f"--load {path}")
    model.set_state_dict(state)
    return epoch


def _refuse_backbone_file(model, state, path):
    """``--load`` of extracted backbone weights: say to use ``--pretrained`` instead."""
    backbone = getattr(model, "backbone", None)
    if backbone is None or not state:
        return
    names = set(backbone.state_dict())
    prefix = "backbone."
    if all((key[len(prefix):] if key.startswith(prefix) else key) in names for key in state):
        raise UserError(f"--load {path}: holds only backbone weights (what "
                        f"tools/extract_weight.py writes); load them with --pretrained {path}, "
                        f"--load takes a whole model (a training checkpoint)")
