"""Tables keyed by pairs of label ids, accumulated block by block.

Block-wise post-processing reads a volume one block at a time and collects,
per block, rows keyed by two label ids (a component and a segment, two
touching segments, two fragments to join) with numbers to add up, or to take
the minimum or maximum of. `PairTable` keeps those rows and folds equal keys
together whenever the rows held grow past a bound, so its memory follows the
number of distinct pairs (an id table), not the number of blocks or voxels.

Keys are two uint64 columns (labels may use all 64 bits, as CREMI's do), so
rows are sorted with `np.lexsort` rather than packed into one integer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from synjax.errors import ConfigError

REDUCTIONS = ("sum", "min", "max")
_REDUCE = {"sum": np.add, "min": np.minimum, "max": np.maximum}
# Fold equal keys once this many rows wait (a few tens of MB of columns).
DEFAULT_COMPACT_ROWS = 1 << 20


def reduce_pairs(
    first: np.ndarray, second: np.ndarray, values: Sequence[np.ndarray], how: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Rows with equal `(first, second)` folded into one, sorted by first, then second.

    Args:
      first, second: `[n]` uint64 keys.
      values: value columns, each `[n]` or `[n, k]`.
      how: one of `REDUCTIONS` per value column.

    Returns:
      `(first [m], second [m], values)`, each value column reduced over its key.
    """
    first, second = np.asarray(first, np.uint64), np.asarray(second, np.uint64)
    if len(first) == 0:
        return first, second, [np.asarray(v) for v in values]
    order = np.lexsort((second, first))
    first, second = first[order], second[order]
    starts = np.flatnonzero(
        np.concatenate([[True], (first[1:] != first[:-1]) | (second[1:] != second[:-1])])
    )
    reduced = [
        _REDUCE[op].reduceat(np.asarray(v)[order], starts, axis=0)
        for v, op in zip(values, how, strict=True)
    ]
    return first[starts], second[starts], reduced


class PairTable:
    """Rows `(first, second, *values)` whose equal keys are folded together.

    Example (overlap voxel counts and sums of a weight)::

        table = PairTable(("sum", "sum"))
        for block in blocks:
            table.add(components, segments, [np.ones(n, np.int64), weights])
        first, second, (counts, weight_sums) = table.result()
    """

    def __init__(self, how: Sequence[str], compact_rows: int = DEFAULT_COMPACT_ROWS):
        """Args:
        how: reduction of each value column: "sum", "min" or "max".
        compact_rows: fold equal keys once this many rows wait.
        """
        bad = [op for op in how if op not in REDUCTIONS]
        if bad:
            raise ConfigError(f"PairTable reductions {bad}: expected each of {REDUCTIONS}")
        self._how = tuple(how)
        self._compact_rows = compact_rows
        self._parts: list[tuple[np.ndarray, np.ndarray, list[np.ndarray]]] = []
        self._waiting = 0

    def add(self, first: np.ndarray, second: np.ndarray, values: Sequence[np.ndarray]) -> None:
        """Adds rows (several may share a key); folded before they are held."""
        if len(values) != len(self._how):
            raise ConfigError(f"PairTable.add got {len(values)} value columns, {len(self._how)}")
        if len(first) == 0:
            return
        part = reduce_pairs(first, second, values, self._how)
        self._parts.append(part)
        self._waiting += len(part[0])
        if self._waiting > self._compact_rows and len(self._parts) > 1:
            self._compact()

    def _compact(self) -> None:
        if len(self._parts) > 1:
            first = np.concatenate([p[0] for p in self._parts])
            second = np.concatenate([p[1] for p in self._parts])
            values = [np.concatenate([p[2][i] for p in self._parts]) for i in range(len(self._how))]
            self._parts = [reduce_pairs(first, second, values, self._how)]
        self._waiting = len(self._parts[0][0]) if self._parts else 0

    def result(self) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """`(first [m], second [m], values)`: one row per distinct key, sorted by key.

        With no rows, value columns are empty float64 arrays.
        """
        self._compact()
        if not self._parts:
            empty = np.zeros((0,), np.uint64)
            return empty, empty.copy(), [np.zeros((0,)) for _ in self._how]
        return self._parts[0]
