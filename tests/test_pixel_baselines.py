"""Raw-pixel baselines: kNN equals an independent nearest-neighbour vote, logistic regression fits."""
import numpy as np

from passl.data.datasets import ImageFolder
from passl.evaluation.pixel_baselines import raw_pixel_baselines
from tiny_image_folder import NORMALIZE, linear_config, write_image_folder


def pixels(root):
    dataset = ImageFolder(str(root), transforms=[NORMALIZE])
    return (np.stack([dataset[i][0].reshape(-1) for i in range(len(dataset))]),
            dataset.labels)


def test_knn_is_a_cosine_vote_on_normalised_pixels(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=(8, 6), noise=200)
    cfg = linear_config(data, tmp_path / "out")
    train_x, train_y = pixels(data / "train")
    val_x, val_y = pixels(data / "val")
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    similarity = unit(val_x) @ unit(train_x).T
    for k in (1, 5):
        nearest = np.argsort(-similarity, axis=1)[:, :k]
        votes = np.zeros((len(val_x), 3))
        for q in range(len(val_x)):
            for n in nearest[q]:
                votes[q, train_y[n]] += np.exp(similarity[q, n] / 0.07)
        expected = (votes.argmax(axis=1) == val_y).mean() * 100
        assert raw_pixel_baselines(cfg, k=k)["knn_top1"] == expected


def test_logistic_regression_separates_the_colours(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=(8, 6), noise=40)
    cfg = linear_config(data, tmp_path / "out")
    assert raw_pixel_baselines(cfg)["logreg_top1"] == 100.0
