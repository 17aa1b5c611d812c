"""Test-only components for the engine tests, registered under ``ToyEngine*`` names.

A norm-free MLP that regresses a fixed random "teacher" network, a synthetic dataset whose
samples get NumPy noise at load time (so exact resuming needs the RNG state), an evaluator
hook, and hooks that inject failures. Subprocess tests run ``tests/toy_train_cli.py``, which
imports this module and then runs ``tools/train.py``.
"""
import errno
import multiprocessing
import os
import signal as signal_module
import types

import numpy as np
import paddle
import paddle.amp.grad_scaler as grad_scaler
import paddle.nn as nn
import yaml
from paddle.amp.auto_cast import amp_global_state

from passl.data import DATASETS
from passl.engine.amp import MixedPrecision
from passl.engine.hooks import HOOKS, Hook
from passl.evaluation.classification import evaluate as classification_evaluate
from passl.io import checkpoint, metrics_log
from passl.io.safe_write import write_failure
from passl.models import MODELS

DIM, CLASSES = 8, 4


def teacher_outputs(x):
    """The fixed function the toy model learns: ``tanh(x @ W)`` for a seeded ``W``."""
    weight = np.random.RandomState(123).randn(DIM, CLASSES).astype("float32")
    return np.tanh(x @ weight)


@DATASETS.register("ToyEngineDataset")
class ToyEngineDataset(paddle.io.Dataset):
    """``size`` fixed vectors; each load adds ``noise`` x N(0, 1) from NumPy's global RNG."""

    def __init__(self, size=32, noise=0.1, seed=0):
        self.x = np.random.RandomState(seed).randn(size, DIM).astype("float32")
        self.labels = teacher_outputs(self.x).argmax(axis=1).astype("int64")
        self.noise = noise
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        x = self.x[index] + self.noise * np.random.randn(DIM).astype("float32")
        return x.astype("float32"), self.labels[index]


@MODELS.register("ToyEngineModel")
class ToyEngineModel(nn.Layer):
    """MLP without normalisation layers; loss = MSE to the teacher. ``dropout`` uses Paddle's
    RNG. ``poisoned`` (set by a test hook) turns the loss into NaN."""

    def __init__(self, hidden=16, dropout=0.0):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(DIM, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden, CLASSES)
        self.teacher = paddle.to_tensor(np.random.RandomState(123).randn(DIM, CLASSES)
                                        .astype("float32"))
        self.poisoned = False

    def forward(self, batch):
        x, labels = batch
        out = self.head(self.backbone(x))
        if not self.training:
            return {"logits": out, "labels": labels}
        loss = ((out - paddle.tanh(x @ self.teacher)) ** 2).mean()
        if self.poisoned:
            loss = loss * float("nan")
        return {"loss": loss, "logs": {"abs_out": out.abs().mean()}}


@HOOKS.register("ToyEngineAccuracy")
class ToyEngineAccuracy(Hook):
    """Evaluator: top-1 of the toy model on the val loader."""

    def evaluate(self, trainer):
        result = classification_evaluate(trainer.model, trainer.val_loader, ks=(1,))
        return {"top1": result["top1"]}


@HOOKS.register("ToyEngineKill")
class ToyEngineKill(Hook):
    """Sends ``signal`` (default SIGKILL) ``times`` times to its own process at
    (epoch, inner_iter) of a run that did not resume; only on process ``rank`` when given."""

    def __init__(self, epoch, inner_iter, rank=None, signal="SIGKILL", times=1):
        self.at = (epoch, inner_iter)
        self.rank = rank
        self.signal = getattr(signal_module, signal)
        self.times = times

    def before_iter(self, trainer):
        if trainer.start_epoch == 0 and (trainer.epoch, trainer.inner_iter) == self.at \
                and self.rank in (None, trainer.rank):
            for _ in range(self.times):
                os.kill(os.getpid(), self.signal)


@HOOKS.register("ToyEngineNaN")
class ToyEngineNaN(Hook):
    """Makes the model's loss NaN from global iteration ``at_iter`` on (before ``until``), on
    every process or only on process ``rank``."""

    def __init__(self, at_iter, until=None, rank=None):
        self.at_iter = at_iter
        self.until = until
        self.rank = rank

    def before_iter(self, trainer):
        trainer.model.poisoned = self.at_iter <= trainer.iter < (self.until or float("inf")) \
            and self.rank in (None, trainer.rank)


@HOOKS.register("ToyEngineDumpParams")
class ToyEngineDumpParams(Hook):
    """Saves this process's parameters to ``output_dir/params.rank{R}.npz`` after the run."""

    def after_run(self, trainer):
        np.savez(os.path.join(trainer.output_dir, f"params.rank{trainer.rank}.npz"),
                 **{name: p.numpy() for name, p in trainer.model.named_parameters()})


@HOOKS.register("ToyEngineDumpQueue")
class ToyEngineDumpQueue(Hook):
    """Saves this rank's SwAV queue at the start of the first epoch this process runs
    (``output_dir/queue.rank{R}.npy``), after SwAVHook (a higher priority) has set it up."""

    def before_epoch(self, trainer):
        queue = trainer.model.loss.queue
        if queue is not None and trainer.epoch == trainer.start_epoch:
            np.save(os.path.join(trainer.output_dir, f"queue.rank{trainer.rank}.npy"),
                    queue.embeddings.numpy())


