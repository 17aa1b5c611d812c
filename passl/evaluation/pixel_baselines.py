"""Raw pixels as features: the baseline every learned representation has to beat.

An image's "features" are its pixels after the evaluation transforms (e.g. Resize,
CenterCrop, Normalize), flattened. The evaluation suite (:mod:`passl.evaluation.suite`)
measures them with the very protocols the backbones get: the weighted kNN vote on the
L2-normalised vectors and the logistic-regression linear probe.
"""
import numpy as np

from passl.data.registry import DATASETS


def dataset_pixels(dataset_block, progress=iter):
    """``(pixels [N, D] float32, labels [N])`` of a dataset block (its transforms applied).

    ``progress`` wraps the index range (e.g. a tqdm bar)."""
    dataset = DATASETS.build(dataset_block)
    pixels = np.stack([np.asarray(dataset[i][0], np.float32).reshape(-1)
                       for i in progress(range(len(dataset)))])
    return pixels, np.asarray(dataset.labels)
