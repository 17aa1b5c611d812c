"""Drawing for ``tools/visualize.py``: prototype gallery, assignment health, feature maps.

Takes numbers already computed (by :mod:`passl.evaluation.prototypes` and
:mod:`passl.evaluation.feature_map`) and only lays them out, so what a picture shows is
what the tests check.
"""
import cv2
import numpy as np

from passl.utils.plotting import pyplot, save_figure

GAP = 2  # pixels between gallery thumbnails
MAX_LEGEND_CLASSES = 20
METHOD_NAMES = {"tsne": "t-SNE", "pca": "PCA"}


def thumbnail(image, size):
    """A ``size`` x ``size`` RGB uint8 view of an HWC (or HW) image: centre square, resized."""
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[top:top + side, left:left + side]
    # upscaled tiny images stay crisp; downscaled photos stay smooth
    interpolation = cv2.INTER_NEAREST if side < size else cv2.INTER_AREA
    return cv2.resize(square, (size, size), interpolation=interpolation)


def gallery_mosaic(rows, size):
    """One white-gapped RGB array: row r holds the thumbnails of ``rows[r]`` (lists of images)."""
    columns = max(len(images) for images in rows)
    cell = size + GAP
    mosaic = np.full((len(rows) * cell - GAP, columns * cell - GAP, 3), 255, dtype=np.uint8)
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            mosaic[r * cell:r * cell + size, c * cell:c * cell + size] = thumbnail(image, size)
    return mosaic


def draw_gallery(rows, output_path, title, size=48):
    """``rows``: ``[{'prototype': id, 'share': fraction of images, 'images': [HWC uint8]}]``,
    drawn one prototype per row, its id and usage share on the left."""
    plt = pyplot()
    mosaic = gallery_mosaic([row["images"] for row in rows], size)
    inches = mosaic.shape[1] / 60 + 1.6, mosaic.shape[0] / 60 + 0.7
    figure, axis = plt.subplots(figsize=inches)
    axis.imshow(mosaic, interpolation="nearest")
    cell = size + GAP
    axis.set_yticks([r * cell + size / 2 for r in range(len(rows))])
    axis.set_yticklabels([f"#{row['prototype']}  {100 * row['share']:.1f}%" for row in rows])
    axis.set_xticks([])
    axis.tick_params(length=0)
    for spine in axis.spines.values():
        spine.set_visible(False)
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    save_figure(figure, output_path)


def draw_usage(history, num_images, output_path):
    """Assignment health. ``history``: ``[{'epoch', 'counts', 'entropy'}]`` oldest first (one
    entry for a single checkpoint). Left: images per prototype of the last entry, sorted, with
    the uniform share; right (several entries): entropy and prototypes used over training."""
    plt = pyplot()
    last = history[-1]
    counts = np.sort(last["counts"])[::-1]
    num_prototypes = len(counts)
    max_entropy = np.log(num_prototypes)
    panels = 2 if len(history) > 1 else 1
    figure, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.6), squeeze=False)
    bars = axes[0][0]
    bars.bar(np.arange(num_prototypes), counts, width=1.0, color="tab:blue")
    bars.axhline(num_images / num_prototypes, color="tab:red", linestyle="--", label="uniform")
    bars.set_xlabel("prototype (most assigned first)")
    bars.set_ylabel("images (hard assignment)")
    when = f"epoch {last['epoch']}, " if last["epoch"] is not None else ""
    bars.set_title(f"{when}{num_images} images: entropy {last['entropy']:.2f} of "
                   f"{max_entropy:.2f} nats\n{int((counts > 0).sum())}/{num_prototypes} "
                   f"prototypes used", fontsize=9)
    bars.legend(fontsize=8)
    if panels == 2:
        curve = axes[0][1]
        epochs = [entry["epoch"] for entry in history]
        curve.plot(epochs, [entry["entropy"] / max_entropy for entry in history], marker="o",
                   label="entropy / ln K")
        curve.plot(epochs, [(entry["counts"] > 0).mean() for entry in history], marker="s",
                   label="share of prototypes used")
        curve.set_ylim(0, 1.05)
        curve.set_xlabel("epoch")
        curve.set_title("assignments over training (1 = even, 0 = collapse)", fontsize=9)
        curve.grid(alpha=0.3)
        curve.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, output_path)


def draw_feature_maps(panels, method, output_path, class_names=None):
    """Side-by-side class-coloured scatter plots. ``panels``: ``[{'title', 'points' [N, 2],
    'labels' [N]}]``; ``class_names[label]`` names a class in the legend (else its number)."""
    plt = pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.4), squeeze=False)
    classes = np.unique(np.concatenate([panel["labels"] for panel in panels]))
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for axis, panel in zip(axes[0], panels):
        for i, label in enumerate(classes):
            mine = panel["labels"] == label
            axis.scatter(panel["points"][mine, 0], panel["points"][mine, 1], s=6,
                         color=colours(i % colours.N),
                         label=str(class_names[label] if class_names is not None else label))
        axis.set_title(panel["title"], fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
    if len(classes) <= MAX_LEGEND_CLASSES:
        axes[0][-1].legend(title="class", fontsize=7, markerscale=2, loc="center left",
                           bbox_to_anchor=(1.0, 0.5))
    figure.suptitle(f"backbone features, {METHOD_NAMES.get(method, method)} of {len(panels[0]['labels'])} images",
                    fontsize=10)
    figure.tight_layout()
    save_figure(figure, output_path)
