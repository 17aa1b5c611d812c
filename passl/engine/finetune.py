"""The evaluation suite's fine-tuning protocol: one training run of the whole network per
label column and draw (:class:`passl.evaluation.suite.FinetuneJob`).

The recipe is a semi-supervised config (``configs/swav/swav_semisup_r18_digits.yaml``,
``swav_semisup_r50_10pct.yaml``): its optimizer, lr schedule, epochs, batch and training
transforms are used as they are; the suite supplies the model (the classification config's
backbone, every layer trainable), the data (the suite's folder, with ``subset: {per_class,
seed, draw}`` for the labelled draw) and the evaluation transforms. Each run is an ordinary
training run in its own folder (config.yaml, train.log, metrics.jsonl), so any cell of the
table can be inspected or rerun with ``tools/train.py -c FOLDER/config.yaml``.
"""
import contextlib
import io
import os

from tqdm import tqdm

from passl.config import config_from_dict, to_plain
from passl.engine.hooks.base import Hook
from passl.engine.trainer import Trainer
from passl.errors import ConfigError
from passl.io.metrics_log import read_metrics


class ProgressBar(Hook):
    """One tqdm bar per fine-tuning run, over its optimisation steps (terminal only)."""

    def __init__(self, desc):
        self.desc = desc
        self.bar = None

    def before_run(self, trainer):
        self.bar = tqdm(total=trainer.epochs * trainer.iters_per_epoch, desc=self.desc,
                        leave=False, disable=None, dynamic_ncols=True)

    def after_iter(self, trainer):
        self.bar.update(1)

    def after_run(self, trainer):
        self.bar.close()


def hooks_for_suite(hooks, epochs):
    """The recipe's hooks with an EvalHook, no per-epoch bar and one final checkpoint."""
    hooks = [dict(block) for block in hooks or []]
    named = {block.get("name"): block for block in hooks}
    if "EvalHook" not in named:
        hooks.append({"name": "EvalHook"})
    for name, settings in (("LoggerHook", {"progress_bar": False}),
                           ("CheckpointHook", {"save_interval": epochs})):
        if name in named:
            named[name].update(settings)
        else:
            hooks.append({"name": name, **settings})
    return hooks


def finetune_config(recipe, job):
    """The training config of ``job`` (see the module docstring)."""
    data = to_plain(recipe)
    loaders = data.get("dataloader") or {}
    if "train" not in loaders or "dataset" not in loaders["train"]:
        raise ConfigError(f"{recipe.source}: dataloader.train.dataset: the fine-tuning recipe "
                          f"needs a train block (its sampler and transforms are used)")
    train = loaders["train"]
    subset = None if job.per_class is None else \
        {"per_class": job.per_class, "seed": job.seed, "draw": job.draw}
    train["dataset"] = {**job.train, "transforms": train["dataset"].get("transforms"),
                        "subset": subset}
    sampler = train.setdefault("sampler", {})
    # a batch larger than the labelled images would give no step at all (drop_last)
    sampler["batch_size"] = min(sampler.get("batch_size", 32), job.images)
    val = loaders.get("val") or {"sampler": {"batch_size": 128}}
    loaders["val"] = {**val, "dataset": dict(job.val)}
    data.update(model={**to_plain(job.model), "freeze_backbone": False},
                dataloader=loaders, output_dir=job.output_dir,
                hooks=hooks_for_suite(data.get("hooks"), data.get("epochs")))
    labels = "all labels" if job.per_class is None else \
        f"{job.per_class} per class, draw {job.draw}"
    return config_from_dict(data, f"{recipe.source} (fine-tuning {job.name}, {labels})")


def finetune_top1(recipe, job, trust_file=False):
    """Run ``job`` with ``recipe``; returns the val top-1 after the last epoch.

    The run's log goes to its train.log, not to the terminal, which shows a bar. An earlier
    run in the same folder is moved to ``previous_runs/`` (nothing is lost).
    """
    cfg = finetune_config(recipe, job)
    labels = "all labels" if job.per_class is None else \
        f"{job.per_class}/class draw {job.draw}"
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(cfg, pretrained=job.weights, archive_old_run=True,
                          trust_file=trust_file)
        trainer.hooks.append(ProgressBar(f"{job.name}: fine-tune, {labels}"))
        trainer.train()
    evaluations = [r for r in read_metrics(os.path.join(job.output_dir, "metrics.jsonl"), "eval")
                   if "top1" in r]
    return evaluations[-1]["top1"]
