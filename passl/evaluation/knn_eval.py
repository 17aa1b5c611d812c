"""kNN evaluation of a config's backbone as a stand-alone run (``tools/knn_eval.py``).

The memory bank is ``dataloader.train``'s dataset seen through ``dataloader.val``'s
transforms: kNN measures the features, so every image is encoded once, deterministically,
exactly as the queries are (no random crops or flips in the bank).
"""
import copy
import os

from passl import distributed
from passl.data import build_dataloader
from passl.errors import ConfigError, UserError
from passl.evaluation.knn import knn_evaluate
from passl.io.metrics_log import MetricsLog
from passl.io.weights import load_pretrained
from passl.models import MODELS
from passl.runtime import configure_cpu_threads, seed_everything, select_device_and_join
from passl.utils.logger import open_log_file, setup_logger


def deterministic_block(block, transforms=None):
    """A copy of a dataloader block that visits every sample once, in order, optionally with
    other dataset ``transforms``: no shuffling, no dropped last batch."""
    block = copy.deepcopy(block)
    block["sampler"] = {**(block.get("sampler") or {}), "shuffle": False, "drop_last": False}
    if transforms is not None:
        block["dataset"]["transforms"] = copy.deepcopy(transforms)
    return block


def memory_bank_blocks(cfg):
    """``(bank, queries)`` dataloader blocks: train data with val transforms, and val."""
    loaders = cfg.get("dataloader") or {}
    for split in ("train", "val"):
        if not isinstance(loaders.get(split), dict) or "dataset" not in loaders[split]:
            raise ConfigError(f"dataloader.{split}: kNN needs a {split} block with a dataset "
                              f"(train: the memory bank, val: the queries)")
    val_transforms = loaders["val"]["dataset"].get("transforms")
    if not val_transforms:
        raise ConfigError("dataloader.val.dataset.transforms: kNN encodes the memory bank with "
                          "the val transforms; list them (e.g. Resize, CenterCrop, Normalize)")
    return deterministic_block(loaders["train"], val_transforms), deterministic_block(loaders["val"])


def run_knn_eval(cfg, pretrained=None, k=20, temperature=0.07, trust_file=False,
                 engine="dygraph"):
    """Build ``cfg.model``, load ``pretrained`` into its backbone (random init, seeded, without),
    run kNN with features from ``engine`` (``dygraph``, ``inference`` or ``onnxruntime``),
    append an ``eval`` record to ``output_dir/metrics.jsonl``; returns the result.

    ``trust_file``: read ``pretrained`` with ``paddle.load`` (``--trust-file``). The weights
    are read before anything is written to ``output_dir``, so a refused file leaves no trace.
    """
    configure_cpu_threads(cfg.get("threads", "auto"))
    select_device_and_join(cfg.get("device", "auto"))
    rank = distributed.get_rank()
    output_dir = cfg.get("output_dir") or "output"
    seed = cfg.get("seed", 0)
    seed_everything(seed)  # the same on every rank: one random-init model, not one per rank
    model = MODELS.build(cfg.get("model"))
    if not hasattr(model, "extract_features"):
        raise UserError(f"model: {type(model).__name__} has no extract_features(); kNN needs "
                        f"an architecture with a backbone (e.g. Classification)")
    # the log waits in memory until the weights are read (a refused file leaves no trace)
    logger = setup_logger(output_dir, rank, filename="knn_eval.log", defer_file=True)
    if pretrained:
        load_pretrained(model.backbone, pretrained, trust=trust_file)
    open_log_file(output_dir, rank, filename="knn_eval.log")
    if pretrained:
        logger.info(f"backbone weights loaded from {pretrained}")
    else:
        logger.info(f"no --pretrained: measuring the backbone at random init (seed {seed})")
    bank_block, query_block = memory_bank_blocks(cfg)
    result = knn_evaluate(model, build_dataloader(bank_block, mode="val", seed=seed),
                          build_dataloader(query_block, mode="val", seed=seed),
                          k=k, temperature=temperature, engine=engine)
    MetricsLog(os.path.join(output_dir, "metrics.jsonl"), enabled=rank == 0).write(
        {"type": "eval", "knn_top1": result["knn_top1"], "knn_top5": result["knn_top5"],
         "k": k, "temperature": temperature, "queries": result["count"],
         "pretrained": pretrained})
    return result