@HOOKS.register("ToyEngineDumpOrder")
class ToyEngineDumpOrder(Hook):
    """Saves the sample numbers this rank reads in each epoch (a sampler with ``order()``,
    e.g. TarShards') to ``output_dir/order.rank{R}.epoch{E}.npy``."""

    def before_epoch(self, trainer):
        np.save(os.path.join(trainer.output_dir, f"order.rank{trainer.rank}.epoch{trainer.epoch}"),
                trainer.train_loader.batch_sampler.order())


def toy_config(output_dir, epochs=3, batch_size=8, size=32, hooks=(), val=False, **top_level):
    """A plain-dict config for the toy run (pass ``hooks`` as a list of blocks)."""
    data = {"dataset": {"name": "ToyEngineDataset", "size": size},
            "sampler": {"batch_size": batch_size}}
    cfg = {
        "epochs": epochs, "output_dir": str(output_dir), "seed": 7, "device": "cpu",
        "threads": 1, "log_interval": 1,
        "model": {"name": "ToyEngineModel", "dropout": 0.2},
        "dataloader": {"train": data},
        "optimizer": {"name": "LARS", "weight_decay": 1e-4, "trust_coefficient": 0.1},
        "lr_scheduler": {"name": "CosineWarmup", "base_lr": 1.0, "final_lr": 0.01,
                         "warmup_epochs": 1, "start_warmup": 0.1},
        "hooks": [{"name": "LoggerHook", "progress_bar": False}, *hooks],
    }
    if val:
        cfg["dataloader"]["val"] = {"dataset": {"name": "ToyEngineDataset", "size": 16, "seed": 1,
                                                "noise": 0.0},
                                    "sampler": {"batch_size": 8}}
    cfg.update(top_level)
    return cfg


def write_config(cfg, path):
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


@HOOKS.register("ToyEngineKillWorker")
class ToyEngineKillWorker(Hook):
    """SIGKILLs the data-loader workers (as the out-of-memory killer does) at
    (epoch, inner_iter)."""

    def __init__(self, epoch, inner_iter):
        self.at = (epoch, inner_iter)

    def before_iter(self, trainer):
        if (trainer.epoch, trainer.inner_iter) == self.at:
            for worker in multiprocessing.active_children():
                os.kill(worker.pid, signal_module.SIGKILL)


def fill_disk(path, partial=b"half a file"):
    """A ``paddle.save`` stand-in for a full disk: writes the start of the file, then raises
    ENOSPC as the real call does when the device fills up."""
    with open(path, "wb") as f:
        f.write(partial)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def full_metrics_disk(path, text):
    """A ``metrics_log.append_text`` stand-in for a full disk."""
    raise write_failure(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))


@HOOKS.register("ToyEngineDiskFull")
class ToyEngineDiskFull(Hook):
    """From epoch ``epoch`` (0-based) on, every checkpoint write (``what: checkpoint``) or
    every metrics.jsonl append (``what: metrics``) fails with ENOSPC."""

    def __init__(self, epoch, what="checkpoint"):
        self.epoch = epoch
        self.what = what

    def before_epoch(self, trainer):
        if trainer.epoch != self.epoch:
            return
        if self.what == "metrics":
            metrics_log.append_text = full_metrics_disk
        else:
            checkpoint.paddle.save = lambda obj, path, *args, **kwargs: fill_disk(path)


def force_float16_scaler(monkeypatch):
    """Every ``MixedPrecision`` built in this test acts as on a GPU with float16: an enabled,
    real ``paddle.amp.GradScaler`` on CPU tensors (Paddle enables one only on a GPU place, and
    the scaler turns itself off unless autocast last ran in float16; CPU has no such kernels,
    so the forward pass itself stays float32)."""
    place = types.SimpleNamespace(is_gpu_place=lambda: True, is_xpu_place=lambda: False,
                                  is_custom_place=lambda: False)
    monkeypatch.setattr(grad_scaler, "_dygraph_tracer",
                        lambda: types.SimpleNamespace(_expected_place=place))
    monkeypatch.setattr(paddle.amp, "is_float16_supported", lambda: True)
    monkeypatch.setattr(amp_global_state(), "amp_dtype", "float16")
    build = MixedPrecision.__init__
    monkeypatch.setattr(MixedPrecision, "__init__",
                        lambda self, cfg, device: build(self, cfg, "gpu"))


@HOOKS.register("ToyEngineWaitFor")
class ToyEngineWaitFor(Hook):
    """Holds the run in ``before_run`` (its output_dir locked) until the file ``path`` exists,
    so a test can start a second run against it."""

    def __init__(self, path, timeout=120):
        self.path, self.timeout = path, timeout

    def before_run(self, trainer):
        import time
        deadline = time.time() + self.timeout
        while not os.path.exists(self.path) and time.time() < deadline:
            time.sleep(0.05)
