"""Training checkpoints: what they hold, how they are written safely, found and read back.

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
import numbers
import os
import random
import re

import numpy as np
import paddle

from passl import distributed
from passl.engine import world_change
from passl.errors import UserError
from passl.io.paddle_file import load_paddle_file
from passl.io.safe_write import (OutputWriteError, replacing, reporting_write_errors,
                                 temporary_name)

KIND = "passl-training-checkpoint"
VERSION = 1
LATEST = "latest.pd"
#: What a checkpoint must hold to be resumed (see the module doc).
RESUME_KEYS = ("epoch", "iter", "model", "optimizer", "lr_scheduler", "per_rank")
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
    paths = sorted({path for per_param in state.values() for path in per_param})
    unknown = [path for path in paths if path not in params]
    if unknown:
        raise UserError(f"checkpoint optimizer state names parameters this model does not have "
                        f"({', '.join(unknown[:3])}); resume with the config it was trained with")
    block = paddle.static.default_main_program().global_block()
    optimizer._create_accumulators(block, [params[path] for path in paths])
    for acc, per_param in state.items():
        if acc not in optimizer._accumulators:
            raise UserError(f"checkpoint optimizer state has {acc!r}, which "
                            f"{type(optimizer).__name__} does not keep; resume with the "
                            f"optimizer it was trained with")
        for path, value in per_param.items():
            optimizer._accumulators[acc][params[path].name].set_value(value)


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
    if state["kind"] != KIND:
        raise UserError(f"--resume {path}: checkpoint kind {state['kind']!r}, expected {KIND!r}")
    if state.get("version", 0) > VERSION:
        raise UserError(f"--resume {path}: checkpoint version {state['version']} is newer than "
                        f"this code reads ({VERSION}); update PASSL")
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise UserError(f"--resume {path}: checkpoint without {', '.join(missing)}; it was cut "
                        f"short or edited, resume from another checkpoint")
    if not all(isinstance(state[key], numbers.Integral) and state[key] >= 0
               for key in ("epoch", "iter")):
        raise UserError(f"--resume {path}: checkpoint epoch/iter are not counts "
                        f"({state['epoch']!r}, {state['iter']!r}); resume from another "
                        f"checkpoint")
    return state


# ---------------------------------------------------------------- a trainer's whole state

def _to_numpy(value):
    if isinstance(value, paddle.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_numpy(v) for v in value)
    return value


def hook_key(hooks, index):
    """Name a hook's state by its class, with a suffix when a class appears twice."""
    name = type(hooks[index]).__name__
    same = [i for i, h in enumerate(hooks) if type(h).__name__ == name]
    return name if len(same) == 1 else f"{name}.{same.index(index)}"


def capture(trainer, steps_in_epoch=0):
    """The checkpoint dict of ``trainer`` at the end of epoch ``trainer.epoch``, or, with
    ``steps_in_epoch``, that many steps into it; collective, all ranks call it.

    Returns the dict on rank 0 and None elsewhere (only rank 0 writes).
    """
    hooks = trainer.hooks
    local = {"hooks": {hook_key(hooks, i): _to_numpy(h.state_dict()) for i, h in enumerate(hooks)},
             "rng": rng_state()}
    per_rank = distributed.all_gather_object(local)
    if trainer.rank != 0:
        return None
    return {
        "kind": KIND, "version": VERSION,
        "epoch": trainer.epoch + (0 if steps_in_epoch else 1), "iter": trainer.iter,
        "steps_in_epoch": steps_in_epoch,
        "model": trainer.model.state_dict(),
        "optimizer": optimizer_state(trainer.optimizer, trainer.model),
        "lr_scheduler": trainer.lr_scheduler.state_dict(),
        "amp_scaler": trainer.amp.state_dict(),
        "world_size": trainer.world_size,
        "global_batch_size": trainer.global_batch_size,
        "per_rank": per_rank,
        "config": trainer.cfg.to_dict() if hasattr(trainer.cfg, "to_dict") else dict(trainer.cfg),
    }


