"""Report: what a run writes for people: JSON results, progress bars, example slices,
precision-recall curves.

Importable from anywhere; imports only io (atomic writes).
"""

from synjax.report.files import read_json, write_json
from synjax.report.precision_recall import plot_precision_recall
from synjax.report.progress import progress_bar
from synjax.report.slices import pick_slices, plot_slices

__all__ = [
    "pick_slices",
    "plot_precision_recall",
    "plot_slices",
    "progress_bar",
    "read_json",
    "write_json",
]
