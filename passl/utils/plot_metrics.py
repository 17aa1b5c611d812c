"""Training curves from ``metrics.jsonl`` as one PNG: loss, learning rate, prototype usage,
accuracies.

matplotlib is an optional extra (``pip install -e .[plot]``), imported through
:mod:`passl.utils.plotting`.
"""
import json
import os

from passl.errors import UserError
from passl.io.metrics_log import read_metrics
from passl.utils.plotting import pyplot, save_figure

METRICS_FILE = "metrics.jsonl"
# (panel title, record type, x key, y keys): a panel is drawn when any of its curves has points.
PANELS = (
    ("training loss", "train", "iter", ("loss",)),
    ("learning rate", "train", "iter", ("lr",)),
    # SwAV health: share of prototypes winning a crop of the batch; near 1/K means collapse
    ("prototypes used (share)", "train", "iter", ("prototypes_used",)),
    ("val accuracy (%)", "eval", "epoch", ("top1", "top5", "knn_top1")),
)


def load_records(path):
    """The records of a metrics.jsonl file, or a one-line UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found; pass the output_dir of a run "
                        f"(it holds {METRICS_FILE})")
    try:
        return read_metrics(path)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: a line is not valid JSON ({e.msg}): {e.doc.strip()[:60]!r}") from None


def curve(records, record_type, x_key, y_key):
    """(xs, ys) of the records of ``record_type`` that carry numbers under both keys."""
    numeric = (int, float)
    points = [(r[x_key], r[y_key]) for r in records if r.get("type") == record_type
              and not r.get("evaluate_only")  # a stand-alone evaluation, not a curve point
              and isinstance(r.get(x_key), numeric) and isinstance(r.get(y_key), numeric)]
    return [x for x, _ in points], [y for _, y in points]


def plot_metrics(metrics_path, output_path):
    """Draw the curves of ``metrics_path`` into the PNG ``output_path``; returns the curve names."""
    plt = pyplot()
    records = load_records(metrics_path)
    panels = []
    for title, record_type, x_key, y_keys in PANELS:
        curves = [(y_key, curve(records, record_type, x_key, y_key)) for y_key in y_keys]
        curves = [(y_key, points) for y_key, points in curves if points[0]]
        if curves:
            panels.append((title, x_key, curves))
    if not panels:
        raise UserError(f"{metrics_path}: no loss, lr, top1 or knn_top1 values to plot")
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for axis, (title, x_key, curves) in zip(axes[0], panels):
        for y_key, (xs, ys) in curves:
            axis.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=y_key)
        axis.set_title(title)
        axis.set_xlabel(x_key)
        axis.grid(alpha=0.3)
        if len(curves) > 1:
            axis.legend()
    figure.tight_layout()
    save_figure(figure, output_path)
    return [y_key for _, _, curves in panels for y_key, _ in curves]
