"""Raw-pixel baselines: what learned features have to beat on the same labels.

A kNN on the flattened, normalised pixels with the very vote the feature kNN uses
(:func:`passl.evaluation.knn.knn_votes`: cosine similarity, k nearest, ``exp(sim / T)``
weights), and scikit-learn's logistic regression (L2, C=1, lbfgs) on the same vectors as
the "linear classifier" of raw pixels. Images come from a classification config's
dataloader blocks through its val transforms, as the feature kNN sees them.
"""
import numpy as np
import paddle
import paddle.nn.functional as F

from passl.data.registry import DATASETS
from passl.evaluation.knn import knn_votes
from passl.evaluation.knn_eval import memory_bank_blocks


def dataset_pixels(dataset_block):
    """``(pixels [N, D] float32, labels [N])`` of a dataset block (its transforms applied)."""
    dataset = DATASETS.build(dataset_block)
    pixels = np.stack([np.asarray(dataset[i][0], np.float32).reshape(-1)
                       for i in range(len(dataset))])
    return pixels, np.asarray(dataset.labels)


def raw_pixel_baselines(cfg, k=20, temperature=0.07):
    """Top-1 (percent) of kNN and logistic regression on raw pixels: ``dataloader.train``
    (with the val transforms) as training set, ``dataloader.val`` as queries.

    Returns ``{'knn_top1': float, 'logreg_top1': float}``.
    """
    from sklearn.linear_model import LogisticRegression

    bank_block, query_block = memory_bank_blocks(cfg)
    train_x, train_y = dataset_pixels(bank_block["dataset"])
    val_x, val_y = dataset_pixels(query_block["dataset"])
    with paddle.no_grad():
        votes = knn_votes(F.normalize(paddle.to_tensor(val_x), axis=1),
                          F.normalize(paddle.to_tensor(train_x), axis=1),
                          paddle.to_tensor(train_y), int(train_y.max()) + 1, k, temperature)
    knn_top1 = float((votes.numpy().argmax(axis=1) == val_y).mean() * 100)
    classifier = LogisticRegression(max_iter=1000).fit(train_x, train_y)
    logreg_top1 = float((classifier.predict(val_x) == val_y).mean() * 100)
    return {"knn_top1": knn_top1, "logreg_top1": logreg_top1}
