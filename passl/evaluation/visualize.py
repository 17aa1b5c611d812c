"""The runs behind ``tools/visualize.py``: model and image sets from a config, numbers computed
on every rank (:mod:`passl.evaluation.prototypes`, :mod:`passl.evaluation.feature_map`),
pictures drawn by rank 0 (:mod:`passl.utils.plot_visualize`).

Image sets, the first that applies: a config's ``KNNHook`` ``train``/``val`` blocks (the SwAV
demo config carries one); ``dataloader.train`` seen through ``dataloader.val``'s transforms
and ``dataloader.val`` (a Classification config, as for ``tools/knn_eval.py``); else the
training images alone (a SwAV config on your own folder), seen once each through a centre
crop at the first multi-crop size. ``--data`` takes them from another config, or from a
folder with one subfolder per class: the labelled images the feature map needs, split into
a memory bank and held-out queries (:data:`QUERY_SHARE` of every class).
"""
import os
import tempfile

import numpy as np

from passl import distributed
from passl.data import DATASETS, build_dataloader
from passl.errors import ConfigError, UserError
from passl.evaluation import feature_map, prototypes
from passl.evaluation.knn import extract_features, knn_evaluate
from passl.evaluation.knn_eval import deterministic_block, memory_bank_blocks
from passl.io.checkpoint import checkpoint_dir, epoch_checkpoints, load_model_weights
from passl.io.weights import load_pretrained
from passl.models import MODELS
from passl.registry import source_of
from passl.runtime import seed_everything, select_device_and_join

SPLITS = ("train", "val")
#: Share of every class a ``--data`` folder holds out as the feature map's kNN queries.
QUERY_SHARE = 0.2
LABELS_HINT = ("the feature map colours images by class: pass --data DIR, a folder with one "
               "subfolder of images per class (DIR/<class>/<image>)")
_DISPLAY_SIZE = 224  # a training pipeline without MultiCrop: the ImageNet view size
_NORMALIZE = {"name": "Normalize", "to_chw": True}


def _view_size(transforms):
    """The first multi-crop size of a training pipeline (its global view), else 224."""
    for transform in transforms or []:
        if isinstance(transform, dict) and transform.get("name") == "MultiCrop":
            return int((transform.get("size_crops") or [_DISPLAY_SIZE])[0])
    return _DISPLAY_SIZE


def single_view_transforms(size):
    """Resize the shorter side, centre crop ``size``, normalise: every image seen once, alike."""
    return [{"name": "Resize", "size": size}, {"name": "CenterCrop", "size": size},
            dict(_NORMALIZE)]


def image_set_blocks(cfg):
    """``{'train': block[, 'val': block]}``: ordered, deterministic dataloader blocks (see the
    module docstring for where they come from)."""
    for hook in cfg.get("hooks") or []:
        if isinstance(hook, dict) and hook.get("name") == "KNNHook":
            return {split: deterministic_block(hook[split]) for split in SPLITS}
    loaders = cfg.get("dataloader") or {}
    if isinstance(loaders.get("val"), dict):
        return dict(zip(SPLITS, memory_bank_blocks(cfg)))
    train = loaders.get("train")
    if not isinstance(train, dict) or "dataset" not in train:
        raise ConfigError(f"dataloader.train{source_of(cfg)}: no images to show (no "
                          f"dataloader.train dataset and no KNNHook); pass --data CFG or --data DIR")
    size = _view_size(train["dataset"].get("transforms"))
    return {"train": deterministic_block(train, single_view_transforms(size))}


def folder_image_sets(root, size, scratch=None):
    """Blocks over a folder with one subfolder per class, seen through
    :func:`single_view_transforms`: ``{'train': every image}``, or with ``scratch`` (a
    folder for the bank's exclude list) ``{'train': bank, 'val': queries}``, the queries
    being :data:`QUERY_SHARE` of every class (a fixed stratified draw), the bank the rest."""
    dataset = {"name": "ImageFolder", "root": root, "transforms": single_view_transforms(size)}
    block = {"sampler": {"batch_size": 64}, "loader": {"num_workers": 0}}
    if scratch is None:
        return {"train": deterministic_block({**block, "dataset": dataset})}
    queries = {**dataset, "subset": {"fraction": QUERY_SHARE, "seed": 0}}
    exclude = os.path.join(scratch, "queries.txt")
    with open(exclude, "w", encoding="utf-8") as f:
        f.writelines(f"{path}\n" for path in DATASETS.build(queries).relative_paths())
    return {"train": deterministic_block({**block, "dataset": {**dataset, "exclude": exclude}}),
            "val": deterministic_block({**block, "dataset": queries})}


def image_sets(cfg, data, scratch=None):
    """The image sets of ``data``: a loaded config, a folder path (see
    :func:`folder_image_sets`), or None for ``cfg``'s own."""
    if isinstance(data, str):
        train = ((cfg.get("dataloader") or {}).get("train") or {}).get("dataset") or {}
        return folder_image_sets(data, _view_size(train.get("transforms")), scratch)
    return image_set_blocks(data or cfg)


def chosen_split(blocks, split):
    """``split``, or when None the val set if there is one, else the train set."""
    if split is None:
        return "val" if "val" in blocks else "train"
    if split not in blocks:
        raise ConfigError(f"--split {split}: there is no {split} image set here (only the "
                          f"training images); use --split train, or pass --data")
    return split


def start(cfg):
    """Device and process group for a visualize run; returns this process's rank."""
    select_device_and_join(cfg.get("device", "auto"))
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


def image_loader(cfg, blocks, split):
    """An ordered loader over the ``split`` image set of ``blocks``, its block and the split
    used (None: val when there is one, else train)."""
    split = chosen_split(blocks, split)
    block = blocks[split]
    return build_dataloader(block, mode="val", seed=cfg.get("seed", 0)), block, split


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


def prototype_gallery(cfg, load, output, top=8, count=10, ids=None, split=None, data_cfg=None,
                      thumb=48, head=0):
    """Gallery PNG of the ``top`` images scoring highest on each of the ``count`` most used
    prototypes (or on ``ids``) of prototype head ``head``. Returns ``{'prototypes', 'images',
    'counts'}`` (dataset indices)."""
    rank = start(cfg)
    model = build_model(cfg, load)
    loader, block, split = image_loader(cfg, image_sets(cfg, data_cfg), split)
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


def assignment_usage(cfg, output, load=None, run=None, split=None, data_cfg=None,
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
    loader, _, _ = image_loader(cfg, image_sets(cfg, data_cfg), split)
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
    top-1 (train set as the memory bank); the legend names the classes by their folders.
    Returns one ``{'title', 'knn_top1', 'points', 'labels'}`` per panel; only rank 0
    projects (``points`` is None elsewhere)."""
    rank = start(cfg)
    seed = cfg.get("seed", 0)
    with tempfile.TemporaryDirectory(prefix="passl-visualize-") as scratch:
        blocks = image_sets(cfg, data_cfg, scratch)
        if "val" not in blocks:
            raise ConfigError(f"features: the config's images are its training set, unlabelled "
                              f"for SwAV; {LABELS_HINT}")
        # the datasets read the bank's exclude list here, while it exists
        bank_loader, _, _ = image_loader(cfg, blocks, "train")
        query_loader, _, _ = image_loader(cfg, blocks, "val")
    class_names = getattr(query_loader.dataset, "classes", None)  # an ImageFolder's folders
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
        draw_feature_maps(panels, method, output, class_names)
    return panels
