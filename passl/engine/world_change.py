"""Resuming an epoch-boundary checkpoint with another number of processes (N -> M).

What happens, each step logged:

- Global batch. When the config's per-process ``batch_size`` is the one the checkpoint was
  trained with, the global batch is kept: the per-process batch becomes saved global / M
  (an error when M does not divide it). When the user changed ``batch_size`` (e.g. with
  ``-o dataloader.train.sampler.batch_size=...``), the new global batch is used and the lr
  is rescaled linearly by new global / saved global (through
  ``lr_scheduler.reference_batch_size``, which is set to the saved global batch unless the
  config sets it).
- Schedule. The lr schedule continues at the start of the resumed epoch (epoch x this
  run's iterations per epoch); ``iter`` (the step count in metrics.jsonl) keeps counting.
- Per-rank hook state. Each hook's ``state_from_ranks`` maps the saved ranks' states to this
  rank (SwAV's queue is re-sharded, its union kept in order).
- Data order. Each epoch's order is a permutation of the whole dataset seeded by the epoch,
  split over the ranks, so the resumed epoch sees every image once whatever M is.
- Random streams. The saved per-rank generator states cannot be mapped to other ranks;
  Python, NumPy and Paddle are re-seeded on every rank from (seed, resumed epoch, rank)
  (:func:`resumed_seed`), so a rerun of the same resume is reproducible and no rank
  repeats the streams of the first epochs. Augmentations do not use them (they are seeded
  per sample, see passl/data/datasets.py) and are exactly those of an uninterrupted run.
"""
import numpy as np

from passl.errors import UserError
from passl.runtime import seed_everything


def saved_global_batch(state):
    """Global batch the checkpoint was trained with (from its config for older files)."""
    if "global_batch_size" in state:
        return int(state["global_batch_size"])
    per_process = state["config"]["dataloader"]["train"]["sampler"]["batch_size"]
    return int(per_process) * int(state["world_size"])


def layout_changed(state, world_size, global_batch):
    return int(state["world_size"]) != world_size or saved_global_batch(state) != global_batch


def adapt_config(cfg, state, world_size, path, logger):
    """Set this run's per-process batch (and lr reference) in ``cfg`` for resuming ``state``.

    See the module docstring; nothing changes when the world size and batch are the saved ones.
    """
    saved_world = int(state["world_size"])
    saved_global = saved_global_batch(state)
    sampler = cfg["dataloader"]["train"].get("sampler") or {}
    per_process = sampler.get("batch_size")
    if not isinstance(per_process, int) or per_process * world_size == saved_global:
        return  # a bad batch_size is reported by the loader; else the global batch is the same
    change = f"resuming a {saved_world}-process checkpoint with {world_size} process(es): "
    if per_process == saved_global // saved_world and saved_world != world_size:
        if saved_global % world_size:
            raise UserError(
                f"--resume {path}: the global batch {saved_global} of the checkpoint cannot be "
                f"split evenly over {world_size} processes; choose a per-process batch with "
                f"-o dataloader.train.sampler.batch_size=N (the lr is then rescaled)")
        sampler["batch_size"] = saved_global // world_size
        logger.warning(f"{change}global batch {saved_global} kept, per-process batch "
                       f"{per_process} -> {sampler['batch_size']}")
        return
    new_global = per_process * world_size
    schedule = cfg.get("lr_scheduler") or {}
    reference = schedule.get("reference_batch_size")
    if reference is None:
        schedule["reference_batch_size"] = saved_global
        rescale = f"lr rescaled by {new_global}/{saved_global} = {new_global / saved_global:g}"
    else:
        rescale = (f"lr scaled by the config's reference_batch_size {reference}: "
                   f"x {new_global / saved_global:g} against the checkpoint's run")
    logger.warning(f"{change}per-process batch_size changed, global batch {saved_global} -> "
                   f"{new_global} ({per_process} per process); {rescale}")


def resumed_seed(seed, epoch, rank):
    """The seed of ``rank``'s random streams when a run resumes at ``epoch`` on another layout."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(1)[0])


def continue_on_new_layout(trainer, state):
    """Schedule position and random streams for a changed world size or global batch (the
    hook states are mapped by :func:`passl.engine.trainer_checkpoint.restore`); logs what changed."""
    saved_world, saved_global = int(state["world_size"]), saved_global_batch(state)
    position = trainer.start_epoch * trainer.iters_per_epoch
    trainer.lr_scheduler.step(position)  # sets the iteration and recomputes its lr
    seed_everything(resumed_seed(trainer.cfg.get("seed", 0), trainer.start_epoch, trainer.rank))
    trainer.logger.warning(
        f"resumed on another layout ({saved_world} -> {trainer.world_size} process(es), global "
        f"batch {saved_global} -> {trainer.global_batch_size}): lr schedule at iteration "
        f"{position} (epoch {trainer.start_epoch} x {trainer.iters_per_epoch}), lr "
        f"{trainer.lr_scheduler.last_lr:.6g}; random streams re-seeded from (seed, epoch "
        f"{trainer.start_epoch}, rank); each epoch still sees every image once")
