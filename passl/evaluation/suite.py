"""The evaluation suite: how good are these features on a labelled image folder, against the
honest baselines, with many labels and with few? (``tools/evaluate.py``)

Rows are features: every weights file (a backbone), the same backbone at random init
(``random``) and the raw pixels (``pixels``). Columns are protocols x labels per class: the
weighted kNN vote (:mod:`passl.evaluation.knn`), a logistic-regression linear probe on frozen
pooled features (:mod:`passl.evaluation.linear_probe`) and, when a fine-tuner is given,
fine-tuning of the whole network; each with every training label and with N labels per
class. N labels per class are measured on several disjoint draws
(:func:`passl.data.subsets.per_class_draw`: with 5 labels per class one draw can swing by
several points), and reported as the mean and the sample standard deviation over the draws.

Features are extracted once per row (train and val images through the evaluation transforms
of the classification config) and reused by every protocol and draw. Fine-tuning trains the
network, so it reads the images again, through its recipe's training transforms.

Data (:func:`locate_data`): ``DIR/train/CLASS/*`` and ``DIR/val/CLASS/*`` (ImageFolder), or
``DIR/train.txt`` and ``DIR/val.txt`` (ImageList lines ``relative/path label`` under ``DIR``).
A folder without a val split can hold out a stratified fraction of train (``val_fraction``);
the split is written as list files into the output folder, so it is visible and reused by
fine-tuning.
"""
import json
import os
from typing import NamedTuple

import numpy as np
import paddle
import paddle.nn.functional as F
from tqdm import tqdm

from passl.data import build_dataloader
from passl.data.image_io import DataError
from passl.data.registry import DATASETS
from passl.data.subsets import disjoint_draw_count, per_class_draw, stratified_indices
from passl.errors import ConfigError, UserError
from passl.evaluation.knn import (check_knn_parameters, extract_features, feature_function,
                                  knn_accuracy)
from passl.evaluation.knn_eval import deterministic_block
from passl.evaluation.linear_probe import linear_probe_top1
from passl.evaluation.pixel_baselines import dataset_pixels
from passl.io.safe_write import write_text_atomic
from passl.io.weights import load_pretrained
from passl.models import MODELS
from passl.runtime import seed_everything

PROTOCOLS = ("knn", "linear", "finetune")
TITLES = {"knn": "kNN", "linear": "linear", "finetune": "fine-tune"}
BASELINES = ("random", "pixels")
#: Where ``val_fraction`` writes its list files, under the output folder.
SPLIT_DIR = "split"


class DataSplit(NamedTuple):
    """The train and val dataset blocks (no transforms yet) of a folder, with their labels."""
    train: dict
    val: dict
    classes: list
    train_labels: np.ndarray
    val_labels: np.ndarray


class Row(NamedTuple):
    """One row of the table: ``weights`` None is the random-init backbone; ``pixels`` the raw
    pixels (no backbone at all)."""
    name: str
    weights: str = None
    pixels: bool = False


class FinetuneJob(NamedTuple):
    """One fine-tuning run the suite asks for; a fine-tuner returns its final val top-1.

    ``per_class`` None: every training label; else draw ``draw`` of ``per_class`` images per
    class (``subset: {per_class, seed, draw}`` on ``train``). ``model`` is the classification
    config's model block; ``val`` a dataset block with the evaluation transforms.
    """
    name: str
    weights: str
    per_class: int
    draw: int
    seed: int
    model: dict
    train: dict
    val: dict
    images: int
    output_dir: str


# ---------------------------------------------------------------------------- data

def split_block(data_dir, split):
    """The dataset block of ``DIR/split/`` (ImageFolder) or ``DIR/split.txt`` (ImageList)."""
    folder, listing = os.path.join(data_dir, split), os.path.join(data_dir, split + ".txt")
    if os.path.isdir(folder):
        return {"name": "ImageFolder", "root": folder}
    if os.path.isfile(listing):
        return {"name": "ImageList", "root": data_dir, "list_file": listing}
    return None


def class_names(dataset):
    """Class names of a built dataset: its folders, or the label numbers of a list."""
    if getattr(dataset, "classes", None):
        return list(dataset.classes)
    return [str(label) for label in range(int(dataset.labels.max()) + 1)]


