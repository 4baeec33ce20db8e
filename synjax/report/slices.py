"""Example slices of a volume with labels or predictions drawn over them."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from synjax.io.atomic import atomic_open

# Slices shown per figure: enough to see variety, few enough to stay readable.
DEFAULT_SLICES = 3


def pick_slices(
    volume_shape: Sequence[int], count: int = DEFAULT_SLICES, weights=None
) -> list[int]:
    """z indices to show: the `count` heaviest of `weights` [z], else evenly spaced."""
    depth = int(volume_shape[0])
    if weights is not None and np.any(np.asarray(weights) > 0):
        order = np.argsort(-np.asarray(weights), kind="stable")[:count]
        return sorted(int(z) for z in order)
    return sorted({int(z) for z in np.linspace(0, depth - 1, count + 2)[1:-1].round()})


def plot_slices(
    raw: np.ndarray,
    overlays: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    slices: Sequence[int] | None = None,
    title: str = "",
) -> pathlib.Path:
    """Writes a PNG grid: one row per slice, raw then raw with each overlay.

    Args:
      raw: [z, y, x] intensities.
      overlays: name -> [z, y, x] label volume (drawn as random colours, 0
        transparent) or float map in [-1, 1] (drawn as a diverging colour map).
      path: the PNG to write (atomically).
      slices: z indices; default `pick_slices(raw.shape)`.
      title: figure title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    slices = list(slices) if slices is not None else pick_slices(raw.shape)
    columns = 1 + len(overlays)
    fig = Figure(figsize=(3.2 * columns, 3.2 * len(slices)))
    FigureCanvasAgg(fig)
    rng = np.random.default_rng(0)
    colours = ListedColormap(rng.uniform(0.15, 1.0, size=(256, 3)))
    for row, z in enumerate(slices):
        ax = fig.add_subplot(len(slices), columns, row * columns + 1)
        ax.imshow(raw[z], cmap="gray")
        ax.set_title(f"raw z={z}", fontsize=8)
        ax.axis("off")
        for col, (name, volume) in enumerate(overlays.items(), start=2):
            ax = fig.add_subplot(len(slices), columns, row * columns + col)
            ax.imshow(raw[z], cmap="gray")
            plane = np.asarray(volume[z])
            if np.issubdtype(plane.dtype, np.floating):
                ax.imshow(plane, cmap="bwr", vmin=-1, vmax=1, alpha=0.5)
            else:
                masked = np.ma.masked_equal((plane % 255 + 1) * (plane != 0), 0)
                ax.imshow(
                    masked, cmap=colours, vmin=0, vmax=255, alpha=0.45, interpolation="nearest"
                )
            ax.set_title(f"{name} z={z}", fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = pathlib.Path(path)
    with atomic_open(path, "wb") as stream:
        fig.savefig(stream, format="png", dpi=80)
    return path
