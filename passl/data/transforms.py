"""Image augmentations on HWC uint8 RGB NumPy arrays, built on OpenCV.

Every transform is called as ``t(img, rng)`` with ``rng`` a ``np.random.Generator``.
Randomness is explicit: the dataset derives one generator per sample from
(seed, epoch, index), so a sample's augmentation never depends on the worker or rank
that computes it (see :mod:`passl.data.datasets`).

The operations follow torchvision's Pillow path (the SwAV reference): the same
RandomResizedCrop sampling rule, ColorJitter in random order with Pillow's
``ImageEnhance`` formulas and HSV hue shift, ITU-R 601 grayscale. They work in uint8
with lookup tables and single OpenCV calls because SwAV reads every image as 8 crops.
Input is HWC uint8 RGB; :class:`Normalize` turns it into float32, after which only
geometric transforms and :class:`ToCHW` apply.
"""
import math
import numbers

import cv2
import numpy as np

from passl.data.registry import TRANSFORMS
from passl.errors import ConfigError

#: ImageNet mean, and SwAV's reference std (torchvision's examples use 0.229 for red).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.228, 0.224, 0.225)

INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
}

_LEVELS = np.arange(256, dtype=np.float32)


# ----------------------------------------------------------------------------- helpers

def _interpolation_flag(name, owner):
    if name not in INTERPOLATIONS:
        raise ConfigError(f"{owner}: interpolation {name!r} is not one of {', '.join(INTERPOLATIONS)}")
    return INTERPOLATIONS[name]


def _size_hw(size, owner):
    """(height, width) from an int or a [height, width] pair."""
    if isinstance(size, numbers.Integral):
        size = (size, size)
    if len(size) != 2 or not all(isinstance(s, numbers.Integral) and s > 0 for s in size):
        raise ConfigError(f"{owner}: size must be a positive int or [height, width], got {size!r}")
    return int(size[0]), int(size[1])


def _range(value, owner, key, center=None, lower=-math.inf, upper=math.inf):
    """A (low, high) sampling range: a number v means (center - v, center + v), clamped at
    ``lower``; a pair is taken as is. Returns None for 0 (the op is disabled)."""
    if isinstance(value, numbers.Number):
        if value < 0:
            raise ConfigError(f"{owner}: {key} must be non-negative, got {value!r}")
        if value == 0:
            return None
        low, high = (center - value, center + value) if center is not None else (-value, value)
        low = max(low, lower)
    else:
        if len(value) != 2 or value[0] > value[1]:
            raise ConfigError(f"{owner}: {key} must be a number or a [low, high] pair, got {value!r}")
        low, high = value
    if low < lower or high > upper:
        raise ConfigError(f"{owner}: {key} range {[low, high]} leaves [{lower}, {upper}]")
    return float(low), float(high)


def _probability(p, owner):
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"{owner}: p must be in [0, 1], got {p!r}")
    return float(p)


def _happens(p, rng):
    """Bernoulli(p) draw; p = 0 and p = 1 consume no randomness."""
    return p >= 1.0 or (p > 0.0 and rng.random() < p)


def resize(img, width, height, interpolation=cv2.INTER_LINEAR, antialias=True):
    """Resize to ``width`` x ``height``.

    Bilinear/bicubic interpolation only looks at the 2-4 nearest source pixels, which
    aliases when shrinking by more than 2x (Pillow, the reference, widens its filter
    instead). With ``antialias`` each halving beyond that is done first with
    ``cv2.pyrDown`` (a 5-tap Gaussian), which costs far less than INTER_AREA.
    """
    if antialias:
        while img.shape[0] >= 2 * height and img.shape[1] >= 2 * width:
            img = cv2.pyrDown(img)
    return cv2.resize(img, (width, height), interpolation=interpolation)


def _lut(img, table):
    """Apply a float table of 256 output levels to a uint8 image, Pillow-style:
    clip to [0, 255] and truncate toward zero."""
    return cv2.LUT(img, np.clip(table, 0, 255).astype(np.uint8))


# ------------------------------------------------------------------- colour functions

def adjust_brightness(img, factor):
    """Pillow ``ImageEnhance.Brightness``: blend with black, ``v * factor``."""
    return _lut(img, _LEVELS * np.float32(factor))


def gray_mean(img):
    """Mean of the ITU-R 601 luma, rounded as Pillow's ``ImageEnhance.Contrast`` does."""
    r, g, b = cv2.mean(img)[:3]
    return int(0.299 * r + 0.587 * g + 0.114 * b + 0.5)


def adjust_contrast(img, factor):
    """Pillow ``ImageEnhance.Contrast``: blend with the (integer) mean grey level."""
    mean = np.float32(gray_mean(img))
    return _lut(img, mean + np.float32(factor) * (_LEVELS - mean))


