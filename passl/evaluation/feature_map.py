"""Backbone features as 2-D points (PCA or t-SNE from scikit-learn) for a class-coloured map."""
import numpy as np

METHODS = ("tsne", "pca")


def evenly_spaced(count, limit):
    """At most ``limit`` indices spread evenly over ``range(count)`` (all when fewer): large
    val sets are thinned for t-SNE without favouring a class block of the folder order."""
    if count <= limit:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, limit).round().astype("int64"))


def project_2d(features, method="tsne", seed=0):
    """``[N, C]`` features -> ``[N, 2]`` points; seeded, so a figure is reproducible."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    features = np.asarray(features, dtype="float32")
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(features)
    # perplexity must stay below the number of points (tiny sets in tests)
    perplexity = min(30.0, max(1.0, (len(features) - 1) / 3))
    return TSNE(n_components=2, init="pca", perplexity=perplexity,
                random_state=seed).fit_transform(features)
