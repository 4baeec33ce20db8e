"""Post-processing on the host (numpy, scipy): partner candidates, their windows and
labels, duplicate suppression, watersheds and agglomeration.

May import io, data, targets, models, train and inference; never evaluation
(a metric to tune by is passed in, as `grid_search(..., metric=...)`).
"""

from synjax.postprocess.agglomeration import agglomerate, region_graph
from synjax.postprocess.candidates import Candidates, generate_candidates, site_components
from synjax.postprocess.instance_watershed import tune_instance_watershed
from synjax.postprocess.partner_nms import suppress_duplicates
from synjax.postprocess.pruning_windows import extract_windows, label_candidates
from synjax.postprocess.watershed import GridResult, grid_search, segment

__all__ = [
    "Candidates",
    "GridResult",
    "agglomerate",
    "extract_windows",
    "generate_candidates",
    "grid_search",
    "label_candidates",
    "region_graph",
    "segment",
    "site_components",
    "suppress_duplicates",
    "tune_instance_watershed",
]
