"""The only place that talks to ``paddle.distributed``.

Every collective here is a no-op (or the identity) when no process group is
initialised, so the same model/loss code runs unchanged in a single-process
unit test and under ``python -m paddle.distributed.launch``.
"""
import os

import paddle
import paddle.distributed as dist

from passl import rendezvous


def is_initialized():
    return dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main_process():
    return get_rank() == 0


def launched_world_size():
    """Processes started by ``paddle.distributed.launch`` (1 when run directly)."""
    return int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))


def init_process_group():
    """Join the process group when started by the launcher; returns the world size.

    Reports both stages to ``tools/launch.py``'s rendezvous deadline (passl/rendezvous.py).
    """
    if launched_world_size() > 1 and not dist.is_initialized():
        rendezvous.report("started")
        dist.init_parallel_env()
    rendezvous.report("joined")
    return get_world_size()


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce(tensor, op="sum"):
    """In-place all-reduce of ``tensor`` across ranks (``op``: sum, max or min); returns it."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=_OPS[op])
    return tensor


def all_gather(tensor, out=None):
    """Concatenation along axis 0 of ``tensor`` (the same shape on every rank) from every
    rank, in rank order, written into ``out`` when given (``[world x rows, ...]``, e.g. a view
    of a larger tensor). The ranks gather straight into one tensor: a list of per-rank parts
    and their concatenation would hold the result twice at once."""
    if get_world_size() == 1:
        return tensor
    if out is None:
        out = paddle.empty([get_world_size() * tensor.shape[0], *tensor.shape[1:]],
                           dtype=tensor.dtype)
    dist.stream.all_gather(out, tensor)
    return out


def all_gather_object(obj):
    """A list with ``obj`` from every rank, in rank order."""
    if get_world_size() == 1:
        return [obj]
    objects = []
    dist.all_gather_object(objects, obj)
    return objects


def broadcast(tensor, src=0):
    """In-place broadcast of ``tensor`` from rank ``src``; returns it."""
    if get_world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def barrier():
    if get_world_size() > 1:
        dist.barrier()
