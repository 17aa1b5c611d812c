"""Small on-disk image datasets for the data tests."""
import os

import cv2
import numpy as np


def write_image(path, rng, size=(40, 48)):
    """A random-colour image with some structure, written with OpenCV."""
    height, width = size
    img = np.zeros((height, width, 3), np.uint8)
    img[:] = rng.integers(0, 256, 3)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    img[top:top + height // 2, left:left + width // 2] = rng.integers(0, 256, 3)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(str(path), img)
    return img


def make_image_folder(root, classes=("cat", "dog", "fish"), per_class=4, seed=0):
    """root/<class>/<i>.png (and one .jpg per class); returns the root as a string."""
    rng = np.random.default_rng(seed)
    for name in classes:
        for i in range(per_class):
            ext = ".jpg" if i == 0 else ".png"
            write_image(os.path.join(root, name, f"{i:02d}{ext}"), rng)
    return str(root)
