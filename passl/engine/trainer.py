"""The training loop: builds everything from the config, runs epochs of steps, calls hooks.

The trainer knows no method by name. A model maps a batch to ``{'loss', 'logs'}``; the
trainer does the backward pass, the optimizer and lr steps and fires the hook events;
method-specific behaviour (SwAV's prototype freezing and queue) lives in hooks, and so do
checkpoints, logging and health checks.

Evaluation: a hook with a method ``evaluate(trainer) -> {metric: value}`` is an evaluator.
:meth:`Trainer.evaluate` runs every evaluator and writes one ``eval`` record to
``metrics.jsonl``; during training it runs every ``eval_interval`` epochs and after the last
one, before the ``after_epoch`` hooks (so a checkpoint includes what evaluation changed).
An evaluator typically loops over ``trainer.val_loader`` with ``trainer.model`` in eval
mode (``passl.evaluation.classification.evaluate``) or builds its own loaders (kNN).
"""
import contextlib
import os
import signal

import paddle

from passl import distributed
from passl.config import ConfigDict, save_config
from passl.data import build_dataloader, set_loader_epoch
from passl.data.device_input import batch_normalizer, check_shared_memory
from passl.engine import run_dir, trainer_checkpoint, world_change
from passl.engine.amp import MixedPrecision
from passl.engine.hooks import HOOKS
from passl.engine.run_lock import RunLock
from passl.errors import ConfigError, UserError
from passl.io import checkpoint
from passl.io.metrics_log import MetricsLog
from passl.io.safe_write import OutputWriteError
from passl.io.weights import load_pretrained
from passl.models import MODELS
from passl.preemption import StopSignals, TrainingStopped
from passl.registry import key_path_of
from passl.runtime import (configure_cpu_threads, local_process_count, seed_everything,
                           select_device_and_join, set_deterministic)
from passl.solver.lr_scheduler import build_lr_scheduler
from passl.solver.optimizers import build_optimizer
from passl.utils.logger import open_log_file, setup_logger

#: Hooks every run has; a ``hooks`` entry with the same name replaces the default one.
DEFAULT_HOOKS = ("CheckpointHook", "LoggerHook", "HealthHook")


