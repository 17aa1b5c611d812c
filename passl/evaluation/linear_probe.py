"""Linear probe: a logistic regression on frozen features, the fast "linear" protocol.

Training a linear layer with SGD for many epochs per weights file, label count and draw
would dominate an evaluation suite; on frozen features scikit-learn's logistic regression
(L2, C=1, lbfgs) reaches the same kind of answer in seconds. The features are standardised
with the statistics of the labelled images alone (what a user with only those labels could
compute), so pooled ResNet features and raw pixels are treated alike.
"""
import warnings

import numpy as np


def linear_probe_top1(train_x, train_y, val_x, val_y, max_iter=1000):
    """Top-1 (percent) on ``val_x`` of a logistic regression fitted to ``train_x``.

    Arguments are NumPy arrays: features ``[N, D]`` and integer labels ``[N]``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    with warnings.catch_warnings():
        # a few labelled images are often separable: lbfgs then stops at max_iter, harmlessly
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(np.asarray(train_x), np.asarray(train_y))
    return float((classifier.predict(np.asarray(val_x)) == np.asarray(val_y)).mean() * 100)
