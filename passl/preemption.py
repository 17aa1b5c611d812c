"""Stopping a run cleanly on a signal: cluster preemption (SIGTERM, SIGUSR1) and Ctrl-C.

Clusters stop a job by sending SIGTERM (SLURM, Kubernetes), or SIGUSR1 some time ahead with
SLURM's ``--signal``, then SIGKILL after a grace period. While the trainer runs, the handlers
here only note the signal; at the step boundaries where :meth:`StopSignals.due` says so the
trainer asks :meth:`StopSignals.agreed` (every rank at the same step: an all-reduce of the
noted signal, so ranks that got the signal at different moments still stop after the same
step), writes a mid-epoch checkpoint and raises :class:`TrainingStopped`; ``tools/train.py``
prints one line with the ``--resume auto`` command and exits with :data:`STOPPED_STATUS`. A
Ctrl-C while a stop is pending aborts at once (KeyboardInterrupt), without a checkpoint.

One process acts on a signal after the very step. Several agree only every few steps: reading
the all-reduced value on the host waits for all the work queued on the GPU, which would stall
every step. They agree at the end of each epoch and about every :data:`AGREE_EVERY_SECONDS`
of training, but at least every log interval: the interval is derived at each agreement from
the slowest rank's measured step time, an all-reduced value, so every rank derives the same.

Paddle installs C++ handlers at import that print a stack dump on SIGTERM; these handlers are
installed after Paddle is loaded and replace them while the trainer runs.
"""
import signal
import time

import paddle

from passl import distributed

#: Signals that ask the run to stop after the current step.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
#: Exit status of a run stopped by a signal after writing its checkpoint: EX_TEMPFAIL of
#: sysexits.h ("temporary failure, try again later"), distinct from success (0), user errors
#: (2), a failure (1) and death by a signal (128 + N).
STOPPED_STATUS = 75
#: Several processes agree on a stop about this often (seconds of training): well inside the
#: 30 s ``paddle.distributed.launch`` waits between its SIGTERM and SIGKILL.
AGREE_EVERY_SECONDS = 2.0


class TrainingStopped(Exception):
    """The run stopped on a signal after saving a checkpoint from which it continues exactly."""

    def __init__(self, signal_name, checkpoint, iteration):
        super().__init__(f"stopped by {signal_name} after iteration {iteration}; "
                         f"checkpoint {checkpoint}")
        self.signal_name = signal_name
        self.checkpoint = checkpoint
        self.iteration = iteration


def ignore_stop_signals():
    """For data-loader workers: the training process decides when to stop and shuts them
    down itself (a worker killed by a forwarded SIGTERM would fail the step in progress)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def interrupt_on_stop_signals():
    """Before training starts there is nothing to save: SIGTERM and SIGUSR1 stop the process
    at once as Ctrl-C does (one ``error: interrupted`` line instead of Paddle's C++ dump)."""
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, _interrupt)


class StopSignals:
    """Notes the first stop signal; a SIGINT after it raises KeyboardInterrupt at once.

    Args:
        logger: where the received signal is announced.
        max_interval: the most steps between two agreements of several processes (the
            trainer passes the log interval, whose record already reads the device).
        seconds: the aimed time between two agreements (:data:`AGREE_EVERY_SECONDS`).
    """

    def __init__(self, logger, max_interval=1, seconds=AGREE_EVERY_SECONDS):
        self.logger = logger
        self.received = 0
        self.previous = {}
        self.max_interval = max_interval
        self.seconds = seconds
        self.interval = 1        # steps between agreements, the same on every rank
        self.next_agreement = 0  # steps done (in all) at which the ranks next agree
        self.agreed_steps = self.agreed_at = None  # steps done and clock at the last one

    def install(self):
        self.received = 0
        for signum in STOP_SIGNALS:
            self.previous[signum] = signal.signal(signum, self._note)

    def uninstall(self):
        """Back to the previous handlers; after a stop, SIGTERM and SIGUSR1 stay ignored: the
        process is exiting with its checkpoint saved (and the launcher sends SIGTERM to every
        rank as soon as one of them has exited)."""
        for signum, handler in self.previous.items():
            if self.received and signum != signal.SIGINT:
                handler = signal.SIG_IGN
            # None: the previous handler was not Python's (Paddle's C++ dump handler)
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self.previous = {}

    def _note(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.received:
            self.received = signum
            self.logger.warning(f"received {signal.Signals(signum).name}: stopping after the "
                                f"current step with a checkpoint (Ctrl-C again aborts at once)")

    def due(self, steps_done, end_of_epoch=False):
        """Whether the ranks agree after this step (``steps_done`` optimizer steps in all):
        always for one process (it costs nothing), else at the end of each epoch and every
        :attr:`interval` steps. Depends only on values every rank shares."""
        return distributed.get_world_size() == 1 or end_of_epoch \
            or steps_done >= self.next_agreement

    def agreed(self, failed=False, steps_done=None):
        """``(signal, failed)``: the signal any rank has received (0: none), and whether any
        rank's ``failed`` is true (an output it could not write). Collective: all ranks call it
        at the same step; alone, it costs nothing. With ``steps_done`` (a step boundary) it
        also sets when the ranks agree next."""
        if distributed.get_world_size() == 1:
            return self.received, failed
        step_seconds = 0.0
        if steps_done is not None and self.agreed_steps is not None \
                and steps_done > self.agreed_steps:
            step_seconds = (time.perf_counter() - self.agreed_at) / (steps_done - self.agreed_steps)
        flags = paddle.to_tensor([self.received, int(failed), step_seconds], dtype="float64")
        signum, any_failed, slowest = distributed.all_reduce(flags, op="max").numpy().tolist()
        if steps_done is not None:
            if slowest > 0:
                self.interval = max(1, min(self.max_interval, int(self.seconds / slowest)))
            self.agreed_steps, self.next_agreement = steps_done, steps_done + self.interval
        # the steps after an agreement (also one after evaluation) are timed from its end
        self.agreed_at = time.perf_counter()
        return int(signum), bool(any_failed)
