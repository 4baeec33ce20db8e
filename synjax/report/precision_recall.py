"""A precision-recall curve as a PNG."""

from __future__ import annotations

import os
import pathlib

import numpy as np

from synjax.io.atomic import atomic_open


def plot_precision_recall(
    curve, path: str | os.PathLike, title: str = "synaptic partners"
) -> pathlib.Path:
    """Writes the curve as a PNG, atomically (`synjax.io.atomic`: temporary file, fsync, rename).

    Args:
      curve: a `synjax.evaluation.partners.PrecisionRecallCurve` (anything
        with `thresholds`, `precision`, `recall`, `best_threshold` and
        `best_fscore`).
      path: the PNG to write.
      title: the figure's title.

    Returns:
      The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = pathlib.Path(path)
    fig = Figure(figsize=(5, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(curve.recall, curve.precision, marker=".", label="precision / recall")
    best = int(np.argmax(curve.thresholds == curve.best_threshold))
    ax.plot(
        curve.recall[best],
        curve.precision[best],
        "o",
        label=f"best F {curve.best_fscore:.3f} at {curve.best_threshold:.3g}",
    )
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02), title=title)
    ax.legend(loc="lower left")
    with atomic_open(path, "wb") as stream:
        fig.savefig(stream, format="png", dpi=100)
    return path