def hold_out(train_set, val_fraction, output_dir, seed):
    """Split ``train_set`` into train and val list files under ``output_dir/split``."""
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction: expected a number between 0 and 1, got {val_fraction}")
    labels = train_set.labels
    val_index = stratified_indices(labels, fraction=val_fraction, seed=seed)
    keep = np.ones(len(labels), bool)
    keep[val_index] = False
    names = class_names(train_set)
    for label in np.unique(labels):
        if not keep[labels == label].any():
            raise DataError(f"--val-fraction {val_fraction}: class {names[label]!r} has "
                            f"{int((labels == label).sum())} image(s), all held out for val; "
                            f"give it more images or lower --val-fraction")
    paths = train_set.relative_paths()
    spaced = [p for p in paths if " " in p]
    if spaced:
        raise DataError(f"--val-fraction: {spaced[0]!r} has a space in its path, which a list "
                        f"file cannot hold; rename it or give the folder a val split")
    folder = os.path.join(output_dir, SPLIT_DIR)
    os.makedirs(folder, exist_ok=True)
    blocks = []
    for split, chosen in (("train", keep), ("val", ~keep)):
        listing = os.path.join(folder, split + ".txt")
        write_text_atomic(listing, "".join(f"{paths[i]} {labels[i]}\n"
                                           for i in np.flatnonzero(chosen)))
        blocks.append({"name": "ImageList", "root": train_set.root, "list_file": listing})
    return blocks


def check_val_classes(data_dir, train_set, val_set, classes):
    """Val must know every train class and no other (one line naming them otherwise)."""
    if getattr(val_set, "classes", None) is not None and getattr(train_set, "classes", None):
        val_classes = list(val_set.classes)
    else:
        val_classes = [classes[label] if label < len(classes) else str(label)
                       for label in np.unique(val_set.labels)]
    unknown = [name for name in val_classes if name not in classes]
    if unknown:
        raise DataError(f"--data {data_dir}: val has class(es) train does not have: "
                        f"{', '.join(unknown[:5])}; every val class needs train images")
    missing = [name for name in classes if name not in val_classes]
    if missing:
        raise DataError(f"--data {data_dir}: class(es) missing from val: "
                        f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''} "
                        f"({len(missing)} of {len(classes)}); add val images of every class "
                        f"(DIR/val/CLASS/*), or remove those classes from train")


def locate_data(data_dir, val_fraction=None, output_dir=None, seed=0):
    """The :class:`DataSplit` of ``data_dir`` (see the module docstring); every problem with
    the folder is one line naming it and the fix."""
    if not os.path.isdir(data_dir):
        raise DataError(f"--data {data_dir}: folder not found")
    train = split_block(data_dir, "train")
    if train is None:
        raise DataError(f"--data {data_dir}: no train/ folder or train.txt; expected "
                        f"DIR/train/CLASS/* and DIR/val/CLASS/* (or list files DIR/train.txt "
                        f"and DIR/val.txt)")
    val = split_block(data_dir, "val")
    if val is None and val_fraction is None:
        raise DataError(f"--data {data_dir}: no val split (val/ or val.txt); add "
                        f"DIR/val/CLASS/*, or pass --val-fraction 0.2 to hold out 20% of every "
                        f"train class as val")
    if val is not None and val_fraction is not None:
        raise UserError(f"--val-fraction: {data_dir} has a val split already; drop "
                        f"--val-fraction to use it")
    train_set = DATASETS.build(train)
    if len(train_set.labels) and train_set.labels.min() < 0:
        raise DataError(f"--data {data_dir}: the train list has no labels; the suite needs "
                        f"labelled images (lines 'relative/path label')")
    classes = class_names(train_set)
    if val is None:
        train, val = hold_out(train_set, val_fraction, output_dir, seed)
        train_set = DATASETS.build(train)
    val_set = DATASETS.build(val)
    check_val_classes(data_dir, train_set, val_set, classes)
    return DataSplit(train, val, classes, np.asarray(train_set.labels),
                     np.asarray(val_set.labels))


# ---------------------------------------------------------------------------- labels

def label_columns(train_labels, classes, shots, draws, seed=0):
    """``[(per_class or None, [train index arrays, one per draw])]`` and notes to print.

    None (all labels) is one "draw" of every image. A class with fewer images than N is an
    error; when fewer than ``draws`` disjoint draws fit, as many as fit are used (a note).
    """
    columns, notes = [(None, [np.arange(len(train_labels))])], []
    counts = np.bincount(train_labels, minlength=len(classes))
    smallest = int(np.argmin(counts))
    for per_class in shots:
        if per_class < 1:
            raise UserError(f"--shots {per_class}: labels per class must be positive")
        fit = disjoint_draw_count(train_labels, per_class)
        if fit == 0:
            raise DataError(f"--shots {per_class}: class {classes[smallest]!r} has only "
                            f"{counts[smallest]} train image(s), fewer than {per_class}; drop "
                            f"or lower that --shots value")
        if fit < draws:
            notes.append(f"note: {per_class} labels per class: {fit} disjoint draw(s) fit, not "
                         f"{draws} (class {classes[smallest]!r} has {counts[smallest]} train "
                         f"images)")
        columns.append((per_class, [per_class_draw(train_labels, per_class, draw, seed)
                                    for draw in range(min(draws, fit))]))
    return columns, notes


