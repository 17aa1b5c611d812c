"""A trainer's whole state to and from a checkpoint dict, and saving it from every rank.

The file itself (its content, names, atomic writes, reading it back) is
:mod:`passl.io.checkpoint`; this module knows the trainer: its model, optimizer, scheduler,
AMP scaler, hooks and ranks, and how a run continues on another number of processes
(:mod:`passl.engine.world_change`).
"""
import os

import paddle

from passl import distributed
from passl.engine import world_change
from passl.errors import UserError
from passl.io.checkpoint import (KIND, VERSION, check_model_keys, checkpoint_dir, checkpoint_name,
                                 load_optimizer_state, optimizer_state, rng_state, save_checkpoint)
from passl.io.safe_write import OutputWriteError, reporting_write_errors


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




def restore(trainer, state, path):
    """Put a checkpoint's state into ``trainer``; returns this rank's RNG state to set later.

    The RNG state is returned instead of applied so that the trainer can set it right before
    the first resumed epoch, after start-up work that may draw random numbers.
    """
    check_model_keys(trainer.model, state["model"], f"--resume {path}")
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
