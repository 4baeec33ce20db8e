"""Signed-proximity training targets (Parag et al., MICCAI 2018).

The synaptic partner pipeline regresses, for every voxel, a signed proximity
to the nearest synaptic contact: close to +1 inside the presynaptic neuron next
to a cleft, close to -1 inside the postsynaptic neuron(s), decaying to 0 away
from the contact and 0 everywhere else. The sign gives the direction of the
connection, the magnitude its location.

Conversion from annotations (the paper's Fig. 1b) happens in two steps:

1. `partner_masks`: cleft instances + neuron segmentation + partner pairs ->
   boolean pre / post masks (each partner's voxels within `radius_nm` of its
   cleft).
2. `signed_proximity_target`: masks -> float32 target f(d) with d the signed
   distance to the contact, and `balanced_weights` for the loss.

Distance unit. The paper uses alpha = 5 and sigma = 10 (14 for fly TEM) with
d measured in voxels; the authors' released pipeline works on in-plane voxels
of a few nm. Here distances are computed in nm (honouring anisotropic voxel
sizes) and divided by `distance_unit_nm`, by default the finest voxel size
(the in-plane one for ssTEM). With alpha = 5 a voxel next to the contact
(d = 1) gets |f| = tanh(2.5) = 0.99, and with sigma = 10 the field falls to
exp(-1/2) = 0.61 at 10 in-plane voxels (40-100 nm) and to 0.01 at 30, so it
covers the `radius_nm` (~ 100-250 nm) neighbourhood that `partner_masks` marks.
"""

from __future__ import annotations

from collections.abc import Sequence

import edt
import fastremap
import numpy as np
import scipy.ndimage

from synjax.errors import DataError
from synjax.geometry import Box

# Paper values (rat cortex / CREMI); the fly TEM experiments use sigma = 14.
DEFAULT_ALPHA = 5.0
DEFAULT_SIGMA = 10.0

# Columns of the `pairs` array taken by `partner_masks`.
PAIR_CLEFT, PAIR_PRE, PAIR_POST = 0, 1, 2

# Labels of `three_class_target`.
REST_CLASS, PRE_CLASS, POST_CLASS = 0, 1, 2

# |target| at or above this counts as synaptic in `balanced_weights`; matches
# the 0.01 the authors' weighted loss uses to split synaptic from background.
SYNAPTIC_THRESHOLD = 0.01


