"""Labelled subsets: SimCLR's subset files on an ImageFolder, and stratified draws."""
import os
from collections import Counter

import numpy as np
import pytest

from data_helpers import write_image
from passl.data.datasets import Digits, ImageFolder, ImageList
from passl.data.registry import DATASETS
from passl.data.subsets import disjoint_draw_count, per_class_draw, stratified_indices
from passl.errors import ConfigError, UserError

SYNSETS = ("n01440764", "n01443537", "n01484850")


@pytest.fixture(scope="module")
def synset_root(tmp_path_factory):
    """An ImageNet-like train folder: 4 images per synset named SYNSET_N.JPEG."""
    root = tmp_path_factory.mktemp("imagenet") / "train"
    rng = np.random.default_rng(0)
    for synset in SYNSETS:
        for number in (10, 11, 12, 13):
            write_image(os.path.join(root, synset, f"{synset}_{number}.JPEG"), rng, size=(8, 8))
    return str(root)


def subset_file(tmp_path, *names):
    path = tmp_path / "1percent.txt"
    path.write_text("".join(f"{name}\n" for name in names))
    return str(path)


def test_simclr_file_keeps_the_listed_images_with_their_synset_labels(synset_root, tmp_path):
    names = ["n01484850_12.JPEG", "n01440764_10.JPEG", "", "n01443537_13.JPEG",
             "n01440764_11.JPEG"]
    dataset = ImageFolder(synset_root, subset={"file": subset_file(tmp_path, *names)})
    kept = [os.path.relpath(dataset.path(i), synset_root) for i in range(len(dataset))]
    listed = [name for name in names if name]
    assert kept == [os.path.join(name.split("_")[0], name) for name in listed]
    assert dataset.labels.tolist() == [SYNSETS.index(name.split("_")[0]) for name in listed]
    assert dataset.classes == list(SYNSETS)  # label indices of the full dataset are kept


@pytest.mark.parametrize("names, message", [
    (["n01440764_10.JPEG", "n01443537_99.JPEG", "n01484850_10.JPEG"],
     "{file}:2: {root}/n01443537/n01443537_99.JPEG not found; the dataset lacks an image the "
     "subset file lists (incomplete copy?)"),
    (["n01440764_10.JPEG", "n09999999_10.JPEG"],
     "{file}:2: 'n09999999_10.JPEG': class 'n09999999' (the name before '_') is not a class "
     "folder of {root}; is this the subset file of this dataset?"),
    (["n01440764_10.JPEG", "n01484850_10.JPEG"],
     "{file}: class 'n01443537' of {root} has no image in the subset file (1 class(es) without "
     "any); every class needs a labelled image, or remove the class folder"),
    ([], "{file}: the subset file lists no image names"),
])
def test_bad_subset_files_give_one_line_each(synset_root, tmp_path, names, message):
    path = subset_file(tmp_path, *names)
    with pytest.raises(UserError) as error:
        ImageFolder(synset_root, subset={"file": path})
    assert str(error.value) == message.format(file=path, root=synset_root)


def test_missing_subset_file_is_one_line(synset_root, tmp_path):
    with pytest.raises(UserError, match=r"^subset.file: .*nope.txt not found; download "):
        ImageFolder(synset_root, subset={"file": str(tmp_path / "nope.txt")})


def test_stratified_draw_counts_and_determinism():
    labels = np.repeat([0, 1, 2], [10, 20, 33])
    by_fraction = stratified_indices(labels, fraction=0.1, seed=3)
    assert Counter(labels[by_fraction].tolist()) == {0: 1, 1: 2, 2: 3}
    per_class = stratified_indices(labels, per_class=4, seed=3)
    assert Counter(labels[per_class].tolist()) == {0: 4, 1: 4, 2: 4}
    assert np.all(np.diff(per_class) > 0)  # sorted, no repeats
    assert np.array_equal(per_class, stratified_indices(labels, per_class=4, seed=3))
    assert not np.array_equal(per_class, stratified_indices(labels, per_class=4, seed=4))
    # an independent computation of the same draw
    rng = np.random.default_rng(3)
    expected = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), 4, replace=False)
                                       for c in (0, 1, 2)]))
    assert np.array_equal(per_class, expected)


@pytest.mark.parametrize("seed", [0, 5])
def test_numbered_draws_are_disjoint_stratified_and_reproducible(seed):
    labels = np.repeat([2, 0, 1], [11, 7, 9])  # classes of unequal size, not sorted
    assert disjoint_draw_count(labels, 3) == 2 and disjoint_draw_count(labels, 8) == 0
    draws = [per_class_draw(labels, 3, draw, seed) for draw in range(2)]
    assert not set(draws[0]) & set(draws[1])
    for drawn in draws:
        assert Counter(labels[drawn].tolist()) == {0: 3, 1: 3, 2: 3}
        assert list(drawn) == sorted(drawn)
    assert [list(d) for d in draws] == [list(per_class_draw(labels, 3, d, seed)) for d in (0, 1)]
    # the shuffle is the seed's: another seed draws other images
    other = per_class_draw(labels, 3, 0, seed + 1)
    assert set(other) != set(draws[0])


def test_digits_five_per_class_through_the_registry(tmp_path):
    full = Digits(cache_dir=str(tmp_path), split="train", image_size=8)
    block = {"name": "Digits", "cache_dir": str(tmp_path), "split": "train", "image_size": 8,
             "subset": {"per_class": 5, "seed": 0}}
    small = DATASETS.build(block)
    assert len(small) == 50 and Counter(small.labels.tolist()) == {c: 5 for c in range(10)}
    full_paths = {full.path(i): int(full.labels[i]) for i in range(len(full))}
    assert all(full_paths[small.path(i)] == small.labels[i] for i in range(len(small)))
    again = DATASETS.build(block)
    assert [again.path(i) for i in range(50)] == [small.path(i) for i in range(50)]


@pytest.mark.parametrize("subset, message", [
    ({"per_class": 5, "fraction": 0.1}, "subset: give exactly one of file, fraction, per_class; "
                                        "got fraction, per_class"),
    ({"fraction": 1.5}, "subset.fraction: expected a number in (0, 1], got 1.5"),
    ({"per_class": 9}, "subset.per_class: 9 images per class, but class 0 has only 4; lower "
                       "per_class"),
    ({"per_clas": 2}, "subset.per_clas: unknown key (did you mean: per_class?); accepted keys: "
                      "file, fraction, per_class, seed, draw"),
    ({"per_class": 2, "draw": 1, "seed": 3}, None),  # 2 x 2 of the 4 images: fits
    ({"per_class": 2, "draw": 2}, "subset.draw: draw 2 of 2 images per class needs 6 images of "
                                  "every class, but class 0 has 4; lower per_class or draw"),
    ({"fraction": 0.5, "draw": 1}, "subset.draw: draws are numbered for per_class subsets; "
                                   "remove draw or give per_class instead of fraction"),
])
def test_bad_subset_blocks(synset_root, subset, message):
    if message is None:
        assert len(ImageFolder(synset_root, subset=subset)) == 2 * len(SYNSETS)
        return
    with pytest.raises(ConfigError) as error:
        ImageFolder(synset_root, subset=subset)
    assert str(error.value) == message


def test_file_subsets_need_class_folders(synset_root, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("n01440764/n01440764_10.JPEG 0\n")
    with pytest.raises(ConfigError, match="^subset.file: file subsets need an ImageFolder"):
        ImageList(synset_root, str(listing), subset={"file": subset_file(tmp_path, "x_1.JPEG")})
