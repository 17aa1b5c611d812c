"""The runs behind ``tools/visualize.py``: model and image sets from a config, numbers computed
on every rank (:mod:`passl.evaluation.prototypes`, :mod:`passl.evaluation.feature_map`),
pictures drawn by rank 0 (:mod:`passl.utils.plot_visualize`).

Image sets: a config's ``KNNHook`` ``train``/``val`` blocks (the SwAV configs carry one), else
``dataloader.train`` seen through ``dataloader.val``'s transforms and ``dataloader.val`` (a
Classification config, as for ``tools/knn_eval.py``). ``--data CFG`` takes them from another
config, e.g. ``configs/swav/swav_clas_r50.yaml`` for the ImageNet SwAV config, which has none.
"""
import numpy as np

from passl import distributed
from passl.data import DATASETS, build_dataloader
from passl.engine.checkpoint import checkpoint_dir, epoch_checkpoints, load_model_weights
from passl.errors import ConfigError, UserError
from passl.evaluation import feature_map, prototypes
from passl.evaluation.knn import extract_features, knn_evaluate
from passl.evaluation.knn_eval import deterministic_block, memory_bank_blocks
from passl.models import MODELS
from passl.models.weights import load_pretrained
from passl.registry import source_of
from passl.runtime import seed_everything, select_device

SPLITS = ("train", "val")


def image_set_blocks(cfg):
    """``{'train': block, 'val': block}``: ordered, deterministic dataloader blocks (see the
    module docstring for where they come from)."""
    for hook in cfg.get("hooks") or []:
        if isinstance(hook, dict) and hook.get("name") == "KNNHook":
            return {split: deterministic_block(hook[split]) for split in SPLITS}
    try:
        bank, queries = memory_bank_blocks(cfg)
    except ConfigError as e:
        raise ConfigError(f"{e}{source_of(cfg)}; the config has no KNNHook either: pass "
                          f"--data CFG naming a config with a val set (e.g. "
                          f"configs/swav/swav_clas_r50.yaml)") from None
    return {"train": bank, "val": queries}


def start(cfg):
    """Device and process group for a visualize run; returns this process's rank."""
    select_device(cfg.get("device", "auto"))
    distributed.init_process_group()
    return distributed.get_rank()


def build_model(cfg, load=None, pretrained=None):
    """``cfg.model``, seeded (the same random init on every rank and run), with ``--load``
    (whole model: checkpoint or state dict) or ``--pretrained`` (backbone weights)."""
    seed_everything(cfg.get("seed", 0))
    model = MODELS.build(cfg.get("model"))
    if load:
        load_model_weights(model, load)
    if pretrained:
        load_pretrained(model.backbone, pretrained)
    return model


def image_loader(cfg, data_cfg, split):
    """An ordered loader over the ``split`` image set (of ``data_cfg`` when given), and its block."""
    block = image_set_blocks(data_cfg or cfg)[split]
    return build_dataloader(block, mode="val", seed=cfg.get("seed", 0)), block


def assignments(model, loader, head=0):
    """Scores of every image of ``loader`` on prototype head ``head`` (DeepCluster-v2 and
    multi-head SwAV have several), and their usage."""
    heads = model.head.prototype_weights() if hasattr(model, "head") else []
    if heads and not 0 <= head < len(heads):
        raise UserError(f"--head {head}: the model has prototype heads 0..{len(heads) - 1}")
    embeddings, _ = prototypes.swav_embeddings(model, loader)
    scores = prototypes.prototype_scores(embeddings, heads[head].numpy())
    counts = prototypes.assignment_counts(scores)
    return scores, counts


def raw_images(block, indices, seed):
    """The images at ``indices`` of ``block``'s dataset as stored (no transforms), for display."""
    dataset = DATASETS.build({**block["dataset"], "transforms": None}, seed=seed)
    return [dataset[int(i)][0] for i in indices]


