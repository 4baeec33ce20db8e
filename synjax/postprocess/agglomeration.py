"""Mean-boundary agglomeration of a watershed over-segmentation.

A watershed with shallow seeds splits neurons wherever the boundary map has a
weak false wall (an organelle's rim, a faint interior ridge), while raising
`h` to suppress those seeds also merges true neighbours across gaps in real
membranes. Agglomeration separates the two decisions: a shallow watershed
first over-segments, then adjacent regions are merged greedily, lowest first,
while the mean boundary probability along their contact surface is below a
threshold; after each merge the merged region's contacts are averaged anew
(weighted by contact size). This is the mean-affinity agglomeration that
follows the watershed in most connectomics pipelines (e.g. waterz, Funke et
al. 2018); here it runs on scikit-image's region adjacency graph
(`skimage.graph.rag_boundary`, vectorised) and its heap-based
`merge_hierarchical`.

Contacts are 6-connected (face neighbours). The region graph of a 250^3
watershed with about 900 regions is built in under a second, and one merge
pass takes about 0.2 s (2-core CPU).
"""

from __future__ import annotations

import networkx as nx
import numpy as np
from skimage import graph as skgraph

from synjax.errors import ConfigError, DataError

# scikit-image's names for a RAG edge's mean boundary value and contact size.
WEIGHT, COUNT = "weight", "count"


def region_graph(segmentation: np.ndarray, boundary: np.ndarray) -> skgraph.RAG:
    """Region adjacency graph with the mean boundary value on each contact.

    Args:
        segmentation: `[z, y, x]` integer labels; 0 is background and takes no
            part in merging.
        boundary: `[z, y, x]` boundary probability (high on membranes), same shape.

    Returns:
        A `skimage.graph.RAG` whose nodes are the foreground labels and whose
        edges carry `weight` (mean boundary value on the voxels either side
        of the contact) and `count` (how many such voxels).

    Raises:
        DataError: if the shapes differ or the volumes are not 3D.
    """
    segmentation, boundary = np.asarray(segmentation), np.asarray(boundary)
    if segmentation.ndim != 3 or segmentation.shape != boundary.shape:
        raise DataError(
            "agglomeration expects 3D segmentation and boundary map of one shape, got "
            f"{segmentation.shape} and {boundary.shape}"
        )
    # rag_boundary indexes a sparse matrix with the labels: signed integers.
    labels = segmentation.astype(np.int64, copy=False)
    if labels.size == 0 or labels.min() == labels.max():
        # One label everywhere: no contacts, which rag_boundary cannot take.
        # (Any two labels in a filled volume touch somewhere.)
        rag = skgraph.RAG()
        for label in labels.flat[:1]:
            rag.add_node(int(label), labels=[int(label)])
    else:
        rag = skgraph.rag_boundary(labels, boundary.astype(np.float64, copy=False), connectivity=1)
    if rag.has_node(0):
        rag.remove_node(0)
    return rag


def _mean_of_contacts(rag: skgraph.RAG, src: int, dst: int, neighbour: int) -> dict:
    """Weight of `neighbour`'s edge to the merge of `src` and `dst`: size-weighted mean."""
    none = {WEIGHT: 0.0, COUNT: 0}
    a, b = rag[src].get(neighbour, none), rag[dst].get(neighbour, none)
    count = a[COUNT] + b[COUNT]
    return {WEIGHT: (a[COUNT] * a[WEIGHT] + b[COUNT] * b[WEIGHT]) / count, COUNT: count}


def _no_node_data(rag: skgraph.RAG, src: int, dst: int) -> None:
    """Nodes carry nothing but their labels, which `RAG.merge_nodes` joins itself."""


def merge_graph(rag: skgraph.RAG, segmentation: np.ndarray, threshold: float) -> skgraph.RAG:
    """Merges `rag` in place, lowest contact first, while contacts are below `threshold`.

    Args:
        rag: from `region_graph(segmentation, ...)`; modified in place.
        segmentation: the labels the graph was built from.
        threshold: mean boundary value below which adjacent regions merge.

    Returns:
        `rag`, each node's `labels` listing the original labels it now holds.
    """
    skgraph.merge_hierarchical(
        np.asarray(segmentation),
        rag,
        thresh=threshold,
        rag_copy=False,
        in_place_merge=True,
        merge_func=_no_node_data,
        weight_func=_mean_of_contacts,
    )
    return rag


def relabel(segmentation: np.ndarray, rag: nx.Graph) -> np.ndarray:
    """Maps each original label to its merged node (ids 1..n; 0 stays 0).

    Returns:
        uint64 `[z, y, x]`.
    """
    segmentation = np.asarray(segmentation)
    label_map = np.zeros(int(segmentation.max()) + 1, dtype=np.uint64)
    for new_id, (_, data) in enumerate(rag.nodes(data=True), start=1):
        label_map[np.asarray(data["labels"], dtype=np.int64)] = new_id
    return label_map[segmentation]


def agglomerate(
    segmentation: np.ndarray,
    boundary: np.ndarray,
    threshold: float,
    rag: skgraph.RAG | None = None,
) -> np.ndarray:
    """Merges adjacent regions whose mean contact boundary is below `threshold`.

    Args:
        segmentation: `[z, y, x]` over-segmentation, ids >= 1, 0 = background.
        boundary: `[z, y, x]` boundary probability in [0, 1], same shape.
        threshold: in [0, 1]; 0 merges nothing, 1 merges every touching pair.
        rag: optional `region_graph(segmentation, boundary)` to reuse (it is
            copied, not modified), e.g. when trying several thresholds.

    Returns:
        uint64 `[z, y, x]` merged segment ids 1..n, 0 = background.

    Raises:
        ConfigError: if threshold is outside [0, 1].
    """
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(
            f"agglomeration threshold must be in [0, 1] (a boundary probability), got {threshold}"
        )
    graph = region_graph(segmentation, boundary) if rag is None else rag.copy()
    return relabel(segmentation, merge_graph(graph, segmentation, threshold))