def summary_record(name, protocol, per_class, values):
    """One results.json record: mean top-1, sample std over the draws (0 for one run)."""
    values = [float(v) for v in values]
    return {"features": name, "protocol": protocol, "labels_per_class": per_class,
            "top1": float(np.mean(values)),
            "top1_std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "draws": len(values), "top1_per_draw": values}


# ---------------------------------------------------------------------------- features

def progress(iterable, desc):
    """A tqdm bar on a terminal (nothing when the output is captured)."""
    return tqdm(iterable, desc=desc, leave=False, disable=None, dynamic_ncols=True)


def eval_loader_blocks(cfg, split):
    """``(train, val)`` loader blocks: every image once, in order, through the evaluation
    transforms and loader settings of ``cfg.dataloader.val``."""
    val = (cfg.get("dataloader") or {}).get("val") or {}
    transforms = (val.get("dataset") or {}).get("transforms")
    if not transforms:
        raise ConfigError("dataloader.val.dataset.transforms: the suite reads the evaluation "
                          "transforms (e.g. Resize, CenterCrop, Normalize) from the "
                          "classification config's val block; list them")
    return [deterministic_block({**val, "dataset": dict(block)}, transforms)
            for block in (split.train, split.val)]


def build_backbone_model(model_block, row, seed, trust_file=False):
    """The classification model with ``row``'s weights in its backbone, or at the seeded
    random init when it has none (as ``tools/knn_eval.py`` builds it)."""
    seed_everything(seed)
    model = MODELS.build(model_block)
    if not hasattr(model, "extract_features"):
        raise UserError(f"model: {type(model).__name__} has no extract_features(); the suite "
                        f"needs a classification config (e.g. configs/swav/swav_clas_r50.yaml)")
    if row.weights:
        load_pretrained(model.backbone, row.weights, trust=trust_file)
    return model


def backbone_features(model_block, loaders, row, seed, engine="dygraph", trust_file=False):
    """Pooled features ``(train [N, C], val [M, C])`` (NumPy) of ``row``'s backbone."""
    model = build_backbone_model(model_block, row, seed, trust_file)
    features_of = feature_function(model, engine)
    return tuple(extract_features(model, progress(loader, f"{row.name}: {split} features"),
                                  gather=False, features_of=features_of,
                                  normalize=False)[0].numpy()
                 for split, loader in zip(("train", "val"), loaders))


def pixel_features(loader_blocks):
    """Flattened pixels after the evaluation transforms, ``(train, val)``."""
    return tuple(dataset_pixels(block["dataset"],
                                lambda indices, s=split: progress(indices, f"pixels: {s}"))[0]
                 for split, block in zip(("train", "val"), loader_blocks))


def frozen_protocols(name, features, split, columns, k, temperature):
    """kNN and linear-probe records of one row's features for every label column."""
    unit = [F.normalize(paddle.to_tensor(x), axis=1) for x in features]
    train_labels = paddle.to_tensor(split.train_labels)
    val_labels = paddle.to_tensor(split.val_labels)
    records = []
    for per_class, draws in columns:
        knn, linear = [], []
        for index in draws:
            chosen = paddle.to_tensor(index)
            knn.append(knn_accuracy(paddle.gather(unit[0], chosen),
                                    paddle.gather(train_labels, chosen), unit[1], val_labels,
                                    k, temperature, ks=(1,),
                                    num_classes=len(split.classes))["top1"])
            linear.append(linear_probe_top1(features[0][index], split.train_labels[index],
                                            features[1], split.val_labels))
        records.append(summary_record(name, "knn", per_class, knn))
        records.append(summary_record(name, "linear", per_class, linear))
    return records


def finetune_records(row, columns, finetune, job_fields):
    """Fine-tuning records of one backbone row (one run per label column and draw)."""
    records = []
    for per_class, draws in columns:
        top1 = []
        for draw, index in enumerate(draws):
            slug = "all" if per_class is None else f"{per_class}_per_class_draw{draw}"
            top1.append(finetune(FinetuneJob(
                name=row.name, weights=row.weights, per_class=per_class, draw=draw,
                images=len(index), output_dir=os.path.join(
                    job_fields["output_dir"], "finetune", row.name, slug),
                **{k: v for k, v in job_fields.items() if k != "output_dir"})))
        records.append(summary_record(row.name, "finetune", per_class, top1))
    return records


# ---------------------------------------------------------------------------- the suite

def run_suite(cfg, data_dir, rows, output_dir, shots=(1, 5, 10), draws=5, k=20,
              temperature=0.07, engine="dygraph", val_fraction=None, finetune=None,
              draw_seed=0, trust_file=False, echo=print):
    """Measure every row with every protocol and label column; returns the records and the
    :class:`DataSplit`.

    ``cfg``: a classification config (its ``model`` and ``dataloader.val`` are used; the
    datasets come from ``data_dir``). ``rows``: :class:`Row` s. ``finetune``: None (no
    fine-tuning) or a callable ``FinetuneJob -> top-1`` (``passl.engine.finetune``).
    ``echo`` prints the notes. Writes ``output_dir/results.json``.
    """
    check_knn_parameters(k, temperature)
    if draws < 1:
        raise UserError(f"--draws {draws}: expected at least 1")
    split = locate_data(data_dir, val_fraction, output_dir, draw_seed)
    columns, notes = label_columns(split.train_labels, split.classes, sorted(set(shots)),
                                   draws, draw_seed)
    for note in notes:
        echo(note)
    echo(f"{data_dir}: {len(split.classes)} classes, {len(split.train_labels)} train and "
         f"{len(split.val_labels)} val images")
    loaders = eval_loader_blocks(cfg, split)
    model_block = {**cfg.get("model"), "num_classes": len(split.classes)}
    seed = cfg.get("seed", 0)
    job_fields = {"seed": draw_seed, "model": model_block, "train": split.train,
                  "val": loaders[1]["dataset"], "output_dir": output_dir}
    for row in rows:  # a weights file that does not fit stops here, before any work
        if row.weights:
            build_backbone_model(model_block, row, seed, trust_file)
    records = []
    built = [build_dataloader(block, mode="val", seed=seed) for block in loaders]
    for row in rows:
        if row.pixels:
            features = pixel_features(loaders)
        else:
            features = backbone_features(model_block, built, row, seed, engine, trust_file)
        records += frozen_protocols(row.name, features, split, columns, k, temperature)
        if finetune is not None and not row.pixels:
            records += finetune_records(row, columns, finetune, job_fields)
    os.makedirs(output_dir, exist_ok=True)
    write_text_atomic(os.path.join(output_dir, "results.json"), json.dumps(records, indent=1))
    return records, split


# ---------------------------------------------------------------------------- reporting

def column_order(records):
    """``[(labels_per_class, protocol)]`` present in ``records``: all labels first."""
    present = {(r["labels_per_class"], r["protocol"]) for r in records}
    shots = sorted({n for n, _ in present if n is not None})
    return [(n, p) for n in [None] + shots for p in PROTOCOLS if (n, p) in present]


def column_title(per_class, protocol):
    return f"{TITLES[protocol]} {'all' if per_class is None else f'{per_class}/class'}"


def format_cell(record):
    if record is None:
        return "-"
    if record["draws"] > 1:
        return f"{record['top1']:.2f}±{record['top1_std']:.2f}"
    return f"{record['top1']:.2f}"


def format_table(records):
    """Rows = features, columns = labels per class x protocol, top-1 (mean±std over draws)."""
    columns = column_order(records)
    names = list(dict.fromkeys(r["features"] for r in records))
    by_cell = {(r["features"], r["labels_per_class"], r["protocol"]): r for r in records}
    width, first = 14, max(10, max(map(len, names), default=0) + 2)
    groups, header = "val top-1 (%)".ljust(first), "features".ljust(first)
    for per_class in dict.fromkeys(n for n, _ in columns):
        span = sum(1 for n, _ in columns if n == per_class)
        title = "all labels" if per_class is None else f"{per_class} per class"
        groups += title.center(width * span)
        header += "".join(TITLES[p].rjust(width) for n, p in columns if n == per_class)
    lines = [groups.rstrip(), header]
    for name in names:
        lines.append(name.ljust(first) + "".join(
            format_cell(by_cell.get((name, n, p))).rjust(width) for n, p in columns))
    return "\n".join(lines)


def beats(record, baseline):
    """True when ``record`` is above ``baseline`` beyond both spreads (mean - std > mean + std)."""
    return record["top1"] - record["top1_std"] > baseline["top1"] + baseline["top1_std"]


def comparison_lines(records):
    """One line per (row, baseline): the columns where the row beats it beyond the spread."""
    by_cell = {(r["features"], r["labels_per_class"], r["protocol"]): r for r in records}
    names = list(dict.fromkeys(r["features"] for r in records))
    lines = []
    for base in [name for name in BASELINES if name in names]:
        for name in names:
            if name == base:
                continue
            shared = [(n, p) for n, p in column_order(records)
                      if (name, n, p) in by_cell and (base, n, p) in by_cell]
            won = [column_title(n, p) for n, p in shared
                   if beats(by_cell[(name, n, p)], by_cell[(base, n, p)])]
            lines.append(f"{name} beats {base} beyond the draws' spread in {len(won)} of "
                         f"{len(shared)} columns" + (f": {', '.join(won)}" if won else ""))
    return lines