def prototype_gallery(cfg, load, output, top=8, count=10, ids=None, split="val", data_cfg=None,
                      thumb=48, head=0):
    """Gallery PNG of the ``top`` images scoring highest on each of the ``count`` most used
    prototypes (or on ``ids``) of prototype head ``head``. Returns ``{'prototypes', 'images',
    'counts'}`` (dataset indices)."""
    rank = start(cfg)
    model = build_model(cfg, load)
    loader, block = image_loader(cfg, data_cfg, split)
    scores, counts = assignments(model, loader, head)
    num_prototypes = scores.shape[1]
    if ids:
        wrong = [p for p in ids if not 0 <= p < num_prototypes]
        if wrong:
            raise UserError(f"--ids {','.join(map(str, wrong))}: the model has prototypes "
                            f"0..{num_prototypes - 1}")
        chosen = np.asarray(ids)
    else:
        chosen = prototypes.usage_order(counts)[:count]
    images = prototypes.top_images(scores, chosen, top)
    if rank == 0:
        seed = cfg.get("seed", 0)
        rows = [{"prototype": int(p), "share": counts[p] / len(scores),
                 "images": raw_images(block, row, seed)} for p, row in zip(chosen, images)]
        which = f"{len(chosen)} {'chosen' if ids else 'most used'} of {num_prototypes}"
        if len(model.head.prototype_weights()) > 1:
            which += f" head-{head}"
        from passl.utils.plot_visualize import draw_gallery
        draw_gallery(rows, output, f"top {images.shape[1]} of {len(scores)} {split} images on "
                                   f"{which} prototypes (left: id, share of hard assignments)",
                     size=thumb)
    return {"prototypes": chosen, "images": images, "counts": counts}


def spread(items, limit):
    """At most ``limit`` of ``items``, evenly spaced, always with the last."""
    return [items[i] for i in feature_map.evenly_spaced(len(items), limit)]


def assignment_usage(cfg, output, load=None, run=None, split="val", data_cfg=None,
                     max_checkpoints=20, head=0):
    """Usage PNG: hard assignments per prototype of head ``head`` and their entropy for the
    checkpoint ``load``, or for up to ``max_checkpoints`` of the run in ``run`` (its
    output_dir), oldest first.

    Returns ``[{'epoch', 'path', 'counts', 'entropy'}]``.
    """
    rank = start(cfg)
    if run:
        found = epoch_checkpoints(checkpoint_dir(run))
        if not found:
            raise UserError(f"--run {run}: no epoch_N.pd in {checkpoint_dir(run)}; pass a "
                            f"training run's output_dir (or one checkpoint with --load)")
        checkpoints = spread(found, max_checkpoints)
    else:
        checkpoints = [(None, load)]
    model = build_model(cfg)
    loader, _ = image_loader(cfg, data_cfg, split)
    history = []
    for epoch, path in checkpoints:
        load_model_weights(model, path)
        _, counts = assignments(model, loader, head)
        history.append({"epoch": epoch, "path": path, "counts": counts,
                        "entropy": prototypes.assignment_entropy(counts)})
    if rank == 0:
        from passl.utils.plot_visualize import draw_usage
        draw_usage(history, int(history[-1]["counts"].sum()), output)
    return history


def feature_maps(cfg, output, load=None, pretrained=None, method="tsne", data_cfg=None, k=20,
                 temperature=0.07, max_points=5000):
    """Feature-map PNG: 2-D ``method`` projections of the val features, coloured by class, of
    the config's backbone at random init and with the given weights, each titled with its kNN
    top-1 (train set as the memory bank). Returns one ``{'title', 'knn_top1', 'points',
    'labels'}`` per panel; only rank 0 projects (``points`` is None elsewhere)."""
    rank = start(cfg)
    seed = cfg.get("seed", 0)
    bank_loader, _ = image_loader(cfg, data_cfg, "train")
    query_loader, _ = image_loader(cfg, data_cfg, "val")
    panels = []
    for name, weights in (("random init", {}), ("SwAV", {"load": load, "pretrained": pretrained})):
        model = build_model(cfg, **weights)
        knn_top1 = knn_evaluate(model, bank_loader, query_loader, k, temperature)["knn_top1"]
        features, labels = extract_features(model, query_loader, gather=True)
        keep = feature_map.evenly_spaced(len(labels), max_points)
        points = feature_map.project_2d(features.numpy()[keep], method, seed) if rank == 0 else None
        panels.append({"title": f"{name}: kNN top-1 {knn_top1:.1f}%", "knn_top1": knn_top1,
                       "points": points, "labels": labels.numpy()[keep]})
    if rank == 0:
        from passl.utils.plot_visualize import draw_feature_maps
        draw_feature_maps(panels, method, output)
    return panels
