"""Visible progress: a tqdm bar per epoch, metrics.jsonl records, an end-of-run summary."""
import datetime
import resource
import sys
import time

import paddle
from tqdm import tqdm

from passl import distributed
from passl.engine.hooks.base import HOOKS, Hook, Priority
from passl.errors import ConfigError
from passl.utils.logger import FILE_ONLY


def _seconds(value):
    return str(datetime.timedelta(seconds=int(value)))


def peak_memory_mb():
    """``(MB, what)``: max allocated GPU memory on GPU, else this process's peak RSS."""
    if paddle.get_device().startswith("gpu"):
        return paddle.device.cuda.max_memory_allocated() / 2 ** 20, "gpu_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"  # KB on Linux


class VisualDLSink:
    """Forwards the numbers of every metrics record to a VisualDL ``LogWriter``."""

    def __init__(self, logdir):
        from visualdl import LogWriter
        self.writer = LogWriter(logdir=logdir)

    def __call__(self, record):
        kind, step = record.get("type", "train"), record.get("iter", 0)
        for key, value in record.items():
            if key not in ("type", "epoch", "iter") and isinstance(value, (int, float)):
                self.writer.add_scalar(tag=f"{kind}/{key}", step=step, value=value)


@HOOKS.register()
class LoggerHook(Hook):
    """Logs training progress every ``log_interval`` iterations.

    Config keys (``hooks`` entry ``name: LoggerHook``; added with the defaults when the
    config does not list it):
        log_interval: iterations between ``metrics.jsonl`` records (default: the top-level
            ``log_interval``, else 10); the last iteration of an epoch always writes one.
        progress_bar: ``auto`` (a tqdm bar on rank 0 when stderr is a terminal), true or
            false. Every record is also a line in train.log; without the bar it is printed too.
        visualdl: also write the records to ``output_dir/visualdl`` (needs ``visualdl``).

    Each record averages the loss and every model log over the interval and all processes;
    ``ips`` counts images (``labels.shape[0]`` of each batch, not crops) over all processes.
    The values stay on the device until a record is written (one host read per record, not
    per step). Under float16 AMP, steps the GradScaler skipped (non-finite loss or gradients)
    are left out of the averages and counted in ``skipped_steps``.
    """

    priority = Priority.BELOW_NORMAL

    def __init__(self, log_interval=10, progress_bar="auto", visualdl=False):
        if not isinstance(log_interval, int) or log_interval < 1:
            raise ConfigError(f"LoggerHook.log_interval: expected an integer >= 1, "
                              f"got {log_interval!r}")
        if progress_bar not in ("auto", True, False):
            raise ConfigError(f"LoggerHook.progress_bar: expected auto, true or false, "
                              f"got {progress_bar!r}")
        self.log_interval = log_interval
        self.progress_bar = progress_bar
        self.visualdl = visualdl
        self.bar = None
        self.interval_steps = 0
        self.resumed_interval = None

    # ------------------------------------------------------------------ run

    def before_run(self, trainer):
        self.run_start = time.perf_counter()
        self.train_seconds = 0.0
        self.images_seen = 0
        self.iters_done = 0
        self.epochs_completed = trainer.start_epoch
        self.show_bar = trainer.rank == 0 and (
            sys.stderr.isatty() if self.progress_bar == "auto" else self.progress_bar)
        if self.visualdl and trainer.rank == 0:
            try:
                trainer.metrics.sinks.append(VisualDLSink(f"{trainer.output_dir}/visualdl"))
            except ImportError:
                trainer.logger.warning("LoggerHook.visualdl: the visualdl package is not "
                                       "installed (pip install visualdl); logging without it")

    def after_run(self, trainer):
        if self.bar is not None:
            self.bar.close()
        total = time.perf_counter() - self.run_start
        memory, memory_kind = peak_memory_mb()
        mean_ips = self.images_seen / self.train_seconds if self.train_seconds else 0.0
        trainer.metrics.write({"type": "summary", "epoch": self.epochs_completed,
                               "iter": trainer.iter, "completed": trainer.completed, "total_time_s": round(total, 3),
                               "mean_ips": mean_ips, "peak_memory_mb": round(memory, 1),
                               "memory": memory_kind})
        trainer.logger.info(f"{'finished' if trainer.completed else 'stopped'} after "
                            f"{trainer.iter} iterations in {_seconds(total)}: mean {mean_ips:.1f} "
                            f"images/s, peak memory {memory:.0f} MB ({memory_kind})")

    # ------------------------------------------------------------------ epoch

    def before_epoch(self, trainer):
        self.epoch_start = time.perf_counter()
        self._reset_interval()
        if self.resumed_interval:
            self.interval_sums = dict(self.resumed_interval["sums"])
            self.interval_steps = self.resumed_interval["steps"]
            self.resumed_interval = None
        if self.show_bar:
            resumed = trainer.start_step if trainer.epoch == trainer.start_epoch else 0
            self.bar = tqdm(total=trainer.iters_per_epoch, initial=resumed, dynamic_ncols=True,
                            leave=True, desc=f"epoch {trainer.epoch + 1}/{trainer.epochs}")

    def after_epoch(self, trainer):
        self.epochs_completed = trainer.epoch + 1

    # ------------------------------------------------------------------ iteration

    def _reset_interval(self):
        self.interval_start = time.perf_counter()
        self.interval_sums = {}   # device tensors or floats: read only when a record is written
        self.interval_steps = 0
        self.interval_images = 0
        self.interval_skipped = 0

    def _accumulate(self, values):
        """Add this step's values without reading them: ``float(tensor)`` would wait for the
        GPU every step; the sums are read once per record."""
        for key, value in values.items():
            if isinstance(value, paddle.Tensor):
                value = value.detach().astype("float64").reshape([])
            total = self.interval_sums.get(key)
            self.interval_sums[key] = value if total is None else total + value

    def after_iter(self, trainer):
        if getattr(trainer.amp, "last_step_skipped", False):  # float16: a non-finite step
            self.interval_skipped += 1                        # is left out of the averages
        else:
            self._accumulate({"loss": trainer.outputs["loss"], **trainer.outputs.get("logs", {})})
            self.interval_steps += 1
        self.interval_images += trainer.batch_images
        if self.bar is not None:
            self.bar.update(1)
        end_of_epoch = trainer.inner_iter + 1 == trainer.iters_per_epoch
        if (trainer.inner_iter + 1) % self.log_interval == 0 or end_of_epoch:
            self._write_record(trainer)
        if end_of_epoch:
            self.train_seconds += time.perf_counter() - self.epoch_start
            if self.bar is not None:  # closed before evaluation and checkpoint messages
                self.bar.close()
                self.bar = None

    def _write_record(self, trainer):
        """Average the interval over processes (a collective) and write one train record."""
        keys = sorted(self.interval_sums)
        sums = [self.interval_sums[k] for k in keys]
        sums = [v if isinstance(v, paddle.Tensor) else paddle.to_tensor(v, dtype="float64")
                for v in sums]
        counts = paddle.to_tensor([self.interval_steps, self.interval_images,
                                   self.interval_skipped], dtype="float64")
        totals = paddle.concat([paddle.stack(sums), counts]) if sums else counts
        totals = distributed.all_reduce(totals, op="sum").numpy()  # the one host read
        steps, images, skipped = totals[-3], int(totals[-2]), int(totals[-1])
        means = {k: float(total / steps) if steps else float("nan")
                 for k, total in zip(keys, totals)}
        elapsed = max(time.perf_counter() - self.interval_start, 1e-9)
        ips = images / elapsed
        self.images_seen += images
        self.iters_done += self.interval_steps + self.interval_skipped
        record = {"type": "train", "epoch": trainer.epoch + 1, "iter": trainer.iter + 1,
                  "loss": means.pop("loss", float("nan")), "lr": trainer.optimizer.get_lr(),
                  "ips": ips, **means}
        if getattr(trainer.amp, "scaler", None) is not None:
            record["skipped_steps"] = skipped // trainer.world_size
        trainer.metrics.write(record)
        eta = self._eta(trainer)
        line = (f"epoch {record['epoch']}/{trainer.epochs} iter {trainer.inner_iter + 1}/"
                f"{trainer.iters_per_epoch} loss {record['loss']:.4f} lr {record['lr']:.4g} "
                f"images/s {ips:.1f} eta {eta}" + "".join(f" {k} {v:.4g}" for k, v in means.items()))
        if self.bar is not None:  # the bar shows the numbers; the log file still gets the line
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.4g}",
                                 ips=f"{ips:.1f}", eta=eta)
            trainer.logger.info(line, extra=FILE_ONLY)
        else:
            trainer.logger.info(line)
        self._reset_interval()

    def state_dict(self):
        """The losses of a logging interval cut by a mid-epoch checkpoint, so that the resumed
        run's next record averages the same steps as the uninterrupted run's."""
        if not self.interval_steps:
            return {}
        return {"sums": dict(self.interval_sums), "steps": self.interval_steps}

    def set_state_dict(self, state):
        self.resumed_interval = state

    def _eta(self, trainer):
        """Remaining time of the whole run, from this run's mean time per iteration."""
        spent = self.train_seconds + (time.perf_counter() - self.epoch_start)
        remaining = trainer.epochs * trainer.iters_per_epoch - (trainer.iter + 1)
        return _seconds(spent / max(self.iters_done, 1) * remaining)