def save_trainer_checkpoint(trainer, keep_last=None, steps_in_epoch=0):
    """:func:`capture` and, on rank 0, :func:`save_checkpoint` into ``output_dir/checkpoints``;
    returns the path on every rank.

    Collective: all ranks return only once rank 0's write is over, and when it failed (e.g. a
    full disk) all raise an OutputWriteError naming the file, so they stop together.
    """
    state = capture(trainer, steps_in_epoch)
    epoch = trainer.epoch + (0 if steps_in_epoch else 1)
    directory = checkpoint_dir(trainer.output_dir)
    path = os.path.join(directory, checkpoint_name(epoch, steps_in_epoch))
    failure = None
    if state is not None:
        try:
            with reporting_write_errors(path):
                save_checkpoint(state, directory, keep_last)
        except OutputWriteError as error:
            failure = error
    written = paddle.to_tensor([0 if failure else 1], dtype="int32")
    if not int(distributed.all_reduce(written, op="min").numpy()[0]):
        raise failure or OutputWriteError(f"process 0 could not write {path} (its log says why)")
    return path


def last_checkpoint(output_dir):
    """The file ``latest.pd`` leads to (``output_dir/checkpoints/epoch_N.pd``, not the link),
    or None."""
    link = latest_checkpoint(output_dir)
    return os.path.join(os.path.dirname(link), os.path.basename(os.path.realpath(link))) \
        if link else None


def _check_model_keys(model, saved, path):
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
    """``--load``: the full model state from a training checkpoint or a model state dict.

    Returns the epochs the checkpoint had trained, or None for a plain state dict.
    """
    state = load_paddle_file(path, "--load", trust)
    epoch = None
    if isinstance(state, dict) and state.get("kind") == KIND:
        epoch, state = state.get("epoch"), state["model"]
    if not isinstance(state, dict):
        raise UserError(f"--load {path}: expected a checkpoint or a model state dict")
    _refuse_backbone_file(model, state, path)
    _check_model_keys(model, state, f"--load {path}")
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


def restore(trainer, state, path):
    """Put a checkpoint's state into ``trainer``; returns this rank's RNG state to set later.

    The RNG state is returned instead of applied so that the trainer can set it right before
    the first resumed epoch, after start-up work that may draw random numbers.
    """
    _check_model_keys(trainer.model, state["model"], f"--resume {path}")
    trainer.model.set_state_dict(state["model"])
    load_optimizer_state(trainer.optimizer, trainer.model, state["optimizer"])
    trainer.lr_scheduler.set_state_dict(state["lr_scheduler"])
    if state.get("amp_scaler"):
        trainer.amp.set_state_dict(state["amp_scaler"])
    trainer.start_epoch, trainer.iter = int(state["epoch"]), int(state["iter"])
    trainer.start_step = int(state.get("steps_in_epoch", 0))
    hooks = trainer.hooks
    if world_change.layout_changed(state, trainer.world_size, trainer.global_batch_size):
        if trainer.start_step:
            raise UserError(
                f"--resume {path}: a mid-epoch checkpoint (step {trainer.start_step} of epoch "
                f"{trainer.start_epoch + 1}) resumes only with the layout that wrote it "
                f"({state['world_size']} process(es), global batch "
                f"{world_change.saved_global_batch(state)}); resume it so until the epoch ends, "
                f"or resume from an epoch_N.pd checkpoint")
        for i, hook in enumerate(hooks):
            key = hook_key(hooks, i)
            rank_states = [rank_state["hooks"].get(key, {}) for rank_state in state["per_rank"]]
            if any(rank_states):
                hook.set_state_dict(hook.state_from_ranks(rank_states,
                                                          world_change.saved_global_batch(state),
                                                          trainer))
        world_change.continue_on_new_layout(trainer, state)
        return rng_state()
    own = state["per_rank"][trainer.rank]
    for i, hook in enumerate(hooks):
        key = hook_key(hooks, i)
        if own["hooks"].get(key):
            hook.set_state_dict(own["hooks"][key])
    return own["rng"]
