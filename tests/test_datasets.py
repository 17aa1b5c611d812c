"""Datasets: layouts, labels, per-sample seeding, bad data, and the built-in Digits."""
import json
import logging
import multiprocessing
import os

import numpy as np
import pytest

from data_helpers import make_image_folder, write_image
from passl.data import DATASETS
from passl.data import datasets as D
from passl.errors import ConfigError, UserError

SMALL_MULTICROP = {"name": "MultiCrop", "nmb_crops": [2, 3], "size_crops": [32, 16],
                   "min_scale_crops": [0.3, 0.1], "max_scale_crops": [1.0, 0.3]}


@pytest.fixture()
def folder(tmp_path):
    return make_image_folder(tmp_path / "train")


class LogRecorder(logging.Handler):
    """Collects the 'passl' logger's messages, whatever handlers the logger already has."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture()
def warnings_logged():
    recorder = LogRecorder()
    logger = logging.getLogger("passl")
    logger.addHandler(recorder)
    yield recorder.messages
    logger.removeHandler(recorder)


# --------------------------------------------------------------------- layouts

def test_image_folder_classes_labels_and_samples(folder):
    transforms = [{"name": "Resize", "size": 20}, {"name": "CenterCrop", "size": 16},
                  {"name": "Normalize"}, {"name": "ToCHW"}]
    dataset = DATASETS.build({"name": "ImageFolder", "root": folder, "transforms": transforms})
    assert dataset.classes == ["cat", "dog", "fish"] and len(dataset) == 12
    assert dataset.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert dataset.path(0).endswith(os.path.join("cat", "00.jpg"))
    sample, label = dataset[5]
    assert sample.shape == (3, 16, 16) and sample.dtype == np.float32 and label == 1
    assert isinstance(label, int)


def test_without_transforms_the_raw_rgb_image_comes_back(tmp_path):
    rng = np.random.default_rng(0)
    bgr = write_image(tmp_path / "a" / "x.png", rng)
    image, label = D.ImageFolder(str(tmp_path))[0]
    assert np.array_equal(image, bgr[:, :, ::-1]) and label == 0  # OpenCV wrote BGR


def test_imagenet_is_the_same_dataset(folder):
    dataset = DATASETS.build({"name": "ImageNet", "root": folder})
    assert isinstance(dataset, D.ImageFolder) and len(dataset) == 12


def test_image_list_labelled_and_unlabelled(folder, tmp_path):
    labelled = tmp_path / "train.txt"
    labelled.write_text("cat/01.png 0\n\ndog/02.png 1\nfish/00.jpg 2\n")
    dataset = D.ImageList(folder, str(labelled), transforms=[SMALL_MULTICROP])
    assert len(dataset) == 3 and dataset.labels.tolist() == [0, 1, 2]
    crops, label = dataset[2]
    assert [c.shape for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3 and label == 2
    unlabelled = tmp_path / "unlabelled.txt"
    unlabelled.write_text("cat/01.png\ndog/02.png\n")
    assert [label for _, label in D.ImageList(folder, str(unlabelled))] == [-1, -1]


@pytest.mark.parametrize("content, message", [
    ("cat/01.png 0\ncat/02.png 0 extra\n", ":2: expected 'relative/path label'"),
    ("cat/01.png 0\ncat/02.png zero\n", ":2: label 'zero' is not a non-negative integer"),
    ("cat/01.png 0\ncat/02.png\n", ":2: line 2 has no label but line 1 has one"),
    ("\n\n", "the list file has no entries"),
])
def test_malformed_list_lines_name_file_and_line(folder, tmp_path, content, message):
    list_file = tmp_path / "list.txt"
    list_file.write_text(content)
    with pytest.raises(UserError) as info:
        D.ImageList(folder, str(list_file))
    assert str(list_file) in str(info.value) and message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_root_and_list_file(tmp_path, folder):
    with pytest.raises(UserError, match="root directory not found: .*nowhere"):
        D.ImageFolder(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="list_file not found: .*missing.txt"):
        D.ImageList(folder, str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="no class folders"):
        D.ImageFolder(str(tmp_path / "train" / "cat"))


def test_empty_class_folder_is_an_error_or_a_warning(folder, warnings_logged):
    os.makedirs(os.path.join(folder, "empty"))
    with open(os.path.join(folder, "empty", "notes.txt"), "w") as f:
        f.write("not an image")
    with pytest.raises(UserError, match=r"empty: class folder has no images"):
        D.ImageFolder(folder)
    dataset = D.ImageFolder(folder, skip_corrupt=True)
    assert dataset.classes == ["cat", "dog", "empty", "fish"] and set(dataset.labels) == {0, 1, 3}
    assert any("empty" in m and "keeps label 2" in m for m in warnings_logged)


# ------------------------------------------------------------------- bad images

def corrupt(folder, relative, data=b"\xff\xd8\xff\xe0 this JPEG stops here"):
    path = os.path.join(folder, relative)
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_corrupt_image_fails_with_one_line_naming_it(folder):
    path = corrupt(folder, "dog/01.png")
    dataset = D.ImageFolder(folder, transforms=[SMALL_MULTICROP])
    dataset[4]  # the readable neighbour is fine
    with pytest.raises(UserError) as info:
        dataset[5]
    assert str(info.value).startswith(path) and "\n" not in str(info.value)
    assert "skip_corrupt=true" in str(info.value) and "tools/check_data.py" in str(info.value)


def test_skip_corrupt_substitutes_the_next_readable_sample_and_counts(folder, warnings_logged):
    bad = [corrupt(folder, "dog/01.png"), corrupt(folder, "dog/02.png", b"")]
    dataset = D.ImageFolder(folder, skip_corrupt=True)
    clean = D.ImageFolder(folder, skip_corrupt=True)
    image, label = dataset[5]  # dog/01 and dog/02 are bad: dog/03 (index 7) stands in
    expected, expected_label = clean[7]
    assert np.array_equal(image, expected) and label == expected_label == 1
    for index in range(len(dataset)):
        dataset[index]
    assert dataset.skipped == bad
    messages = [m for m in warnings_logged if "unreadable image" in m]
    assert len(messages) == 1 and "1 unreadable image(s)" in messages[0] and bad[0] in messages[0]


def test_skip_corrupt_warns_again_at_ten_and_lists_the_first_paths(tmp_path, warnings_logged):
    root = tmp_path / "many"
    make_image_folder(root, classes=("a",), per_class=12)
    bad = [corrupt(str(root), f"a/{i:02d}.png", b"junk") for i in range(1, 11)]
    dataset = D.ImageFolder(str(root), skip_corrupt=True)
    for index in range(len(dataset)):
        dataset[index]
    messages = [m for m in warnings_logged if "unreadable image" in m]
    assert len(dataset.skipped) == 10 and len(messages) == 2
    assert "10 unreadable image(s)" in messages[1] and bad[0] in messages[1] and ", ..." in messages[1]


# ---------------------------------------------------------------------- seeding

def test_same_seed_epoch_index_gives_the_same_crops(folder):
    first = D.ImageFolder(folder, transforms=[SMALL_MULTICROP], seed=5)
    second = D.ImageFolder(folder, transforms=[SMALL_MULTICROP], seed=5)
    second[3], second[0]  # a different access history changes nothing
    for a, b in zip(first[3][0], second[3][0]):
        assert np.array_equal(a, b)


def test_crops_differ_across_indices_epochs_and_seeds(folder):
    one_class = D.ImageFolder(folder, transforms=[SMALL_MULTICROP], seed=5)
    reference = one_class[2][0][0]
    one_class.set_epoch(1)
    assert not np.array_equal(one_class[2][0][0], reference)
    one_class.set_epoch(0)
    assert np.array_equal(one_class[2][0][0], reference)
    other_seed = D.ImageFolder(folder, transforms=[SMALL_MULTICROP], seed=6)
    assert not np.array_equal(other_seed[2][0][0], reference)
    assert one_class.sample_rng(2).random() != one_class.sample_rng(3).random()


def test_bad_seed_is_a_config_error(folder):
    with pytest.raises(ConfigError, match="seed"):
        D.ImageFolder(folder, seed=-1)


# ----------------------------------------------------------------------- Digits

@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("digits_cache")
    D.materialise_digits(str(cache), 32)
    return str(cache)


def test_digits_split_is_stratified_and_complete(digits_cache):
    train = D.Digits(cache_dir=digits_cache, split="train")
    val = D.Digits(cache_dir=digits_cache, split="val")
    assert (len(train), len(val)) == (1442, 355) and train.classes == [str(d) for d in range(10)]
    train_counts, val_counts = np.bincount(train.labels), np.bincount(val.labels)
    assert np.array_equal(val_counts, (train_counts + val_counts) // 5)
    image, label = val[0]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and label == 0
    assert np.array_equal(image[..., 0], image[..., 2]) and image.max() > 200


def test_digits_images_are_the_sklearn_digits(digits_cache):
    from sklearn.datasets import load_digits

    digits = load_digits()
    train = D.Digits(cache_dir=digits_cache, split="train", image_size=32)
    path = train.path(0)
    index = int(os.path.splitext(os.path.basename(path))[0])
    small = D.read_image(path)[..., 0].reshape(8, 4, 8, 4).mean(axis=(1, 3))  # back to 8x8
    assert np.corrcoef(small.ravel(), digits.images[index].ravel())[0, 1] > 0.95
    assert digits.target[index] == train.labels[0]


def test_digits_are_written_once_and_reused(digits_cache, monkeypatch):
    manifest = os.path.join(digits_cache, "digits_32px", "manifest.json")
    stamp = os.stat(manifest).st_mtime_ns

    def no_writing(*args, **kwargs):
        raise AssertionError("Digits re-materialised although the manifest matches")

    monkeypatch.setattr(D.cv2, "imencode", no_writing)
    assert len(D.Digits(cache_dir=digits_cache, split="val")) == 355
    assert os.stat(manifest).st_mtime_ns == stamp


def test_stale_or_incomplete_digits_are_rewritten(tmp_path):
    root = D.materialise_digits(str(tmp_path), 16)
    manifest_path = os.path.join(root, "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    manifest["format"] = 0
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    os.remove(os.path.join(root, manifest["files"][0]))
    assert D.materialise_digits(str(tmp_path), 16) == root
    with open(manifest_path) as f:
        assert json.load(f)["format"] == D.DIGITS_FORMAT
    assert os.path.isfile(os.path.join(root, manifest["files"][0]))
    assert sorted(os.listdir(tmp_path)) == ["digits_16px"]  # no staging leftovers


def _materialise_in_child(cache_dir, queue):
    queue.put(D.materialise_digits(cache_dir, 12))


def test_two_processes_materialising_at_once_agree(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_materialise_in_child, args=(str(tmp_path), queue))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    roots = {queue.get(timeout=5), queue.get(timeout=5)}
    assert roots == {os.path.join(str(tmp_path), "digits_12px")}
    assert sorted(os.listdir(tmp_path)) == ["digits_12px"]
    assert len(D.Digits(cache_dir=str(tmp_path), split="train", image_size=12)) == 1442


def test_digits_bad_split_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="split must be one of train, val"):
        D.Digits(cache_dir=str(tmp_path), split="test")
