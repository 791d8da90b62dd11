"""The report's figures, drawn with matplotlib as small SVG data URIs (text kept as text, no fonts embedded).

matplotlib is a dependency already and writes static vector images a page can inline without any
script; ``Figure`` is used without pyplot so nothing global (backend, rcParams) changes.
"""

from __future__ import annotations

import base64
import io

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from ad.curves import precision_recall_curve, roc_curve
from ad.report.artifacts import Predictions
from ad.report.tables import COLUMNS, Table

GOOD, DEFECT, MARK = "#1f77b4", "#d62728", "#333333"
STYLE = {"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
         "svg.hashsalt": "ad.report"}


def data_uri(figure: Figure) -> str:
    """The figure as an SVG data URI."""
    out = io.BytesIO()
    with matplotlib.rc_context(STYLE):
        figure.savefig(out, format="svg", metadata={"Date": None})  # laid out already (constrained)
    return "data:image/svg+xml;base64," + base64.b64encode(out.getvalue()).decode()


def new_figure(width: float, height: float, panels: int) -> tuple[Figure, list]:
    """A figure of ``panels`` axes side by side, drawn under the report's style."""
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(width, height), layout="constrained")
        return figure, list(np.atleast_1d(figure.subplots(1, panels)))


def sweep_figure(table: Table) -> str | None:
    """Each metric against the settings compared: a line per category and the average in black."""
    settings = table.settings()
    metrics = [k for k in COLUMNS.values() if any(k in row.metrics for row in table.rows)]
    if len(settings) < 2 or not metrics:
        return None
    labels = [", ".join(setting) for setting in settings]
    x = np.arange(len(settings))
    with matplotlib.rc_context(STYLE):
        figure, axes = new_figure(2.6 * len(metrics), 2.6, len(metrics))
        for ax, key in zip(axes, metrics, strict=True):
            for category in dict.fromkeys(row.category for row in table.rows):
                values = {row.setting: row.metrics.get(key, np.nan) for row in table.rows if row.category == category}
                ax.plot(x, [values.get(s, np.nan) for s in settings], marker="o", lw=1, ms=3, label=category)
            means = [means.get(key, np.nan) for _, means, _ in table.per_setting()]
            ax.plot(x, means, color="black", lw=2.2, marker="s", ms=4, label="average")
            ax.set_title(next(name for name, k in COLUMNS.items() if k == key))
            ax.set_xticks(x, labels, rotation=30 if max(map(len, labels)) > 6 else 0, ha="right")
            ax.set_xlabel(" · ".join(table.varied))
            ax.grid(alpha=0.3)
        handles, names = axes[-1].get_legend_handles_labels()
        figure.legend(handles, names, fontsize=7, frameon=False, loc="outside right center")
        return data_uri(figure)


def run_figure(pred: Predictions, threshold: float | None, name: str = "threshold") -> str:
    """Image-level ROC and precision-recall curves with the operating point (``name``d in the legends), and the
    scores of good vs defective images with the threshold."""
    with matplotlib.rc_context(STYLE):
        figure, (roc, pr, hist) = new_figure(9.6, 2.6, 3)
        both = 0 < pred.target.sum() < len(pred.target)
        flagged = pred.flagged(threshold)
        if both:
            fpr, tpr = roc_curve(pred.score, pred.target)
            roc.plot(fpr, tpr, color=DEFECT, lw=1.5)
            precision, recall = precision_recall_curve(pred.score, pred.target)
            pr.plot(recall, precision, color=DEFECT, lw=1.5)
            roc.plot([0, 1], [0, 1], color="#bbbbbb", lw=0.8, ls="--")
            if flagged is not None:
                tp = np.sum(flagged & (pred.target == 1))
                roc.plot(np.mean(flagged[pred.target == 0]), tp / pred.target.sum(), "o", color=MARK, label=name)
                roc.legend(fontsize=7, frameon=False, loc="lower right")
                if flagged.any():
                    pr.plot(tp / pred.target.sum(), tp / flagged.sum(), "o", color=MARK, label=name)
                    pr.legend(fontsize=7, frameon=False, loc="lower left")
        else:
            for ax in (roc, pr):
                ax.text(0.5, 0.5, "needs good and defective\ntest images", ha="center", va="center")
        roc.set(title="ROC (image)", xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1),
                ylim=(0, 1.02))
        pr.set(title="Precision-recall (image)", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        bins = np.histogram_bin_edges(pred.score, bins=min(40, max(10, len(pred.score) // 4)))
        hist.hist(pred.score[pred.target == 0], bins=bins, color=GOOD, alpha=0.6, label="good")
        hist.hist(pred.score[pred.target == 1], bins=bins, color=DEFECT, alpha=0.6, label="defective")
        if threshold is not None:
            hist.axvline(threshold, color=MARK, ls="--", lw=1.2, label=name)
        hist.set(title="Image scores", xlabel="score", ylabel="images")
        hist.legend(fontsize=7, frameon=False)
        return data_uri(figure)