def to_grayscale(img):
    """ITU-R 601-2 luma (Pillow's ``convert('L')``), repeated over three channels."""
    return cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def adjust_saturation(img, factor):
    """Pillow ``ImageEnhance.Color``: blend with the image's own grayscale."""
    # OpenCV rounds to nearest; subtracting 0.499 makes that Pillow's truncation.
    return cv2.addWeighted(img, float(factor), to_grayscale(img), 1.0 - float(factor), -0.499)


def adjust_hue(img, hue_factor):
    """torchvision's ``adjust_hue``: shift H by ``hue_factor`` of a turn in 8-bit HSV.

    OpenCV's ``*_FULL`` conversion scales H to 0-255 like Pillow's HSV mode; the shift
    is truncated to whole steps and wraps around, as torchvision's uint8 addition does.
    """
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)
    shift = int(hue_factor * 255) % 256
    hue = hsv[:, :, 0]
    hue += np.uint8(shift)  # in place, wraps modulo 256
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


# ------------------------------------------------------------------------- transforms

@TRANSFORMS.register()
class Compose:
    """Apply ``transforms`` (config blocks or callables) in order, sharing one generator."""

    def __init__(self, transforms):
        self.transforms = [build_transform(t) for t in transforms]

    def __call__(self, img, rng):
        for transform in self.transforms:
            img = transform(img, rng)
        return img

    def __repr__(self):
        return f"Compose({self.transforms})"

    def device_normalize(self):
        """The first step's ``device_normalize()`` that is not None (``Normalize(on_device)``)."""
        found = (getattr(t, "device_normalize", lambda: None)() for t in self.transforms)
        return next((f for f in found if f is not None), None)


def build_transform(block):
    """A transform from a config block (``{name: ..., ...}``), or ``block`` if already callable."""
    if callable(block):
        return block
    return TRANSFORMS.build(block)


def build_pipeline(blocks):
    """One callable from a list of blocks (or one block / callable); None stays None."""
    if blocks is None:
        return None
    if isinstance(blocks, (list, tuple)):
        return Compose(blocks)
    return build_transform(blocks)


@TRANSFORMS.register()
class RandomResizedCrop:
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio``, resize to ``size``.

    The sampling rule is torchvision's: up to 10 attempts with the area uniform in
    ``scale`` and the log aspect ratio uniform in ``log(ratio)``; the first that fits
    is placed uniformly; otherwise a centre crop with the ratio clamped to ``ratio``.
    Cropping is a view, so crop + resize is a single OpenCV call.
    """

    ATTEMPTS = 10

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bilinear",
                 antialias=True):
        self.height, self.width = _size_hw(size, "RandomResizedCrop")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(f"RandomResizedCrop: scale must satisfy 0 < min <= max <= 1, "
                              f"got {scale!r}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ConfigError(f"RandomResizedCrop: ratio must satisfy 0 < min <= max, got {ratio!r}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.interpolation = _interpolation_flag(interpolation, "RandomResizedCrop")
        self.antialias = antialias

    def get_params(self, height, width, rng):
        """(top, left, crop_height, crop_width) of the crop for an image of this size."""
        area = height * width
        for _ in range(self.ATTEMPTS):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self.log_ratio))
            crop_w = round(math.sqrt(target_area * aspect))
            crop_h = round(math.sqrt(target_area / aspect))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = int(rng.integers(0, height - crop_h + 1))
                left = int(rng.integers(0, width - crop_w + 1))
                return top, left, crop_h, crop_w
        image_ratio = width / height
        if image_ratio < self.ratio[0]:
            crop_w, crop_h = width, round(width / self.ratio[0])
        elif image_ratio > self.ratio[1]:
            crop_w, crop_h = round(height * self.ratio[1]), height
        else:
            crop_w, crop_h = width, height
        return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w

    def __call__(self, img, rng):
        top, left, crop_h, crop_w = self.get_params(img.shape[0], img.shape[1], rng)
        return resize(img[top:top + crop_h, left:left + crop_w], self.width, self.height,
                      self.interpolation, self.antialias)


@TRANSFORMS.register()
class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``."""

    def __init__(self, p=0.5):
        self.p = _probability(p, "RandomHorizontalFlip")

    def __call__(self, img, rng):
        return cv2.flip(img, 1) if _happens(self.p, rng) else img


