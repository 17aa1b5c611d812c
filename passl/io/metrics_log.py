"""``output_dir/metrics.jsonl``: one JSON object per line, the run's machine-readable record.

Record types (the ``type`` key):

* ``train``  every log interval: ``epoch`` (1-based), ``iter`` (optimizer steps done),
  ``loss`` and every other model log averaged over the interval and the processes,
  ``lr``, ``ips`` (images per second over all processes);
* ``eval``   every evaluation: ``epoch``, ``iter`` and the evaluator's metrics
  (``top1``, ``top5``, ``knn_top1`` ...);
* ``event``  something that stopped or endangered the run (e.g. a non-finite loss);
* ``summary`` at the end: ``total_time_s``, ``mean_ips``, ``peak_memory_mb``, ``memory``.

Only rank 0 writes. Each line is flushed when written, so the file is readable during the run
and complete up to the last record after a crash. A line that cannot be written (a full disk)
is cut off again and raises :class:`~passl.io.safe_write.OutputWriteError`, which stops the
run; later records of that run are dropped (the end-of-run summary among them).
"""
import json
import math
import os

import numpy as np
import paddle

from passl.io.safe_write import OutputWriteError, append_text, write_text_atomic


def _plain(value):
    """A JSON-friendly Python value (Paddle/NumPy scalars become floats; NaN stays readable)."""
    if isinstance(value, paddle.Tensor):
        value = value.numpy()
    if isinstance(value, np.ndarray):
        value = value.item() if value.size == 1 else value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Infinity
    return value


class MetricsLog:
    """Appends records to ``path`` (a no-op when ``enabled`` is false, i.e. on ranks > 0)."""

    def __init__(self, path, enabled=True):
        self.path = path
        self.enabled = enabled
        self.sinks = []  # callables that also receive every record (e.g. VisualDL)
        self.failed = False
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, record):
        if not self.enabled or self.failed:
            return
        record = {key: _plain(value) for key, value in record.items()}
        try:
            append_text(self.path, json.dumps(record) + "\n")
        except OutputWriteError:
            self.failed = True
            raise
        for sink in self.sinks:
            sink(record)

    def start_fresh(self):
        """Move the records of an earlier run in the same output_dir to ``*.previous.jsonl``."""
        if self.enabled and os.path.isfile(self.path):
            os.replace(self.path, self.path[:-len(".jsonl")] + ".previous.jsonl")
            return True
        return False

    def truncate_after(self, iteration):
        """Drop records past optimizer step ``iteration`` (resuming from a checkpoint taken there).

        A killed run may have logged steps after its last checkpoint; the resumed run logs
        them again, so they are removed first and the file reads as one uninterrupted run.
        """
        if not self.enabled or not os.path.isfile(self.path):
            return
        kept = [r for r in read_metrics(self.path)
                if r.get("type") != "summary" and r.get("iter", 0) <= iteration]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(path, record_type=None):
    """The records of a metrics.jsonl file, optionally only those of one ``type``."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for number, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines) - 1:
                raise
            # the last line of a run killed while writing it: incomplete, ignore it
    return [r for r in records if record_type is None or r.get("type") == record_type]
