"""Duplicate suppression of partner detections, on hand-built cases."""

import numpy as np
import pytest

from synjax.errors import DataError
from synjax.postprocess.partner_nms import suppress_duplicates


def test_keeps_the_best_of_near_duplicates_only():
    pre = np.array([1, 1, 1, 1, 2])
    post = np.array([2, 2, 2, 3, 1])
    loc = np.array(
        [
            [0.0, 0.0, 0.0],  # group (1, 2), score 0.5
            [0.0, 0.0, 300.0],  # group (1, 2), 300 nm away, better: kept
            [0.0, 0.0, 1000.0],  # group (1, 2), 700 nm from the best: kept
            [0.0, 0.0, 10.0],  # group (1, 3): another pair, kept
            [0.0, 0.0, 5.0],  # group (2, 1): the reverse direction, kept
        ]
    )
    scores = np.array([0.5, 0.9, 0.2, 0.1, 0.3])
    keep = suppress_duplicates(pre, post, loc, scores, radius_nm=400.0)
    np.testing.assert_array_equal(keep, [False, True, True, True, True])


def test_suppression_is_greedy_not_transitive():
    # a (best) suppresses b at 300 nm; c is 600 nm from a and only near b,
    # which is already suppressed, so c stays.
    loc = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 300.0], [0.0, 0.0, 600.0]])
    keep = suppress_duplicates([1, 1, 1], [2, 2, 2], loc, [0.9, 0.8, 0.7], radius_nm=400.0)
    np.testing.assert_array_equal(keep, [True, False, True])


def test_ties_keep_the_lower_index_and_empty_input():
    loc = np.zeros((2, 3))
    np.testing.assert_array_equal(
        suppress_duplicates([1, 1], [2, 2], loc, [0.5, 0.5]), [True, False]
    )
    assert suppress_duplicates([], [], np.zeros((0, 3)), []).shape == (0,)


def test_length_mismatch_is_an_error():
    with pytest.raises(DataError, match="expected one length"):
        suppress_duplicates([1], [2, 3], np.zeros((1, 3)), [1.0])