@TRANSFORMS.register()
class ColorJitter:
    """torchvision's ColorJitter, applied with probability ``p``.

    ``brightness``, ``contrast`` and ``saturation`` are v (factor uniform in
    [max(0, 1 - v), 1 + v]) or a [low, high] pair; ``hue`` is v <= 0.5 (shift uniform
    in [-v, v] of a turn) or a pair. The enabled ops run in a random order, each with
    its own factor.
    """

    def __init__(self, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, p=1.0):
        owner = "ColorJitter"
        candidates = [
            (adjust_brightness, _range(brightness, owner, "brightness", center=1.0, lower=0.0)),
            (adjust_contrast, _range(contrast, owner, "contrast", center=1.0, lower=0.0)),
            (adjust_saturation, _range(saturation, owner, "saturation", center=1.0, lower=0.0)),
            (adjust_hue, _range(hue, owner, "hue", lower=-0.5, upper=0.5)),
        ]
        self.ops = [(op, bounds) for op, bounds in candidates if bounds is not None]
        self.p = _probability(p, owner)

    def __call__(self, img, rng):
        if not self.ops or not _happens(self.p, rng):
            return img
        for i in rng.permutation(len(self.ops)):
            op, (low, high) = self.ops[i]
            img = op(img, rng.uniform(low, high))
        return img


@TRANSFORMS.register()
class RandomGrayscale:
    """Replace the image by its 3-channel grayscale with probability ``p``."""

    def __init__(self, p=0.1):
        self.p = _probability(p, "RandomGrayscale")

    def __call__(self, img, rng):
        return to_grayscale(img) if _happens(self.p, rng) else img


@TRANSFORMS.register()
class GaussianBlur:
    """Gaussian blur with sigma uniform in ``sigma``, applied with probability ``p``.

    ``kernel_size`` None derives the kernel from sigma (OpenCV: 6 sigma + 1, odd),
    which is what Pillow's ``GaussianBlur(radius=sigma)`` in the SwAV reference
    approximates; an odd int fixes it (as torchvision's GaussianBlur requires).
    """

    def __init__(self, sigma=(0.1, 2.0), p=0.5, kernel_size=None):
        if isinstance(sigma, numbers.Number):
            sigma = (sigma, sigma)
        if not 0 < sigma[0] <= sigma[1]:
            raise ConfigError(f"GaussianBlur: sigma must be positive [min, max], got {sigma!r}")
        if kernel_size is not None and (kernel_size <= 0 or kernel_size % 2 == 0):
            raise ConfigError(f"GaussianBlur: kernel_size must be a positive odd int, "
                              f"got {kernel_size!r}")
        self.sigma = (float(sigma[0]), float(sigma[1]))
        self.kernel = (kernel_size or 0, kernel_size or 0)
        self.p = _probability(p, "GaussianBlur")

    def __call__(self, img, rng):
        if not _happens(self.p, rng):
            return img
        sigma = rng.uniform(*self.sigma)
        return cv2.GaussianBlur(img, self.kernel, sigmaX=sigma, sigmaY=sigma)


@TRANSFORMS.register()
class Resize:
    """Resize the shorter side to ``size`` keeping the aspect ratio, or to [height, width]."""

    def __init__(self, size, interpolation="bilinear", antialias=True):
        if not isinstance(size, numbers.Integral):
            size = _size_hw(size, "Resize")
        elif size <= 0:
            raise ConfigError(f"Resize: size must be positive, got {size!r}")
        self.size = size
        self.interpolation = _interpolation_flag(interpolation, "Resize")
        self.antialias = antialias

    def output_size(self, height, width):
        """(height, width) after resizing; the longer side is truncated as torchvision does."""
        if not isinstance(self.size, numbers.Integral):
            return self.size
        if height <= width:
            return self.size, int(self.size * width / height)
        return int(self.size * height / width), self.size

    def __call__(self, img, rng):
        height, width = self.output_size(img.shape[0], img.shape[1])
        return resize(img, width, height, self.interpolation, self.antialias)


@TRANSFORMS.register()
class CenterCrop:
    """Central ``size`` crop; smaller images are zero-padded first (as torchvision does)."""

    def __init__(self, size):
        self.height, self.width = _size_hw(size, "CenterCrop")

    def __call__(self, img, rng):
        pad_h, pad_w = max(self.height - img.shape[0], 0), max(self.width - img.shape[1], 0)
        if pad_h or pad_w:
            img = cv2.copyMakeBorder(img, pad_h // 2, (pad_h + 1) // 2, pad_w // 2, (pad_w + 1) // 2,
                                     cv2.BORDER_CONSTANT, value=0)
        top = int(round((img.shape[0] - self.height) / 2.0))
        left = int(round((img.shape[1] - self.width) / 2.0))
        return img[top:top + self.height, left:left + self.width]


