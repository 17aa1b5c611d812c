"""Image datasets: ImageFolder (also registered as ImageNet), ImageList and built-in Digits.

Every dataset returns ``(sample, label)``: ``sample`` is the image after the dataset's
``transforms`` (a float32 CHW array, or a list of them for MultiCrop; the raw HWC uint8
RGB image when no transforms are given), ``label`` an int (-1 when unlabelled).

Seeding rule: sample ``index`` in epoch ``epoch`` is augmented with
``np.random.default_rng([seed, epoch, index])``. Its crops therefore depend only on the
seed, the epoch and the index, never on the worker or rank that loads it, so a run is
reproducible and a resumed run sees exactly the augmentations it would have seen; yet
every sample, and every epoch, draws differently. Call :meth:`ImageDataset.set_epoch`
before iterating (``passl.data.loader.set_loader_epoch`` does it); loader workers are
started per epoch, so they receive the new epoch.

Bad data: a missing root or list file, an empty class folder or a malformed list line is
a one-line :class:`~passl.errors.UserError` at construction. An unreadable image raises a
one-line error naming the file when it is loaded, unless ``skip_corrupt: true``: then it
is replaced by the next readable sample (index + 1, + 2, ... wrapping around, so the
substitute is deterministic), counted in ``dataset.skipped``, and reported in one warning
per process at the 1st, 10th, 100th, ... skipped file with the count and the first paths.
"""
import hashlib
import json
import os
import shutil
import tempfile

import cv2
import numpy as np
import paddle

from passl.data.check import read_exclude_list
from passl.data.image_io import IMAGE_EXTENSIONS, DataError, read_image
from passl.data.registry import DATASETS
from passl.data.subsets import subset_indices
from passl.data.transforms import build_pipeline
from passl.errors import ConfigError
from passl.utils.logger import get_logger

#: How many skipped paths a skip_corrupt warning lists.
SKIP_EXAMPLES = 3


def _existing_dir(path, owner, key="root"):
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{owner}: {key} must be a directory path, got {path!r}")
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise DataError(f"{owner}: {key} directory not found: {path}; check the dataset's {key} "
                        "in the config")
    return path


