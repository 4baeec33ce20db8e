"""Attention PNGs: a heat map (e.g. Grad-CAM) over the EM slices of one detection."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import numpy as np

from synjax.io.atomic import atomic_open

# Slices of a detection shown at most (its middle ones).
MAX_SLICES = 3


def plot_attention(
    raw: np.ndarray,
    heat: np.ndarray,
    box: Sequence[float],
    path: str | os.PathLike,
    title: str = "",
    truth: np.ndarray | None = None,
) -> pathlib.Path:
    """Writes one PNG: per slice of the box, the raw slice and the heat map over it.

    Args:
      raw: [z, y, x] intensities of the block.
      heat: [z, y, x] heat map in [0, 1] on the same grid.
      box: (z0, y0, x0, z1, y1, x1) of the detection, drawn as a rectangle.
      path: the PNG to write (atomically).
      title: figure title.
      truth: optional [z, y, x] true cleft labels, outlined in green.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    raw, heat = np.asarray(raw), np.asarray(heat)
    z0, y0, x0, z1, y1, x1 = (float(v) for v in box)
    first, last = max(0, int(np.floor(z0))), min(raw.shape[0] - 1, int(np.ceil(z1)) - 1)
    slices = list(range(first, last + 1)) or [min(max(first, 0), raw.shape[0] - 1)]
    if len(slices) > MAX_SLICES:
        middle = len(slices) // 2
        slices = slices[middle - 1 : middle - 1 + MAX_SLICES]
    fig = Figure(figsize=(6.4, 3.2 * len(slices)))
    FigureCanvasAgg(fig)
    for row, z in enumerate(slices):
        for col in range(2):
            ax = fig.add_subplot(len(slices), 2, 2 * row + col + 1)
            ax.imshow(raw[z], cmap="gray")
            if col == 1:
                ax.imshow(heat[z], cmap="jet", vmin=0.0, vmax=1.0, alpha=0.45)
            if truth is not None and np.any(truth[z]):
                ax.contour(truth[z] > 0, levels=[0.5], colors="lime", linewidths=0.6)
            ax.add_patch(
                Rectangle(
                    (x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color="yellow", lw=0.8
                )
            )
            ax.set_title(f"{'Grad-CAM' if col else 'raw'} z={z}", fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as stream:
        fig.savefig(stream, format="png", dpi=80)
    return path