class Trainer:
    """Train (or evaluate) the config's model; one code path for CPU/GPU and 1..N processes.

    The run holds ``output_dir/run.lock`` from construction until :meth:`train` or
    :meth:`evaluate` returns (:mod:`passl.engine.run_lock`).

    Args:
        cfg: the loaded config (:func:`passl.config.load_config`).
        resume: a checkpoint path, or ``'auto'`` for the newest readable checkpoint in
            ``output_dir/checkpoints`` (:func:`~passl.io.checkpoint.find_resume_checkpoint`);
            restores model, optimizer, schedule, AMP scaler, hook states, RNG and position.
            A checkpoint that trained all ``epochs`` raises
            :class:`~passl.io.checkpoint.RunAlreadyComplete`.
        pretrained: a weights file loaded into ``model.backbone`` (a linear evaluation).
        load: a checkpoint (or model state dict) loaded into the whole model.
        pretrained_strict: refuse pretrained weights that do not fit the backbone exactly
            (missing, unexpected or mis-shaped tensors); false loads the matching ones.
        trust_file: read ``resume``/``pretrained``/``load`` with ``paddle.load``, which runs
            code from the file (``--trust-file``); by default only plain state is read.

    Attributes hooks may use (besides those in :class:`~passl.engine.hooks.base.Hook`):
        ``batch_images`` (images in this step's batch on this process, ``labels.shape[0]``),
        ``start_epoch`` (first epoch this process runs), ``start_step`` (steps of it done
        before a mid-epoch resume), ``completed`` (the loop finished),
        ``amp`` (:class:`~passl.engine.amp.MixedPrecision`), ``device``, ``hooks``.
    """

    def __init__(self, cfg, resume=None, pretrained=None, load=None, pretrained_strict=True,
                 evaluate_only=False, archive_old_run=False, trust_file=False):
        self.cfg = cfg
        self.trust_file = trust_file
        self.output_dir = cfg.get("output_dir") or "output"
        self.epochs = cfg.get("epochs")
        self.evaluate_only = evaluate_only
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(f"epochs: expected a positive integer, got {self.epochs!r}")
        # Nothing is written into output_dir until the run is built (a failed start leaves
        # an earlier run there as it was) but the lock; the log waits in memory until then.
        self._start_up()
        self.run_lock = self._lock_output_dir()
        try:
            self._build(resume, pretrained, pretrained_strict, load, archive_old_run)
        except BaseException:
            self.run_lock.release()
            raise

    def _build(self, resume, pretrained, pretrained_strict, load, archive_old_run):
        cfg, evaluate_only = self.cfg, self.evaluate_only
        if not resume and not evaluate_only:
            run_dir.check_fresh_start(self.output_dir, archive_old_run)
        self.loaded_epoch = None  # epochs trained of the --load checkpoint, when it says
        self.model = self._build_model(pretrained, pretrained_strict, load)
        loaders = cfg.get("dataloader") or {}
        seed = cfg.get("seed", 0)
        resumed = self._load_resume_checkpoint(resume) if resume else None
        self.val_loader = build_dataloader(loaders["val"], mode="val", seed=seed) \
            if loaders.get("val") else None
        if not evaluate_only:
            self._build_training(loaders, seed)
        self.hooks = self._build_hooks()
        self.evaluators = [h for h in self.hooks if callable(getattr(h, "evaluate", None))]
        self.start_epoch = self.start_step = self.epoch = self.iter = self.inner_iter = 0
        self.outputs, self.batch_images, self.completed = None, 0, False
        self.resumed_rng = self.write_failure = None
        if resumed:
            self._resume(*resumed)
        self._open_output_dir(archive_old_run)
        if resume:
            self.metrics.truncate_after(self.iter)  # steps logged after the checkpoint

    def _lock_output_dir(self):
        """Process 0 takes ``output_dir/run.lock`` for the whole run (passl/engine/run_lock.py);
        when another run holds it, every process stops with the line naming the holder."""
        lock, refusal = RunLock(self.output_dir), None
        if self.rank == 0:
            try:
                notice = lock.acquire()
            except UserError as error:
                refusal = str(error)
            except OSError as error:
                refusal = (f"output_dir {self.output_dir}: cannot create {lock.path} "
                           f"({error.strerror or error})")
            else:
                if notice:
                    self.logger.warning(notice)
        refusal = distributed.all_gather_object(refusal)[0]
        if refusal:
            raise UserError(refusal)
        return lock

    def _build_training(self, loaders, seed):
        """The train loader, schedule, optimizer and AMP (not needed to evaluate)."""
        cfg = self.cfg
        if "train" not in loaders:
            raise ConfigError("dataloader.train: missing; the trainer needs a train loader")
        # a model that keeps per-sample state (DeepCluster-v2) asks for each image's index
        self.train_loader = build_dataloader(
            loaders["train"], mode="train", seed=seed,
            with_indices=getattr(self.model, "needs_sample_indices", False))
        check_shared_memory(self.train_loader, local_process_count(), self.logger)
        self.normalize_batch = batch_normalizer(self.train_loader)  # uint8 crops, on the device
        self._derive_run_values()
        self.lr_scheduler = build_lr_scheduler(cfg.get("lr_scheduler"), self.epochs,
                                               self.iters_per_epoch, self.global_batch_size)
        self.optimizer = build_optimizer(cfg.get("optimizer"), self.model, self.lr_scheduler,
                                         grad_clip=cfg.get("grad_clip"))
        self.amp = MixedPrecision(cfg.get("amp"), self.device)
        self.logger.info(f"mixed precision: {self.amp.describe()}")
        self.wrapped_model = paddle.DataParallel(self.model) if self.world_size > 1 else self.model

    def _open_output_dir(self, archive_old_run):
        """The run is built: move an old run aside if asked, then write config and log."""
        if archive_old_run and self.rank == 0:
            moved_to = run_dir.archive_run(self.output_dir)
            if moved_to:
                self.logger.info(f"the earlier run in {self.output_dir} was moved to {moved_to}")
        distributed.barrier()  # no rank writes into the folder while rank 0 moves it
        if self.rank == 0 and not self.evaluate_only:
            save_config(self.cfg, os.path.join(self.output_dir, "config.yaml"))
        open_log_file(self.output_dir, self.rank)
        self.metrics = MetricsLog(os.path.join(self.output_dir, "metrics.jsonl"),
                                  enabled=self.rank == 0)

    # ------------------------------------------------------------------ building

    def _start_up(self):
        cfg = self.cfg
        threads = configure_cpu_threads(cfg.get("threads", "auto"))  # idempotent
        deterministic = set_deterministic(cfg.get("deterministic", False))
        self.device, self.world_size = select_device_and_join(cfg.get("device", "auto"))
        self.rank = distributed.get_rank()
        self.logger = setup_logger(self.output_dir, self.rank, defer_file=True)
        # Training ranks draw different streams (DataParallel then broadcasts rank 0's weights);
        # evaluating only builds no DataParallel, so every rank must build the same random model
        seed_everything(cfg.get("seed", 0), 0 if self.evaluate_only else self.rank)
        self.logger.info(f"device {self.device}, {self.world_size} process(es), "
                         f"{threads['threads']} CPU thread(s) per process "
                         f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
                         f"MKL_DEBUG_CPU_TYPE={threads['MKL_DEBUG_CPU_TYPE']}); "
                         f"output in {self.output_dir}")
        if cfg.get("deterministic", False):
            flags = ", ".join(f"{k}={v}" for k, v in deterministic.items())
            self.logger.info(f"deterministic: {flags or 'no such flags in this Paddle build '}"
                             f"{'' if flags else '(CPU kernels are deterministic already)'}")
        if self.device == "cpu" and self.world_size == 1 and threads["threads"] > 1 \
                and not self.evaluate_only:
            self.logger.info(f"tip: on CPU, {threads['threads']} processes x 1 thread usually train "
                             f"faster (python -m paddle.distributed.launch --nproc_per_node "
                             f"{threads['threads']} tools/train.py ...; batch_size is per process)")

    def _build_model(self, pretrained, pretrained_strict, load):
        if not self.cfg.get("model"):
            raise ConfigError("model: missing block; add e.g. `model: {name: SwAV, ...}`")
        model = MODELS.build(self.cfg["model"])
        if pretrained:
            if not hasattr(model, "backbone"):
                raise UserError(f"--pretrained: {type(model).__name__} has no backbone to load "
                                f"weights into")
            load_pretrained(model.backbone, pretrained, strict=pretrained_strict,
                            trust=self.trust_file)
            self.logger.info(f"backbone weights loaded from {pretrained}")
        if load:
            self.loaded_epoch = checkpoint.load_model_weights(model, load, trust=self.trust_file)
            self.logger.info(f"model weights loaded from {load}")
        return self._maybe_sync_bn(model)

    def _maybe_sync_bn(self, model):
        """``sync_bn: true``: SyncBatchNorm on GPU with several processes (Paddle has no CPU
        kernel for it, so CPU keeps per-process BatchNorm statistics, with a warning)."""
        if not self.cfg.get("sync_bn", False) or self.world_size == 1:
            return model
        if self.device != "gpu":
            self.logger.warning("sync_bn: Paddle has no SyncBatchNorm on CPU; keeping BatchNorm "
                                "with per-process batch statistics")
            return model
        self.logger.info("sync_bn: BatchNorm layers converted to SyncBatchNorm")
        return paddle.nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def _derive_run_values(self):
        """Global batch and iterations, computed once here from the loader and logged.

        The lr schedule and SwAV's queue/freeze lengths derive from these values, never from
        iteration counts written in the config.
        """
        per_process = self.train_loader.batch_sampler.batch_size
        self.global_batch_size = per_process * self.world_size
        self.iters_per_epoch = len(self.train_loader)
        self.logger.info(f"global batch {self.global_batch_size} = {per_process} per process x "
                         f"{self.world_size} process(es); {self.iters_per_epoch} iterations per "
                         f"epoch x {self.epochs} epochs = {self.iters_per_epoch * self.epochs} "
                         f"iterations")

    def _build_hooks(self):
        blocks = self.cfg.get("hooks") or []
        if not isinstance(blocks, list):
            raise ConfigError(f"hooks: expected a list of hook blocks, got {blocks!r}")
        listed = [block.get("name") for block in blocks if isinstance(block, dict)]
        for name in DEFAULT_HOOKS:
            if listed.count(name) > 1:
                raise ConfigError(f"hooks: {name} is listed twice; keep one block")
        blocks = list(blocks) + [{"name": name} for name in DEFAULT_HOOKS if name not in listed]
        hooks = [HOOKS.build(self._with_log_interval(block)) for block in blocks]
        return sorted(hooks, key=lambda hook: hook.priority)

    def _with_log_interval(self, block):
        """The top-level ``log_interval`` reaches LoggerHook unless its block sets its own."""
        if not isinstance(block, dict) or block.get("name") != "LoggerHook" \
                or "log_interval" in block or "log_interval" not in self.cfg:
            return block
        return ConfigDict({**block, "log_interval": self.cfg["log_interval"]},
                          key_path=key_path_of(block, "hooks.LoggerHook"),
                          source=getattr(block, "source", None))

    def _load_resume_checkpoint(self, resume):
        """``(path, state)`` of ``--resume``, read before the loaders are built: resuming with
        another number of processes may change the per-process batch (world_change.py)."""
        if resume == "auto":
            path, state = checkpoint.find_resume_checkpoint(self.output_dir, self.trust_file,
                                                            report=self.logger.warning)
        else:
            path, state = resume, checkpoint.load_checkpoint(resume, trust=self.trust_file)
        checkpoint.check_not_complete(state, path, self.epochs)
        world_change.adapt_config(self.cfg, state, self.world_size, path, self.logger)
        return path, state

    def _resume(self, path, state):
        self.resumed_rng = trainer_checkpoint.restore(self, state, path)
        self.epoch = self.start_epoch
        self.logger.info(f"resumed from {path}: {self.start_epoch} epoch(s)"
                         + (f" and {self.start_step} step(s)" if self.start_step else "")
                         + f", {self.iter} iterations done")

    # ------------------------------------------------------------------ running

    def call_hooks(self, event):
        for hook in self.hooks:
            getattr(hook, event)(self)

    def train(self):
        """Run the remaining epochs; ``after_run`` hooks run even when a step fails.

        SIGTERM, SIGUSR1 or Ctrl-C stop the run after the current step with a mid-epoch
        checkpoint, then raise :class:`~passl.preemption.TrainingStopped`.
        """
        self.completed = False
        if self.start_epoch == 0 and self.metrics.start_fresh():
            self.logger.info("a new run: the earlier metrics.jsonl of this output_dir was moved "
                             "to metrics.previous.jsonl")
        log_intervals = [h.log_interval for h in self.hooks if hasattr(h, "log_interval")]
        self.stop_signals = StopSignals(self.logger, max_interval=min(log_intervals, default=1))
        self.stop_signals.install()
        try:
            self.call_hooks("before_run")
            if not self.start_step:  # last: start-up may have drawn random numbers
                self._set_resumed_rng()
            for self.epoch in range(self.start_epoch, self.epochs):
                self.train_epoch()
            self.completed = True
        finally:
            self.stop_signals.uninstall()
            try:
                self.call_hooks("after_run")
            finally:
                self.run_lock.release()

    def _set_resumed_rng(self):
        if self.resumed_rng is not None:
            checkpoint.set_rng_state(self.resumed_rng)
            self.resumed_rng = None

    def train_epoch(self):
        skip = self.start_step if self.epoch == self.start_epoch else 0
        set_loader_epoch(self.train_loader, self.epoch, skip_batches=skip)
        self.model.train()
        self.call_hooks("before_epoch")
        batches = iter(self.train_loader)
        self._set_resumed_rng()  # resumed mid-epoch: the state saved right after step `skip`
        for self.inner_iter, batch in enumerate(batches, start=skip):
            self.call_hooks("before_iter")
            self.run_step(batch)
            with self._holding_write_failure():
                self.call_hooks("after_iter")
            self.lr_scheduler.step()
            self.iter += 1
            if self.stop_signals.due(self.iter, self.inner_iter + 1 == self.iters_per_epoch):
                self._stop_if_signalled()
        done = self.epoch + 1
        interval = self.cfg.get("eval_interval", 1)
        if self.evaluators and (done % interval == 0 or done == self.epochs):
            with self._holding_write_failure():
                self._run_evaluators(epoch=done)
            self._agree()  # a signal is acted on at the next step boundary
        self.call_hooks("after_epoch")

    @contextlib.contextmanager
    def _holding_write_failure(self):
        """An output this rank could not write (rank 0's metrics.jsonl on a full disk) is held
        until the next :meth:`_agree`, where every rank stops together: raising it at once
        would leave the other ranks waiting in a collective for a process that has gone."""
        try:
            yield
        except OutputWriteError as error:
            self.write_failure = error

    def _agree(self, steps_done=None):
        """Collective: the stop signal any rank received (0: none); raises when any rank could
        not write its output, on every rank. ``steps_done`` at a step boundary."""
        signum, failed = self.stop_signals.agreed(self.write_failure is not None, steps_done)
        if failed:
            raise self.write_failure or OutputWriteError(
                "another process could not write its output (its log says why)")
        return signum

    def _stop_if_signalled(self):
        """At a step boundary where the ranks agree (every step with one process; see
        :class:`~passl.preemption.StopSignals`): when any rank got a stop signal, all save and
        stop here; when any rank could not write its output, all stop here without saving."""
        signum = self._agree(self.iter)
        if not signum:
            return
        self.call_hooks("before_save")
        # collective: the ranks leave together (the launcher stops all once one has exited)
        path = trainer_checkpoint.save_trainer_checkpoint(self, steps_in_epoch=self.inner_iter + 1)
        if self.rank == 0:
            self.logger.info(f"checkpoint saved: {path}")
        raise TrainingStopped(signal.Signals(signum).name, path, self.iter)

    def run_step(self, batch):
        """One optimisation step on ``batch`` = ``(inputs, labels)`` (``+ (indices,)`` for a
        model with ``needs_sample_indices``).

        Override to change what a step does (e.g. gradient accumulation); hooks see the
        model's ``outputs`` after the forward pass and the gradients in ``after_backward``.
        Gradients are cleared to None, not zero, so a parameter that gets no gradient in a
        step (SwAV's frozen prototypes) is skipped by the optimizer: no decay, no momentum.
        """
        self.batch_images = int(batch[1].shape[0])
        batch = self.normalize_batch(batch)
        with self.amp.autocast():
            self.outputs = self.wrapped_model(batch)
        self.amp.backward(self.outputs["loss"])
        self.call_hooks("after_backward")
        self.amp.step(self.optimizer)  # gradient clipping (grad_clip) happens inside
        self.optimizer.clear_grad(set_to_zero=False)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self):
        """Run every evaluator hook on the current weights; returns ``{metric: value}``."""
        try:
            if not self.evaluators:
                raise UserError("nothing to evaluate: no hook in the config's `hooks` has an "
                                "evaluate() method; add an evaluation hook (see "
                                "docs/training.md)")
            return self._run_evaluators(epoch=self.loaded_epoch, evaluate_only=True)
        finally:
            self.run_lock.release()

    def _run_evaluators(self, epoch, evaluate_only=False):
        """Run the evaluators and write one ``eval`` record.

        A stand-alone evaluation (``--evaluate-only``) is marked ``evaluate_only: true`` and
        carries the epoch of the loaded checkpoint (None for a state dict or ``--as-built``),
        so it does not read as a point of a training curve.
        """
        results = {}
        for hook in self.evaluators:
            results.update(hook.evaluate(self))
        record = {"type": "eval", "epoch": epoch, "iter": self.iter, **results}
        if evaluate_only:
            record["evaluate_only"] = True
        self.metrics.write(record)
        when = "evaluation" if epoch is None else f"evaluation after epoch {epoch}"
        self.logger.info(f"{when}: "
                         + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in results.items()))
        return results
