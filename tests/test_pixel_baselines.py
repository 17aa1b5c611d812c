"""Raw pixels as a row of the suite, and the linear probe every row gets."""
import numpy as np

from passl.data.datasets import ImageFolder
from passl.evaluation.linear_probe import linear_probe_top1
from passl.evaluation.pixel_baselines import dataset_pixels
from tiny_image_folder import NORMALIZE, write_image_folder


def test_pixels_are_the_transformed_images_flattened(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=(4, 2))
    pixels, labels = dataset_pixels({"name": "ImageFolder", "root": str(data / "train"),
                                     "transforms": [NORMALIZE]})
    dataset = ImageFolder(str(data / "train"), transforms=[NORMALIZE])
    assert pixels.shape == (12, 3 * 16 * 16) and pixels.dtype == np.float32
    assert np.array_equal(pixels[5], dataset[5][0].reshape(-1))
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_linear_probe_separates_the_colours_and_not_shuffled_labels(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=(8, 6), noise=40)
    block = {"name": "ImageFolder", "transforms": [NORMALIZE]}
    train_x, train_y = dataset_pixels({**block, "root": str(data / "train")})
    val_x, val_y = dataset_pixels({**block, "root": str(data / "val")})
    assert linear_probe_top1(train_x, train_y, val_x, val_y) == 100.0
    # a probe fitted to labels that do not follow the images cannot find the classes
    shuffled = np.random.default_rng(0).permutation(train_y)
    assert linear_probe_top1(train_x, shuffled, val_x, val_y) < 100.0
