"""The evaluation suite's picture: top-1 against labels per class, one panel per protocol.

Each row of the suite (a weights file, ``random``, ``pixels``) is a line with error bars
(the std over the draws); "all labels" sits at the right end, at the mean number of train
images per class, on a log axis.
"""
from passl.evaluation.suite import PROTOCOLS, TITLES
from passl.utils.plotting import pyplot, save_figure


def plot_suite(records, all_labels_per_class, output_path):
    """Draw ``records`` (results.json) into ``output_path`` (PNG)."""
    plt = pyplot()
    protocols = [p for p in PROTOCOLS if any(r["protocol"] == p for r in records)]
    names = list(dict.fromkeys(r["features"] for r in records))
    figure, axes = plt.subplots(1, len(protocols), figsize=(4.5 * len(protocols), 3.8),
                                squeeze=False, sharey=True)
    shots = sorted({r["labels_per_class"] for r in records if r["labels_per_class"]})
    ticks = shots + [all_labels_per_class]
    for ax, protocol in zip(axes[0], protocols):
        for name in names:
            points = sorted(((r["labels_per_class"] or all_labels_per_class, r["top1"],
                              r["top1_std"]) for r in records
                             if r["features"] == name and r["protocol"] == protocol))
            if points:
                x, y, err = zip(*points)
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
        ax.set_xscale("log")
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(n) for n in shots] + ["all"])
        ax.minorticks_off()
        ax.set_title(TITLES[protocol])
        ax.set_xlabel("labels per class")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("val top-1 (%)")
    lines = {}  # every row once, though pixels has no fine-tuning panel
    for ax in axes[0]:
        lines.update(zip(*reversed(ax.get_legend_handles_labels())))
    axes[0][-1].legend(list(lines.values()), list(lines), loc="lower right", fontsize="small")
    figure.tight_layout()
    save_figure(figure, output_path)
    return output_path