@TRANSFORMS.register()
class Normalize:
    """``(img / 255 - mean) / std`` per channel as float32; ``mean``/``std`` in 0-1 units.

    ``to_chw`` writes the result channel-first directly (one pass instead of
    normalise + transpose); otherwise the layout stays HWC for :class:`ToCHW`.

    ``on_device`` (train loader only): emit the uint8 pixels as CHW and leave the arithmetic
    to the trainer, which applies :meth:`device_normalize` to each batch on the GPU. A uint8
    crop is a quarter of a float32 one in the workers' shared memory and in the copy to the
    device; the values are the same (the device does the same float32 multiply and add).
    """

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, to_chw=False, on_device=False):
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(f"Normalize: mean and std need 3 values each, std > 0; "
                              f"got {mean!r}, {std!r}")
        std255 = np.asarray(std, np.float64) * 255.0
        self.scale = (1.0 / std255).astype(np.float32)
        self.offset = (-np.asarray(mean, np.float64) * 255.0 / std255).astype(np.float32)
        self.to_chw = to_chw or on_device
        self.on_device = on_device

    def __call__(self, img, rng=None):
        if self.on_device:
            return np.ascontiguousarray(img.transpose(2, 0, 1))
        if not self.to_chw:
            return img.astype(np.float32) * self.scale + self.offset
        out = np.empty((3,) + img.shape[:2], np.float32)
        for c in range(3):
            np.multiply(img[:, :, c], self.scale[c], out=out[c])
            out[c] += self.offset[c]
        return out

    def device_normalize(self):
        """``batch -> batch`` that normalises its uint8 ``[B, 3, H, W]`` tensors where they
        are (see class doc); None unless ``on_device``."""
        if not self.on_device:
            return None
        import paddle  # here: the loader's workers import this module and never need it
        scale = paddle.to_tensor(self.scale.reshape(1, 3, 1, 1))
        offset = paddle.to_tensor(self.offset.reshape(1, 3, 1, 1))

        def normalize(value):
            if isinstance(value, (list, tuple)):
                return type(value)(normalize(v) for v in value)
            if isinstance(value, paddle.Tensor) and value.dtype == paddle.uint8:
                return value.astype("float32") * scale + offset
            return value
        return normalize


@TRANSFORMS.register()
class ToCHW:
    """HWC -> contiguous CHW (the layout Paddle's convolutions expect)."""

    def __call__(self, img, rng=None):
        return np.ascontiguousarray(img.transpose(2, 0, 1))


@TRANSFORMS.register()
class RandomAffine:
    """Rotate by an angle uniform in ``degrees`` and shear along x by ``shear`` degrees,
    about the image centre, keeping the size (uncovered pixels get ``fill``).

    ``degrees``/``shear``: v means [-v, v]; a pair is a range. ``shear`` may also be
    [x_min, x_max, y_min, y_max] to shear along y too. Positive angles turn
    counter-clockwise, as in torchvision.
    """

    def __init__(self, degrees=0.0, shear=0.0, interpolation="bilinear", fill=0):
        owner = type(self).__name__
        self.degrees = _range(degrees, owner, "degrees") or (0.0, 0.0)
        if isinstance(shear, numbers.Number) or len(shear) == 2:
            self.shear = (_range(shear, owner, "shear", lower=-89, upper=89) or (0.0, 0.0), (0.0, 0.0))
        elif len(shear) == 4:
            self.shear = (_range(shear[:2], owner, "shear", lower=-89, upper=89),
                          _range(shear[2:], owner, "shear", lower=-89, upper=89))
        else:
            raise ConfigError(f"{owner}: shear must be a number, [min, max] or 4 values, got {shear!r}")
        self.interpolation = _interpolation_flag(interpolation, owner)
        self.fill = fill

    def matrix(self, height, width, angle, shear_x, shear_y):
        """The 2x3 forward map: shear, then rotate, about the centre of the pixel grid."""
        center = np.array([(width - 1) * 0.5, (height - 1) * 0.5])
        shear = np.array([[1.0, math.tan(math.radians(shear_x))],
                          [math.tan(math.radians(shear_y)), 1.0]])
        rad = math.radians(angle)
        rotation = np.array([[math.cos(rad), math.sin(rad)],  # counter-clockwise on screen
                             [-math.sin(rad), math.cos(rad)]])
        linear = rotation @ shear
        return np.hstack([linear, (center - linear @ center)[:, None]])

    def __call__(self, img, rng):
        angle = rng.uniform(*self.degrees)
        shear_x, shear_y = rng.uniform(*self.shear[0]), rng.uniform(*self.shear[1])
        height, width = img.shape[:2]
        return cv2.warpAffine(img, self.matrix(height, width, angle, shear_x, shear_y), (width, height),
                              flags=self.interpolation, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=(self.fill,) * 3)


@TRANSFORMS.register()
class RandomRotation(RandomAffine):
    """Rotate by an angle uniform in ``degrees`` (v means [-v, v]) about the centre."""

    def __init__(self, degrees, interpolation="bilinear", fill=0):
        super().__init__(degrees=degrees, shear=0.0, interpolation=interpolation, fill=fill)