def signed_proximity(d: np.ndarray, alpha: float = DEFAULT_ALPHA, sigma: float = DEFAULT_SIGMA):
    """The paper's proximity transform of a signed distance.

    f(d) = exp(-d^2 / (2 sigma^2)) * (2 / (1 + exp(-alpha d)) - 1).

    The sigmoid factor is evaluated as tanh(alpha d / 2), which is the same
    function but does not overflow for large |d| (so d = +-inf gives 0).

    Args:
      d: signed distances (any shape), in the unit that alpha and sigma use.
      alpha: steepness of the sign switch at d = 0.
      sigma: width of the Gaussian decay.

    Returns:
      f(d), same shape; odd in d, 0 at d = 0, |f| < 1.
    """
    d = np.asarray(d, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        out = np.exp(-(d**2) / (2.0 * sigma**2)) * np.tanh(alpha * d / 2.0)
    return np.nan_to_num(out, nan=0.0)


def _check_same_shape(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise DataError(
            f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}; expected equal"
        )


def _check_resolution(resolution: Sequence[float], ndim: int) -> np.ndarray:
    res = np.asarray(resolution, dtype=np.float64)
    if res.shape != (ndim,) or np.any(res <= 0):
        raise DataError(f"resolution {tuple(resolution)} must be {ndim} positive voxel sizes in nm")
    return res


def partner_masks(
    clefts: np.ndarray,
    neuron_ids: np.ndarray,
    pairs: np.ndarray,
    resolution: Sequence[float],
    radius_nm: float,
    background: int = 0,
    unlabelled: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Marks each synapse's partner voxels near its cleft (Fig. 1b of the paper).

    For every row (cleft, pre, post) of `pairs`, the voxels of segment `pre`
    within `radius_nm` of that cleft become presynaptic and those of segment
    `post` postsynaptic. Polyadic synapses have one row per postsynaptic
    partner. Work is done in each cleft's bounding box grown by the radius, so
    the cost scales with the synapses, not with the volume times the synapses.
    A voxel claimed by several clefts takes the label of the nearest one.

    Args:
      clefts: [z, y, x] integer cleft instances, `background` outside clefts
        (convert CREMI's 0xFFFFFFFFFFFFFFFF or pass it as `background`).
      neuron_ids: [z, y, x] integer neuron segmentation.
      pairs: [k, 3] integers, columns (cleft id, pre segment id, post segment
        id). Rows whose cleft is absent from `clefts` (e.g. outside a crop) or
        whose pre/post segment is `unlabelled` are ignored.
      resolution: voxel size in nm, z-y-x.
      radius_nm: distance from the cleft (nm) up to which partner voxels are
        marked.
      background: value of `clefts` outside any cleft.
      unlabelled: neuron id meaning "no neuron" in `neuron_ids`.

    Returns:
      (pre_mask, post_mask): [z, y, x] bool each, disjoint.

    Raises:
      DataError: on mismatched shapes, a malformed `pairs` array, bad
        resolution or radius, or a row whose pre and post segment coincide.
    """
    clefts = np.asarray(clefts)
    neuron_ids = np.asarray(neuron_ids)
    _check_same_shape("clefts", clefts, "neuron_ids", neuron_ids)
    res = _check_resolution(resolution, clefts.ndim)
    pairs = np.asarray(pairs)
    if pairs.ndim != 2 or pairs.shape[1] != 3:
        raise DataError(f"pairs has shape {pairs.shape}; expected [k, 3] (cleft, pre, post)")
    if radius_nm <= 0:
        raise DataError(f"radius_nm={radius_nm}; expected a positive distance in nm")
    if np.any(pairs[:, PAIR_PRE] == pairs[:, PAIR_POST]):
        raise DataError("pairs has a row whose pre and post segment are the same id")

    pre_mask = np.zeros(clefts.shape, bool)
    post_mask = np.zeros(clefts.shape, bool)
    keep = (pairs[:, PAIR_PRE] != unlabelled) & (pairs[:, PAIR_POST] != unlabelled)
    pairs = pairs[keep]
    if not len(pairs):
        return pre_mask, post_mask

    # Dense 1..n cleft labels so that find_objects gives every box in one pass.
    dense, remap = fastremap.renumber(clefts, preserve_zero=False, in_place=False)
    background_dense = remap.get(clefts.dtype.type(background))
    boxes = scipy.ndimage.find_objects(dense)
    margin = np.ceil(radius_nm / res).astype(int) + 1

    # Distance to the nearest cleft that claimed each voxel so far.
    best = np.full(clefts.shape, np.inf, np.float32)
    for cleft_id in np.unique(pairs[:, PAIR_CLEFT]):
        label = remap.get(clefts.dtype.type(cleft_id))
        if label is None or label == background_dense:
            continue
        rows = pairs[pairs[:, PAIR_CLEFT] == cleft_id]
        box = (
            Box.from_slices(boxes[label - 1])
            .pad(margin)
            .intersect(Box.from_shape(clefts.shape))
            .slices()
        )
        dist = edt.edt(dense[box] != label, anisotropy=tuple(res), black_border=False)
        near = dist <= radius_nm
        closer = near & (dist < best[box])
        segs = neuron_ids[box]
        is_pre = closer & np.isin(segs, rows[:, PAIR_PRE])
        is_post = closer & np.isin(segs, rows[:, PAIR_POST])
        claimed = is_pre | is_post
        # Views into the full volumes: writing them updates the result in place.
        best[box][claimed] = dist[claimed]
        pre_view, post_view = pre_mask[box], post_mask[box]
        pre_view[claimed] = is_pre[claimed]
        post_view[claimed] = is_post[claimed]
    return pre_mask, post_mask


def signed_contact_distance(
    pre_mask: np.ndarray,
    post_mask: np.ndarray,
    resolution: Sequence[float],
    contact: np.ndarray | None = None,
) -> np.ndarray:
    """Signed distance (nm) to the synaptic contact inside the partner masks.

    Args:
      pre_mask: [z, y, x] bool presynaptic voxels.
      post_mask: [z, y, x] bool postsynaptic voxels.
      resolution: voxel size in nm, z-y-x.
      contact: [z, y, x] bool contact voxels (typically `clefts != background`).
        When None, each side measures its distance to the other side's
        voxels, i.e. the contact is the pre/post interface.

    Returns:
      [z, y, x] float32: +distance on pre voxels, -distance on post voxels,
      0 elsewhere. Distances are Euclidean in nm with anisotropic voxels; a
      side without anything to measure to gets +-inf.
    """
    pre_mask = np.asarray(pre_mask, bool)
    post_mask = np.asarray(post_mask, bool)
    _check_same_shape("pre_mask", pre_mask, "post_mask", post_mask)
    res = tuple(_check_resolution(resolution, pre_mask.ndim))
    if contact is not None:
        contact = np.asarray(contact, bool)
        _check_same_shape("contact", contact, "pre_mask", pre_mask)
        to_pre_side = to_post_side = edt.edt(~contact, anisotropy=res, black_border=False)
    else:
        to_pre_side = edt.edt(~post_mask, anisotropy=res, black_border=False)
        to_post_side = edt.edt(~pre_mask, anisotropy=res, black_border=False)
    d = np.zeros(pre_mask.shape, np.float32)
    d[pre_mask] = to_pre_side[pre_mask]
    d[post_mask] = -to_post_side[post_mask]
    return d


def signed_proximity_target(
    pre_mask: np.ndarray,
    post_mask: np.ndarray,
    resolution: Sequence[float],
    alpha: float = DEFAULT_ALPHA,
    sigma: float = DEFAULT_SIGMA,
    contact: np.ndarray | None = None,
    distance_unit_nm: float | None = None,
) -> np.ndarray:
    """The regression target f(d) of the paper.

    Args:
      pre_mask: [z, y, x] bool presynaptic voxels (from `partner_masks`).
      post_mask: [z, y, x] bool postsynaptic voxels, disjoint from pre_mask.
      resolution: voxel size in nm, z-y-x.
      alpha: steepness of the sign switch, in 1 / distance unit.
      sigma: decay width, in distance units.
      contact: [z, y, x] bool contact voxels (e.g. `clefts != background`); see
        `signed_contact_distance`.
      distance_unit_nm: nm per distance unit; default the finest voxel size,
        so that alpha and sigma are in (in-plane) voxels as in the paper.

    Returns:
      [z, y, x] float32 in (-1, 1): positive on the pre side, negative on the
      post side, 0 at the contact and outside both masks.
    """
    if np.any(np.asarray(pre_mask, bool) & np.asarray(post_mask, bool)):
        raise DataError("pre_mask and post_mask overlap; expected disjoint partner masks")
    if distance_unit_nm is None:
        distance_unit_nm = float(np.min(resolution))
    if distance_unit_nm <= 0 or sigma <= 0:
        raise DataError(f"distance_unit_nm={distance_unit_nm}, sigma={sigma}; expected > 0")
    d = signed_contact_distance(pre_mask, post_mask, resolution, contact) / distance_unit_nm
    return signed_proximity(d, alpha, sigma).astype(np.float32)


def balanced_weights(
    target: np.ndarray,
    threshold: float = SYNAPTIC_THRESHOLD,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Per-voxel loss weights so synaptic and background voxels weigh the same.

    Synaptic voxels (|target| >= threshold) share half of the total weight and
    background voxels the other half; weights average to 1 over the counted
    voxels, so the loss scale does not depend on how many synapses a patch
    holds. A patch with only one kind of voxel gets weight 1 everywhere.

    Args:
      target: [...] float signed-proximity target.
      threshold: |target| from which a voxel counts as synaptic.
      mask: [...] bool voxels to count (e.g. labelled region); others get 0.

    Returns:
      [...] float32 weights.
    """
    target = np.asarray(target)
    counted = np.ones(target.shape, bool) if mask is None else np.asarray(mask, bool)
    _check_same_shape("mask", counted, "target", target)
    synaptic = (np.abs(target) >= threshold) & counted
    background = counted & ~synaptic
    n_total = np.count_nonzero(counted)
    n_syn = np.count_nonzero(synaptic)
    n_bg = n_total - n_syn
    if n_syn == 0 or n_bg == 0:
        return counted.astype(np.float32)
    weights = np.zeros(target.shape, np.float32)
    weights[synaptic] = n_total / (2.0 * n_syn)
    weights[background] = n_total / (2.0 * n_bg)
    return weights


def three_class_target(pre_mask: np.ndarray, post_mask: np.ndarray) -> np.ndarray:
    """The pre / post / rest classification target the paper compares against.

    Args:
      pre_mask: [z, y, x] bool presynaptic voxels.
      post_mask: [z, y, x] bool postsynaptic voxels, disjoint from pre_mask.

    Returns:
      [z, y, x] int32 labels: `REST_CLASS` (0), `PRE_CLASS` (1), `POST_CLASS` (2).
    """
    pre_mask = np.asarray(pre_mask, bool)
    post_mask = np.asarray(post_mask, bool)
    _check_same_shape("pre_mask", pre_mask, "post_mask", post_mask)
    if np.any(pre_mask & post_mask):
        raise DataError("pre_mask and post_mask overlap; expected disjoint partner masks")
    labels = np.full(pre_mask.shape, REST_CLASS, np.int32)
    labels[pre_mask] = PRE_CLASS
    labels[post_mask] = POST_CLASS
    return labels
