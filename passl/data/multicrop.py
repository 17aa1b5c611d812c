"""SwAV's multi-crop augmentation: several random crops per image at two (or more) sizes."""
from passl.data.registry import TRANSFORMS
from passl.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, ColorJitter, Compose, GaussianBlur,
                                   Normalize, RandomAffine, RandomGrayscale, RandomHorizontalFlip,
                                   RandomResizedCrop)
from passl.errors import ConfigError


@TRANSFORMS.register()
class MultiCrop:
    """Crop group g gives ``nmb_crops[g]`` crops of ``size_crops[g]`` pixels, each a
    RandomResizedCrop with area fraction in [min_scale_crops[g], max_scale_crops[g]].

    Every crop then gets its own draw of SwAV's distortion, in the reference order:
    optional rotation/shear (``rotation``, ``shear`` in degrees, 0 = off), horizontal
    flip (``flip``), colour jitter (0.8s, 0.8s, 0.8s, 0.2s) for s =
    ``color_jitter_strength`` with probability ``color_jitter_prob`` (s = 0: off),
    grayscale with ``grayscale_prob``, Gaussian blur with ``blur_prob`` and sigma in
    ``blur_sigma``, and normalisation with ``mean``/``std`` (0-1 units).

    Returns a list of float32 CHW arrays, groups in order, so crops of equal size are
    consecutive (the model batches them through the backbone together). The defaults
    are SwAV's ImageNet recipe 2x224 + 6x96. ``normalize_on_device: true`` returns uint8 CHW
    crops instead and the trainer normalises them on the device (``Normalize``'s
    ``on_device``: 4x less shared memory and host-to-device traffic, same values).
    """

    def __init__(self, nmb_crops=(2, 6), size_crops=(224, 96), min_scale_crops=(0.14, 0.05),
                 max_scale_crops=(1.0, 0.14), ratio=(3 / 4, 4 / 3), flip=True, rotation=0.0,
                 shear=0.0, color_jitter_strength=1.0, color_jitter_prob=0.8, grayscale_prob=0.2,
                 blur_prob=0.5, blur_sigma=(0.1, 2.0), interpolation="bilinear", antialias=True,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, normalize_on_device=False):
        groups = (nmb_crops, size_crops, min_scale_crops, max_scale_crops)
        if len({len(g) for g in groups}) != 1:
            raise ConfigError(
                "MultiCrop: nmb_crops, size_crops, min_scale_crops and max_scale_crops need one entry "
                f"per crop group, got lengths {[len(g) for g in groups]}")
        if any(int(n) != n or n < 1 for n in nmb_crops):
            raise ConfigError(f"MultiCrop: nmb_crops must be positive integers, got {list(nmb_crops)}")
        self.nmb_crops = [int(n) for n in nmb_crops]
        self.crops = [RandomResizedCrop(size, (low, high), ratio, interpolation, antialias)
                      for size, low, high in zip(size_crops, min_scale_crops, max_scale_crops)]
        self.distort = Compose(self._distortions(
            flip, rotation, shear, color_jitter_strength, color_jitter_prob, grayscale_prob,
            blur_prob, blur_sigma, interpolation, mean, std, normalize_on_device))

    @staticmethod
    def _distortions(flip, rotation, shear, strength, jitter_prob, grayscale_prob, blur_prob,
                     blur_sigma, interpolation, mean, std, normalize_on_device):
        steps = []
        if rotation or shear:
            steps.append(RandomAffine(degrees=rotation, shear=shear, interpolation=interpolation))
        if flip:
            steps.append(RandomHorizontalFlip(0.5))
        if strength and jitter_prob:
            steps.append(ColorJitter(0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength,
                                     p=jitter_prob))
        if grayscale_prob:
            steps.append(RandomGrayscale(grayscale_prob))
        if blur_prob:
            steps.append(GaussianBlur(blur_sigma, p=blur_prob))
        steps.append(Normalize(mean, std, to_chw=True, on_device=normalize_on_device))
        return steps

    def device_normalize(self):
        return self.distort.device_normalize()

    @property
    def num_crops(self):
        return sum(self.nmb_crops)

    def __call__(self, img, rng):
        return [self.distort(crop(img, rng), rng)
                for crop, count in zip(self.crops, self.nmb_crops) for _ in range(count)]
