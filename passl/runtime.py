"""Process start-up: CPU speed settings, seeds and device choice.

:func:`configure_cpu_threads` must run before Paddle is imported: Paddle reads
``MKL_DEBUG_CPU_TYPE`` and ``OMP_NUM_THREADS`` when it loads, and without them it
takes MKL's slow path on AMD CPUs (2-2.5x slower training measured on the
project's 2-core machine) and runs on a single thread.
"""
import os
import random

from passl.errors import ConfigError

DEVICES = ("auto", "cpu", "gpu")


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_process_count():
    """Processes this launcher started on this machine (1 without a launcher)."""
    return int(os.environ.get("PADDLE_LOCAL_SIZE", os.environ.get("PADDLE_TRAINERS_NUM", "1")))


def threads_per_process(threads="auto"):
    """``threads`` from the config, or cores / local processes for ``'auto'``.

    A user's ``OMP_NUM_THREADS`` wins over 'auto' in a plain run; under
    ``paddle.distributed.launch`` it is ignored because the launcher always sets it to 1.
    """
    if threads not in (None, "auto"):
        if not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads: expected a positive integer or 'auto', got {threads!r}")
        return threads
    if "OMP_NUM_THREADS" in os.environ and "PADDLE_LOCAL_SIZE" not in os.environ:
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, available_cores() // local_process_count())


def configure_cpu_threads(threads="auto"):
    """Set MKL/OpenMP environment for a fast CPU run; returns what was chosen (for the log)."""
    chosen = {"threads": threads_per_process(threads)}
    os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
    chosen["MKL_DEBUG_CPU_TYPE"] = os.environ["MKL_DEBUG_CPU_TYPE"]
    # Paddle prints a multi-line warning to stderr when it loads with OMP_NUM_THREADS > 1,
    # so it loads with 1 and gets the real count from set_num_threads (measured: the same
    # speed as loading with OMP_NUM_THREADS set to the count).
    os.environ["OMP_NUM_THREADS"] = "1"
    import paddle  # noqa: E402  (after the environment is set)
    paddle.base.core.set_num_threads(chosen["threads"])  # effective even if Paddle was loaded
    os.environ["OMP_NUM_THREADS"] = str(chosen["threads"])  # for child processes and the log
    return chosen


def seed_everything(seed, rank=0):
    """Seed python, numpy and paddle; ranks get different streams (data order comes from the sampler)."""
    import numpy as np
    import paddle
    value = int(seed) + rank
    random.seed(value)
    np.random.seed(value)
    paddle.seed(value)
    return value


def has_gpu():
    """True when Paddle is built with CUDA and sees at least one card."""
    import paddle
    return paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


#: Paddle flags for reproducible GPU kernels (``deterministic: true``): cuDNN picks deterministic
#: convolution/BatchNorm algorithms (no exhaustive search), embedding gradients avoid atomics.
DETERMINISTIC_FLAGS = {"FLAGS_cudnn_deterministic": True, "FLAGS_cudnn_exhaustive_search": False,
                       "FLAGS_embedding_deterministic": 1}


def set_deterministic(enabled=False):
    """Top-level ``deterministic``: set Paddle's deterministic-kernel flags; returns those set.

    Only flags this Paddle build has are set: a CPU build has none of them (its kernels are
    deterministic already, which is what makes CPU resumes bit-identical).
    """
    if not isinstance(enabled, bool):
        raise ConfigError(f"deterministic: expected true or false, got {enabled!r}")
    if not enabled:
        return {}
    import paddle
    known = paddle.base.core.globals()
    chosen = {flag: value for flag, value in DETERMINISTIC_FLAGS.items() if flag in known}
    if chosen:
        paddle.set_flags(chosen)
    return chosen


def select_device(device="auto"):
    """'cpu' or 'gpu' from the config's ``device``; sets Paddle's device and returns the choice."""
    import paddle
    if device not in DEVICES:
        raise ConfigError(f"device: expected one of {', '.join(DEVICES)}, got {device!r}")
    gpu = has_gpu()
    if device == "gpu" and not gpu:
        raise ConfigError("device: gpu requested but Paddle has no visible CUDA device; "
                          "install paddlepaddle-gpu or use -o device=cpu")
    chosen = "gpu" if device == "gpu" or (device == "auto" and gpu) else "cpu"
    paddle.set_device(f"gpu:{launcher_card()}" if chosen == "gpu" else "cpu")
    return chosen


def select_device_and_join(device="auto"):
    """:func:`select_device`, then join the launcher's process group; returns
    ``(device, world size)``.

    Joining sets Paddle's device again: with NCCL (the launcher's backend on a GPU build that
    sees cards) each process is put on its card whatever was chosen before. ``device: cpu``
    there would train on the GPU while the log said cpu, AMP stayed off and SyncBatchNorm was
    skipped, so it is refused; the gloo backend leaves the processes on the CPU.
    """
    import paddle
    from passl import distributed
    chosen = select_device(device)
    world_size = distributed.init_process_group()
    if chosen == "cpu" and paddle.get_device() != "cpu":
        raise ConfigError(
            f"device: cpu, but the launcher joined the {world_size} processes over NCCL, which "
            f"puts each on a GPU ({paddle.get_device()} here); use -o device=gpu, or train on "
            f"CPUs with PADDLE_DISTRI_BACKEND=gloo set before python -m "
            f"paddle.distributed.launch")
    return chosen, world_size


def launcher_card():
    """This process's GPU number: the card the launcher handed it in ``FLAGS_selected_gpus``
    (read by ``ParallelEnv``), 0 without a launcher. Not ``PADDLE_LOCAL_RANK``: ``--gpus 4,5``
    gives local rank 0 card 4 (the number is among the visible cards)."""
    import paddle
    return paddle.distributed.ParallelEnv().device_id