class ImageDataset(paddle.io.Dataset):
    """Image files with integer labels, decoded with OpenCV and augmented per sample.

    Paths are kept as one bytes array relative to ``root`` and labels as one int64
    array, not as millions of Python objects, so forked loader workers do not copy them.
    """

    def __init__(self, root, relative_paths, labels, transforms=None, skip_corrupt=False, seed=0,
                 subset=None, exclude=None):
        super().__init__()
        if int(seed) != seed or seed < 0:
            raise ConfigError(f"{type(self).__name__}: seed must be a non-negative integer, "
                              f"got {seed!r}")
        if subset is not None:
            relative_paths, labels = self._keep_subset(subset, root, relative_paths, labels)
        if exclude:
            relative_paths, labels = self._without(exclude, relative_paths, labels)
        self.root = root
        self._paths = np.array([os.fsencode(p) for p in relative_paths], dtype=np.bytes_)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = build_pipeline(transforms)
        self.skip_corrupt = bool(skip_corrupt)
        self.seed = int(seed)
        self.epoch = 0
        self.skipped = []  # unreadable paths met by this process (skip_corrupt: true)

    def _without(self, exclude_file, relative_paths, labels):
        """Drop the images listed in ``exclude_file`` (see :mod:`passl.data.check`)."""
        excluded = read_exclude_list(exclude_file, type(self).__name__)
        kept = [i for i, p in enumerate(relative_paths) if os.path.normpath(p) not in excluded]
        if len(kept) < len(relative_paths):
            get_logger().info(f"{type(self).__name__}: {len(relative_paths) - len(kept)} image(s) "
                              f"left out, as listed in {exclude_file}")
        return [relative_paths[i] for i in kept], [labels[i] for i in kept]

    def __len__(self):
        return len(self.labels)

    def relative_paths(self):
        """Every image path relative to ``root``, in index order."""
        return [os.fsdecode(p) for p in self._paths]

    def _keep_subset(self, subset, root, relative_paths, labels):
        """The samples the ``subset`` block keeps (:mod:`passl.data.subsets`), logged."""
        keep = subset_indices(subset, root, relative_paths, labels, getattr(self, "classes", None))
        get_logger().info(f"{type(self).__name__} {root}: labelled subset of {len(keep)} of "
                          f"{len(relative_paths)} images ({dict(subset)})")
        return [relative_paths[i] for i in keep], np.asarray(labels)[keep]

    def path(self, index):
        return os.path.join(self.root, os.fsdecode(self._paths[index]))

    def read(self, index):
        """The decoded image of ``index`` (a DataError naming it when unreadable)."""
        return read_image(self.path(index))

    def set_epoch(self, epoch):
        """Select the epoch's augmentations (see the module docstring's seeding rule)."""
        self.epoch = int(epoch)

    def sample_rng(self, index):
        """The generator that augments ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index):
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        img, label = self._load(index)
        if self.transform is not None:
            img = self.transform(img, self.sample_rng(index))
        return img, label

    def _load(self, index):
        """Image and label of ``index``, or of the next readable sample under skip_corrupt."""
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            try:
                return self.read(candidate), int(self.labels[candidate])
            except DataError:
                if not self.skip_corrupt:
                    raise
                self._record_skip(self.path(candidate))
        raise DataError(f"{self.root}: none of the {len(self)} images of this dataset is readable")

    def _record_skip(self, path):
        if path in self.skipped:
            return
        self.skipped.append(path)
        count = len(self.skipped)
        if str(count).rstrip("0") == "1":  # warn at 1, 10, 100, ... skips
            examples = ", ".join(self.skipped[:SKIP_EXAMPLES]) + (", ..." if count > SKIP_EXAMPLES else "")
            get_logger().warning(
                f"skip_corrupt: {count} unreadable image(s) skipped so far in this process, each "
                f"replaced by the next readable sample: {examples}")


def _image_files(class_dir):
    """Image files under ``class_dir`` (recursively), relative to it, sorted."""
    found = []
    for parent, dirs, files in os.walk(class_dir, followlinks=True):
        dirs.sort()
        rel_parent = os.path.relpath(parent, class_dir)
        found.extend(os.path.normpath(os.path.join(rel_parent, name)) for name in files
                     if name.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found)


@DATASETS.register("ImageNet")
@DATASETS.register()
class ImageFolder(ImageDataset):
    """``root/<class_name>/<image>`` (ImageNet's train and val layout); classes sorted by name.

    Config keys: ``root``, ``transforms`` (list of transform blocks), ``skip_corrupt``
    (see the module docstring), ``seed`` (the trainer passes the config's seed), ``subset``
    (keep a labelled subset: SimCLR's 1%/10% file, a fraction or N per class; see
    :mod:`passl.data.subsets`), ``exclude`` (a file of root-relative image paths to leave
    out, as ``tools/check_data.py`` writes it).
    An empty class folder is an error; with ``skip_corrupt: true`` it is a warning and
    the class keeps its label index.
    """

    def __init__(self, root, transforms=None, skip_corrupt=False, seed=0, subset=None,
                 exclude=None):
        root = _existing_dir(root, type(self).__name__)
        self.classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        if not self.classes:
            raise DataError(f"{root}: no class folders; ImageFolder expects root/<class_name>/<image>")
        paths, labels = [], []
        for label, name in enumerate(self.classes):
            files = _image_files(os.path.join(root, name))
            if not files:
                message = (f"{os.path.join(root, name)}: class folder has no images "
                           f"({', '.join(IMAGE_EXTENSIONS)})")
                if not skip_corrupt:
                    raise DataError(message + "; add images or remove the folder")
                get_logger().warning(f"skip_corrupt: {message}; the class keeps label {label}")
            paths.extend(os.path.join(name, f) for f in files)
            labels.extend([label] * len(files))
        super().__init__(root, paths, labels, transforms, skip_corrupt, seed, subset, exclude)


@DATASETS.register()
class ImageList(ImageDataset):
    """Images listed in ``list_file``, one ``relative/path label`` per line, under ``root``.

    PASSL's list format. Unlabelled lists (``relative/path`` only, for pretraining) get
    label -1; every line must then be unlabelled. Blank lines are ignored; paths may not
    contain spaces. Other keys as :class:`ImageFolder` (``subset``: fraction or per_class).
    """

    def __init__(self, root, list_file, transforms=None, skip_corrupt=False, seed=0, subset=None,
                 exclude=None):
        root = _existing_dir(root, type(self).__name__)
        list_file = os.path.expanduser(list_file)
        if not os.path.isfile(list_file):
            raise DataError(f"ImageList: list_file not found: {list_file}; check the dataset's "
                            "list_file in the config")
        paths, labels = self._parse(list_file)
        super().__init__(root, paths, labels, transforms, skip_corrupt, seed, subset, exclude)

    @staticmethod
    def _parse(list_file):
        paths, labels = [], []
        labelled_line = unlabelled_line = None  # first line of each kind, to report mixtures
        with open(list_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                where = f"{list_file}:{lineno}"
                if len(fields) > 2:
                    raise DataError(f"{where}: expected 'relative/path label' (no spaces in paths), "
                                    f"got {line.strip()!r}")
                if len(fields) == 2:
                    try:
                        label = int(fields[1])
                    except ValueError:
                        label = -1
                    if label < 0:
                        raise DataError(f"{where}: label {fields[1]!r} is not a non-negative integer")
                    labelled_line = labelled_line or lineno
                else:
                    label = -1
                    unlabelled_line = unlabelled_line or lineno
                if labelled_line and unlabelled_line:
                    raise DataError(f"{where}: line {unlabelled_line} has no label but line "
                                    f"{labelled_line} has one; label every line or none")
                paths.append(fields[0])
                labels.append(label)
        if not paths:
            raise DataError(f"{list_file}: the list file has no entries")
        return paths, labels


# ---------------------------------------------------------------------------- Digits

DIGITS_FORMAT = 1
#: Every VAL_EVERY-th image of each class, in scikit-learn's order, goes to ``val``:
#: a stratified, deterministic split (1,442 train / 355 val) that needs no RNG.
VAL_EVERY = 5


def _digits_images(image_size):
    """scikit-learn's 8x8 digits as (uint8 RGB images, labels, expected manifest)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # ink levels 0-16
    labels = digits.target.astype(np.int64)
    files, position_in_class = [], {}
    for index, label in enumerate(labels):
        rank = position_in_class.get(label, 0)
        position_in_class[label] = rank + 1
        split = "val" if rank % VAL_EVERY == VAL_EVERY - 1 else "train"
        files.append(f"{split}/{label}/{index:04d}.png")
    manifest = {
        "format": DIGITS_FORMAT,
        "source": "sklearn.datasets.load_digits",
        "source_sha256": hashlib.sha256(gray.tobytes() + labels.tobytes()).hexdigest(),
        "image_size": image_size,
        "split": f"every {VAL_EVERY}th image of each class is val",
        "files": files,
    }
    return gray, manifest


def _manifest_matches(root, expected):
    try:
        with open(os.path.join(root, "manifest.json")) as f:
            found = json.load(f)
    except (OSError, ValueError):
        return False
    return found == expected and all(os.path.isfile(os.path.join(root, p)) for p in expected["files"])


def materialise_digits(cache_dir, image_size):
    """Write the digits once as PNGs under ``cache_dir``; returns the dataset directory.

    Files are written to a temporary directory and renamed into place, so concurrent
    processes (several ranks) never see a half-written dataset; the manifest (source
    hash, size, split rule, file list) decides whether an existing copy is reused.
    """
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    root = os.path.join(cache_dir, f"digits_{image_size}px")
    gray, manifest = _digits_images(image_size)
    if _manifest_matches(root, manifest):
        return root
    os.makedirs(cache_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".digits_{image_size}px.", dir=cache_dir)
    try:
        for image, rel in zip(gray, manifest["files"]):
            big = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_CUBIC)
            os.makedirs(os.path.join(staging, os.path.dirname(rel)), exist_ok=True)
            _, png = cv2.imencode(".png", cv2.cvtColor(big, cv2.COLOR_GRAY2BGR))
            png.tofile(os.path.join(staging, rel))
        with open(os.path.join(staging, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        _replace_dir(staging, root, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    get_logger().info(f"Digits: wrote {len(gray)} scikit-learn digits as {image_size}px PNGs to {root}")
    return root


def _replace_dir(staging, root, manifest):
    """Rename ``staging`` to ``root``; a stale ``root`` is moved aside, a fresh one kept."""
    try:
        os.rename(staging, root)
        return
    except OSError:
        if _manifest_matches(root, manifest):  # another process finished first
            return
    stale = tempfile.mkdtemp(prefix=os.path.basename(root) + ".stale.", dir=os.path.dirname(root))
    os.rename(root, os.path.join(stale, "old"))
    os.rename(staging, root)
    shutil.rmtree(stale, ignore_errors=True)


@DATASETS.register()
class Digits(ImageFolder):
    """scikit-learn's 1,797 real 8x8 handwritten digits (10 classes, shipped in its wheel)
    as ``image_size`` px RGB PNGs in ImageFolder layout, so the demo reads real files.

    Config keys: ``cache_dir`` (where the PNGs go, written once and reused while the
    manifest matches), ``split`` (train | val), ``image_size``, plus ImageFolder's
    ``transforms``, ``skip_corrupt``, ``seed``, ``subset`` (e.g. ``{per_class: 5}``: the
    demo's low-shot protocol).
    """

    SPLITS = ("train", "val")

    def __init__(self, cache_dir="~/.cache/passl/digits", split="train", image_size=32,
                 transforms=None, skip_corrupt=False, seed=0, subset=None):
        if split not in self.SPLITS:
            raise ConfigError(f"Digits: split must be one of {', '.join(self.SPLITS)}, got {split!r}")
        if not isinstance(image_size, int) or image_size < 8:
            raise ConfigError(f"Digits: image_size must be an int >= 8, got {image_size!r}")
        root = materialise_digits(cache_dir, image_size)
        super().__init__(os.path.join(root, split), transforms, skip_corrupt, seed, subset)
