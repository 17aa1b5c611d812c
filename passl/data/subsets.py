"""Labelled subsets for semi-supervised fine-tuning: SimCLR's published files, or stratified draws.

A dataset's ``subset:`` block keeps only some of its samples (labels unchanged), e.g.::

    subset: {file: data/1percent.txt}        # SimCLR's 1% / 10% ImageNet lists
    subset: {fraction: 0.01, seed: 0}        # ~1% of every class
    subset: {per_class: 5, seed: 0}          # 5 images of every class
    subset: {per_class: 5, seed: 0, draw: 2} # the 3rd of disjoint draws of 5 per class

``file``: one image file name per line (``n01440764_10026.JPEG``; blank lines ignored), its
class the synset before the first ``_``; the dataset must be an ImageFolder whose class
folders are the synsets. This is the format of the files SimCLR published for the paper's
semi-supervised protocol (``imagenet_subsets/1percent.txt``, ``10percent.txt``).
``fraction``/``per_class``: a deterministic stratified draw, the same on every process and
in every run with the same ``seed`` (it does not depend on the training seed): each class
keeps ``round(fraction * its size)`` images (at least 1) or exactly ``per_class``.
``draw`` (with ``per_class``): repeated low-shot measurements need draws that share no image,
so each class is shuffled once by the ``seed`` and draw ``d`` takes its images
``d * per_class`` to ``(d + 1) * per_class - 1`` (:func:`per_class_draw`).
"""
import os

import numpy as np

from passl.data.image_io import DataError
from passl.errors import ConfigError
from passl.registry import check_keys

#: Keys of the ``subset`` block; exactly one of the first three.
SUBSET_KEYS = ("file", "fraction", "per_class", "seed", "draw")


def stratified_indices(labels, fraction=None, per_class=None, seed=0):
    """Sorted indices of a stratified draw: ``per_class`` or ``round(fraction * n)`` (>= 1)
    samples of every class, chosen without replacement by ``np.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label, members in class_members(labels).items():
        count = per_class if per_class is not None else max(1, int(round(fraction * len(members))))
        if count > len(members):
            raise ConfigError(f"subset.per_class: {per_class} images per class, but class "
                              f"{label} has only {len(members)}; lower per_class")
        chosen.append(rng.choice(members, count, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def class_members(labels):
    """``{label: indices of its samples}`` of a labelled dataset, classes in sorted order."""
    labels = np.asarray(labels)
    if labels.size and labels.min() < 0:
        raise ConfigError("subset: the dataset is unlabelled (label -1); a labelled subset "
                          "needs class labels (ImageFolder, or an ImageList with labels)")
    return {int(label): np.flatnonzero(labels == label) for label in np.unique(labels)}


def disjoint_draw_count(labels, per_class):
    """How many disjoint draws of ``per_class`` images of every class ``labels`` allows."""
    return min(len(members) for members in class_members(labels).values()) // per_class


def per_class_draw(labels, per_class, draw, seed=0):
    """Sorted indices of draw ``draw`` (0, 1, ...) of ``per_class`` images of every class.

    Every class's members are shuffled once by ``np.random.default_rng(seed)`` (classes in
    sorted order); draw ``d`` takes positions ``[d * per_class, (d + 1) * per_class)`` of the
    shuffle, so draws with one seed never share an image.
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for label, members in class_members(labels).items():
        shuffled = rng.permutation(members)
        if (draw + 1) * per_class > len(members):
            raise ConfigError(f"subset.draw: draw {draw} of {per_class} images per class needs "
                              f"{(draw + 1) * per_class} images of every class, but class "
                              f"{label} has {len(members)}; lower per_class or draw")
        chosen.append(shuffled[draw * per_class:(draw + 1) * per_class])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def subset_file_indices(path, root, relative_paths, labels, classes):
    """Indices of the images named in a SimCLR subset file, in the file's order.

    Args:
        path: the subset file (one ``SYNSET_ID.JPEG`` name per line).
        root: the ImageFolder root (for messages).
        relative_paths: the dataset's ``class/file`` paths.
        labels: their class indices into ``classes``.
        classes: the dataset's class folder names.

    Every bad line, an unknown synset or a name with no file under the root, and every
    class with no listed image, is a one-line DataError naming the file, line and fix.
    """
    if not os.path.isfile(path):
        raise DataError(f"subset.file: {path} not found; download SimCLR's 1percent.txt / "
                        f"10percent.txt or give a path that exists")
    index_of = {os.path.normpath(p): i for i, p in enumerate(relative_paths)}
    known = set(classes)
    chosen, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            name = line.strip()
            if not name:
                continue
            where = f"{path}:{lineno}"
            synset = name.split("_")[0]
            if os.sep in name or "/" in name or synset not in known:
                raise DataError(f"{where}: {name!r}: class {synset!r} (the name before '_') is "
                                f"not a class folder of {root}; is this the subset file of "
                                f"this dataset?")
            index = index_of.get(os.path.join(synset, name))
            if index is None:
                raise DataError(f"{where}: {os.path.join(root, synset, name)} not found; the "
                                f"dataset lacks an image the subset file lists (incomplete "
                                f"copy?)")
            if index not in seen:
                seen.add(index)
                chosen.append(index)
    if not chosen:
        raise DataError(f"{path}: the subset file lists no image names")
    listed = {int(labels[i]) for i in chosen}
    empty = [name for label, name in enumerate(classes) if label not in listed]
    if empty:
        raise DataError(f"{path}: class {empty[0]!r} of {root} has no image in the subset file "
                        f"({len(empty)} class(es) without any); every class needs a labelled "
                        f"image, or remove the class folder")
    return np.asarray(chosen, np.int64)


def subset_indices(spec, root, relative_paths, labels, classes=None):
    """The indices a dataset's ``subset`` block keeps (see the module docstring)."""
    if not isinstance(spec, dict):
        raise ConfigError(f"subset: expected a mapping like {{per_class: 5, seed: 0}}, got {spec!r}")
    check_keys(spec, SUBSET_KEYS, "subset")
    given = [key for key in SUBSET_KEYS[:3] if spec.get(key) is not None]
    if len(given) != 1:
        raise ConfigError(f"subset: give exactly one of file, fraction, per_class; got "
                          f"{', '.join(given) or 'none'}")
    if spec.get("draw") is not None and given != ["per_class"]:
        raise ConfigError(f"subset.draw: draws are numbered for per_class subsets; remove draw "
                          f"or give per_class instead of {given[0]}")
    seed = spec.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"subset.seed: expected a non-negative integer, got {seed!r}")
    if "file" in given:
        if classes is None:
            raise ConfigError("subset.file: file subsets need an ImageFolder dataset (class "
                              "folders named by synset); use fraction or per_class here")
        return subset_file_indices(os.path.expanduser(spec["file"]), root, relative_paths,
                                   labels, classes)
    if "fraction" in given:
        fraction = spec["fraction"]
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
                or not 0 < fraction <= 1:
            raise ConfigError(f"subset.fraction: expected a number in (0, 1], got {fraction!r}")
        return stratified_indices(labels, fraction=float(fraction), seed=seed)
    per_class = spec["per_class"]
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ConfigError(f"subset.per_class: expected a positive integer, got {per_class!r}")
    draw = spec.get("draw")
    if draw is None:
        return stratified_indices(labels, per_class=per_class, seed=seed)
    if isinstance(draw, bool) or not isinstance(draw, int) or draw < 0:
        raise ConfigError(f"subset.draw: expected a non-negative integer, got {draw!r}")
    return per_class_draw(labels, per_class, draw, seed)
