"""Stopping a run cleanly on a signal: cluster preemption (SIGTERM, SIGUSR1) and Ctrl-C.

Clusters stop a job by sending SIGTERM (SLURM, Kubernetes), or SIGUSR1 some time ahead with
SLURM's ``--signal``, then SIGKILL after a grace period. While the trainer runs, the handlers
here only note the signal; at every step boundary the trainer asks :meth:`StopSignals.agreed`
(every rank at the same step: an all-reduce of the noted signal, so ranks that got the signal
at different moments still stop after the same step), writes a mid-epoch checkpoint and raises
:class:`TrainingStopped`; ``tools/train.py`` prints one line with the ``--resume auto``
command and exits with :data:`STOPPED_STATUS`. A Ctrl-C while a stop is pending aborts at once
(KeyboardInterrupt), without a checkpoint.

Paddle installs C++ handlers at import that print a stack dump on SIGTERM; these handlers are
installed after Paddle is loaded and replace them while the trainer runs.
"""
import signal

import paddle

from passl import distributed

#: Signals that ask the run to stop after the current step.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
#: Exit status of a run stopped by a signal after writing its checkpoint: EX_TEMPFAIL of
#: sysexits.h ("temporary failure, try again later"), distinct from success (0), user errors
#: (2), a failure (1) and death by a signal (128 + N).
STOPPED_STATUS = 75


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
    """Notes the first stop signal; a SIGINT after it raises KeyboardInterrupt at once."""

    def __init__(self, logger):
        self.logger = logger
        self.received = 0
        self.previous = {}

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

    def agreed(self, failed=False):
        """``(signal, failed)``: the signal any rank has received (0: none), and whether any
        rank's ``failed`` is true (an output it could not write). Collective: all ranks call it
        at the same step; alone, it costs nothing."""
        if distributed.get_world_size() == 1:
            return self.received, failed
        flags = paddle.to_tensor([self.received, int(failed)], dtype="int32")
        signum, any_failed = distributed.all_reduce(flags, op="max").numpy().tolist()
        return int(signum), bool(any_failed)
