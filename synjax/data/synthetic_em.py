"""Geometry of synthetic EM volumes: neurons, mitochondria and synapses.

Neurons are the cells of a Voronoi tessellation whose metric is stretched along
z (neurites run across sections) and whose coordinates are warped by a smooth
random displacement, so that boundaries are curved rather than flat planes.
Synapses are patches of the in-plane interface between a presynaptic neuron and
one (dyadic) or several (polyadic) postsynaptic neighbours.

Cleft definition (what the tests check): a cleft voxel belongs to the pre
neuron or to one of the synapse's post neurons, and has an in-plane face
neighbour (y or x axis) in the other one: pre voxels touch a post neuron, post
voxels touch the pre neuron. Every cleft voxel is therefore 6-adjacent to both
the pre neuron and one of its post neurons (itself included).

Everything here is pure numpy/scipy on the host and driven by one
`np.random.Generator`, so equal seeds give equal volumes.
"""

from __future__ import annotations

import dataclasses

import cc3d
import edt
import fastremap
import numpy as np
from scipy.spatial import cKDTree

from synjax.geometry import Box

# Axes of the in-plane face neighbours (y, x) on which clefts are drawn; z faces
# between sections are excluded so that clefts are lines in every section, as
# annotators draw them in anisotropic ssTEM.
IN_PLANE_AXES = (1, 2)


@dataclasses.dataclass(frozen=True)
class EMSyntheticSettings:
    """How a synthetic EM volume looks. Lengths in nm, intensities in [0, 1].

    Attributes:
      neuron_diameter_nm: mean in-plane neuron width (seed spacing); jitter
        makes neurons ~0.5x-1.5x this.
      neuron_elongation_z: neurons are this many times longer along z.
      boundary_warp_nm: amplitude of the smooth warp that curves boundaries.
      boundary_warp_scale_nm: correlation length of that warp.
      membrane_thickness_nm: width (2 sigma) of the dark membrane profile.
      membrane_contrast: fractional darkening on a membrane.
      cytoplasm_intensity: mean cytoplasm brightness.
      neuron_intensity_jitter: std of each neuron's brightness offset.
      texture_amplitude: std of the smooth cytoplasm texture.
      texture_scale_nm: correlation length of that texture.
      n_mitochondria: mitochondria to place (fewer if they do not fit).
      mitochondrion_radius_nm: (min, max) in-plane semi-axes.
      mitochondrion_length_nm: (min, max) semi-axis along z.
      mitochondrion_intensity: brightness of the matrix.
      mitochondrion_rim_intensity: brightness of the darker outer rim.
      n_synapses: synapses to place (fewer if they do not fit, with a log line).
      polyadic_fraction: share of synapses with 2-4 postsynaptic partners.
      max_posts: most postsynaptic partners of one polyadic synapse.
      cleft_diameter_nm: (min, max) diameter of the contact patch.
      min_contact_voxels: fewest in-plane interface voxels per partner.
      synapse_gap_nm: least distance between two clefts; larger than
        `vesicle_cloud_depth_nm`, so vesicles never face another's cleft.
      synapse_border_nm: least in-plane distance of a synapse centre from the
        volume border.
      cleft_halfwidth_nm: sigma of the dark cleft profile around the interface.
      cleft_contrast: fractional darkening at the cleft.
      psd_thickness_nm: depth of the postsynaptic density into each post.
      psd_contrast: fractional darkening of the PSD.
      vesicle_diameter_nm: diameter of a synaptic vesicle.
      vesicle_cloud_depth_nm: vesicles fill the pre neuron up to this far from
        the cleft.
      vesicle_fill_fraction: share of the cloud's volume the vesicles fill.
      vesicle_contrast: fractional darkening at a vesicle.
      site_distance_nm: (min, max) distance of annotation sites from the cleft.
      blur_nm: in-plane sigma of the Gaussian blur (sections are not blurred
        across z).
      noise_std: std of the additive Gaussian noise.
      max_tries_per_synapse: random centres tried before giving up a synapse.
    """

    neuron_diameter_nm: float = 400.0
    neuron_elongation_z: float = 2.0
    boundary_warp_nm: float = 100.0
    boundary_warp_scale_nm: float = 400.0
    membrane_thickness_nm: float = 8.0
    membrane_contrast: float = 0.6
    cytoplasm_intensity: float = 0.75
    neuron_intensity_jitter: float = 0.04
    texture_amplitude: float = 0.04
    texture_scale_nm: float = 40.0
    n_mitochondria: int = 6
    mitochondrion_radius_nm: tuple[float, float] = (50.0, 90.0)
    mitochondrion_length_nm: tuple[float, float] = (80.0, 200.0)
    mitochondrion_intensity: float = 0.5
    mitochondrion_rim_intensity: float = 0.3
    n_synapses: int = 10
    polyadic_fraction: float = 0.5
    max_posts: int = 4
    cleft_diameter_nm: tuple[float, float] = (200.0, 360.0)
    min_contact_voxels: int = 20
    synapse_gap_nm: float = 200.0
    synapse_border_nm: float = 60.0
    cleft_halfwidth_nm: float = 8.0
    cleft_contrast: float = 0.85
    psd_thickness_nm: float = 32.0
    psd_contrast: float = 0.55
    vesicle_diameter_nm: float = 40.0
    vesicle_cloud_depth_nm: float = 160.0
    vesicle_fill_fraction: float = 0.45
    vesicle_contrast: float = 0.55
    site_distance_nm: tuple[float, float] = (50.0, 150.0)
    blur_nm: float = 4.0
    noise_std: float = 0.06
    max_tries_per_synapse: int = 300


@dataclasses.dataclass(frozen=True)
class Synapse:
    """One synthetic synapse.

    Attributes:
      cleft_id: id of the synapse in the `clefts` volume.
      pre: presynaptic neuron id.
      posts: postsynaptic neuron ids (1 for dyadic, 2-4 for polyadic).
      cleft_index: [k] flat voxel indices of the cleft.
      cleft_toward: [k] the neuron across the interface from each cleft voxel
        (a post id for pre-side voxels, `pre` for post-side voxels).
      center: [3] voxel index (z, y, x) the synapse was grown from.
    """

    cleft_id: int
    pre: int
    posts: tuple[int, ...]
    cleft_index: np.ndarray
    cleft_toward: np.ndarray
    center: np.ndarray

    @property
    def polyadic(self) -> bool:
        return len(self.posts) > 1


def smooth_noise(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    resolution: np.ndarray,
    scale_nm: float,
) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field, correlation length ~ `scale_nm`.

    White noise on a coarse grid (one node per `scale_nm`, two nodes of margin)
    is interpolated with separable Gaussian weights of width `scale_nm`: three
    small matrix products, far cheaper than filtering a full-size volume.

    Returns:
      [*shape] float32 field.
    """
    weights = []
    for n, r in zip(shape, resolution, strict=True):
        nodes = (np.arange(int(np.ceil(n * r / scale_nm)) + 5) - 2.0) * scale_nm
        x = np.arange(n) * r
        w = np.exp(-0.5 * ((x[:, None] - nodes[None, :]) / scale_nm) ** 2)
        # Unit-norm rows make every output voxel exactly unit variance.
        weights.append(w / np.linalg.norm(w, axis=1, keepdims=True))
    field = rng.standard_normal(tuple(w.shape[1] for w in weights))
    for axis, w in enumerate(weights):
        field = np.moveaxis(np.tensordot(w, field, axes=([1], [axis])), 0, axis)
    return field.astype(np.float32)


def voxel_grid_nm(shape: tuple[int, int, int], resolution: np.ndarray) -> list[np.ndarray]:
    """Sparse broadcastable z, y, x coordinate arrays of voxel centres, in nm."""
    return np.meshgrid(
        *[np.arange(n) * r for n, r in zip(shape, resolution, strict=True)],
        indexing="ij",
        sparse=True,
    )


def tessellate_neurons(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    resolution: np.ndarray,
    diameter_nm: float,
    elongation_z: float,
    warp_nm: float,
    warp_scale_nm: float,
) -> np.ndarray:
    """Dense neuron labels from a warped, z-stretched Voronoi tessellation.

    Seeds sit on a jittered grid (spacing `diameter_nm` in-plane,
    `diameter_nm * elongation_z` in z) that extends one spacing past the volume,
    so border neurons are cut, not squashed. Each connected piece gets its own id.

    Returns:
      [z, y, x] uint64 labels 1..N, every voxel labelled, each id 6-connected.
    """
    spacing = np.array([diameter_nm * elongation_z, diameter_nm, diameter_nm])
    extent = np.asarray(shape) * resolution
    axes = [np.arange(-s, e + 2 * s, s) for e, s in zip(extent, spacing, strict=True)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    # Jitter of +-0.4 spacing gives neurons from ~0.5x to ~1.5x the mean size.
    seeds = grid + rng.uniform(-0.4, 0.4, size=grid.shape) * spacing
    metric = np.array([1.0 / elongation_z, 1.0, 1.0])

    zz, yy, xx = voxel_grid_nm(shape, resolution)
    points = np.empty((*shape, 3), np.float64)
    points[..., 0] = zz
    points[..., 1] = yy
    points[..., 2] = xx
    for axis in range(3):
        points[..., axis] += warp_nm * smooth_noise(rng, shape, resolution, warp_scale_nm)
    _, nearest = cKDTree(seeds * metric).query((points * metric).reshape(-1, 3), k=1)
    labels = nearest.reshape(shape).astype(np.uint32) + 1
    # Discretisation can cut thin slivers off a cell; label pieces separately so
    # every neuron id is one connected body.
    labels = cc3d.connected_components(labels, connectivity=6)
    labels, _ = fastremap.renumber(labels, start=1)
    return labels.astype(np.uint64)


def in_plane_interfaces(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxels that have an in-plane face neighbour with a different label.

    Args:
      labels: [z, y, x] integer labels.

    Returns:
      (index, own, other): [r] flat voxel indices, their labels, and the label
      across the face; one row per (voxel, neighbour label) pair, unique.
    """
    flat_index = np.arange(labels.size, dtype=np.int64).reshape(labels.shape)
    rows = []
    for axis in IN_PLANE_AXES:
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(None, -1)
        hi[axis] = slice(1, None)
        a, b = labels[tuple(lo)], labels[tuple(hi)]
        differ = a != b
        ia, ib = flat_index[tuple(lo)][differ], flat_index[tuple(hi)][differ]
        la, lb = a[differ], b[differ]
        rows.append(np.stack([ia, la.astype(np.int64), lb.astype(np.int64)], axis=1))
        rows.append(np.stack([ib, lb.astype(np.int64), la.astype(np.int64)], axis=1))
    table = np.unique(np.concatenate(rows, axis=0), axis=0)
    return table[:, 0], table[:, 1], table[:, 2]


def place_synapses(
    rng: np.random.Generator,
    labels: np.ndarray,
    resolution: np.ndarray,
    n_dyadic: int,
    n_polyadic: int,
    *,
    cleft_diameter_nm: tuple[float, float],
    max_posts: int,
    min_contact_voxels: int,
    gap_nm: float,
    border_nm: float,
    max_tries_per_synapse: int,
) -> list[Synapse]:
    """Grows synapses on neuron interfaces; polyadic ones first (harder to fit).

    A try picks a random interface voxel as centre, the neuron it lies in as
    pre, and collects the pre/neighbour interface within a random cleft radius.
    Dyadic synapses keep the one neighbour across the centre; polyadic ones
    need at least two neighbours with `min_contact_voxels` of contact each.
    Clefts keep `gap_nm` from each other, so one synapse's vesicles never face
    another's cleft.

    Returns:
      Synapses with cleft ids 1..n in placement order (fewer if they do not fit).
    """
    index, own, other = in_plane_interfaces(labels)
    coords = np.stack(np.unravel_index(index, labels.shape), axis=1)
    coords_nm = coords * resolution
    extent_nm = (np.asarray(labels.shape) - 1) * resolution
    # Centres keep clear of the in-plane border, and of the first/last section.
    margin = np.array([resolution[0], border_nm, border_nm])
    inside = np.all((coords_nm >= margin) & (coords_nm <= extent_nm - margin), axis=1)
    centre_rows = np.flatnonzero(inside)
    tree = cKDTree(coords_nm)
    synapses: list[Synapse] = []
    placed_nm = np.zeros((0, 3))
    placed_tree = None

    for want_posts_min in [2] * n_polyadic + [1] * n_dyadic:
        if centre_rows.size == 0:
            break
        for _ in range(max_tries_per_synapse):
            row = centre_rows[rng.integers(centre_rows.size)]
            if placed_tree is not None and placed_tree.query(coords_nm[row])[0] < gap_nm:
                continue
            radius = rng.uniform(*cleft_diameter_nm) / 2.0
            near = np.asarray(tree.query_ball_point(coords_nm[row], radius), dtype=np.int64)
            pre = own[row]
            pre_side = near[own[near] == pre]
            if want_posts_min == 1:
                posts = np.array([other[row]])
            else:
                candidates, counts = np.unique(other[pre_side], return_counts=True)
                order = np.argsort(-counts, kind="stable")
                posts = candidates[order][counts[order] >= min_contact_voxels][:max_posts]
            if posts.size < want_posts_min:
                continue
            rows = np.concatenate(
                [pre_side[np.isin(other[pre_side], posts)], near[np.isin(own[near], posts)]]
            )
            rows = rows[(own[rows] == pre) | (other[rows] == pre)]
            contact = np.array([np.sum(other[rows] == p) for p in posts])
            if contact.min() < min_contact_voxels:
                continue
            if placed_tree is not None and placed_tree.query(coords_nm[rows])[0].min() < gap_nm:
                continue
            synapses.append(
                Synapse(
                    cleft_id=len(synapses) + 1,
                    pre=int(pre),
                    posts=tuple(int(p) for p in posts),
                    cleft_index=index[rows],
                    cleft_toward=other[rows],
                    center=coords[row],
                )
            )
            placed_nm = np.concatenate([placed_nm, coords_nm[rows]], axis=0)
            placed_tree = cKDTree(placed_nm)
            break
    return synapses


def box_around(
    voxels: np.ndarray, reach_nm: float, resolution: np.ndarray, shape
) -> tuple[slice, ...]:
    """Slices of the bounding box of `voxels` ([k, 3] indices) grown by `reach_nm`, clipped."""
    grow = np.ceil(reach_nm / resolution).astype(int)
    return Box.bounding(voxels).pad(grow).intersect(Box.from_shape(shape)).slices()


def local_box(center: np.ndarray, half_nm: float, resolution: np.ndarray, shape) -> tuple:
    """Slices of the box of half-size `half_nm` around voxel `center`, clipped."""
    return box_around(center[None, :], half_nm, resolution, shape)


def distance_to(mask: np.ndarray, resolution: np.ndarray, reach_nm: float) -> np.ndarray:
    """[z, y, x] distance in nm to the nearest voxel of `mask`, within `reach_nm`.

    The transform runs on the bounding box of `mask` grown by `reach_nm`, the
    only part callers look at; further voxels get inf.
    """
    out = np.full(mask.shape, np.inf, np.float32)
    if not mask.any():
        return out
    crop = box_around(np.stack(np.nonzero(mask), axis=1), reach_nm, resolution, mask.shape)
    out[crop] = edt.edt(~mask[crop], anisotropy=tuple(resolution), black_border=False)
    return out


def pick_site(
    in_neuron: np.ndarray,
    dist_nm: np.ndarray,
    depth_nm: np.ndarray,
    site_range_nm: tuple[float, float],
    depth_cap_nm: float,
) -> np.ndarray | None:
    """Voxel (box index) for an annotation site inside a neuron near its cleft.

    Prefers voxels away from the neuron's membrane (up to `depth_cap_nm`) and
    close to the middle of `site_range_nm` from the cleft.

    Args:
      in_neuron: [z, y, x] bool mask of the neuron in the box.
      dist_nm: [z, y, x] distance to the neuron's part of the cleft.
      depth_nm: [z, y, x] distance to the neuron's boundary.

    Returns:
      [3] box voxel index, or None where no voxel of the neuron is in range.
    """
    lo, hi = site_range_nm
    ok = in_neuron & (dist_nm >= lo) & (dist_nm <= hi)
    if not ok.any():
        return None
    target = 0.5 * (lo + hi)
    score = np.minimum(depth_nm, depth_cap_nm) - 0.25 * np.abs(dist_nm - target)
    score = np.where(ok, score, -np.inf)
    return np.array(np.unravel_index(np.argmax(score), score.shape))


def ellipsoid_mask(
    box_shape: tuple[int, int, int],
    center: np.ndarray,
    semi_axes_nm: np.ndarray,
    angle: float,
    resolution: np.ndarray,
) -> np.ndarray:
    """Normalised ellipsoid radius q (q < 1 inside) on a box, rotated in-plane.

    Args:
      box_shape: [z, y, x] box size.
      center: [3] centre in box voxel coordinates.
      semi_axes_nm: [3] semi-axes (z, along `angle`, across `angle`) in nm.
      angle: in-plane rotation in radians.

    Returns:
      [z, y, x] float32 q.
    """
    zz, yy, xx = voxel_grid_nm(box_shape, resolution)
    dz, dy, dx = (
        zz - center[0] * resolution[0],
        yy - center[1] * resolution[1],
        xx - center[2] * resolution[2],
    )
    u = np.cos(angle) * dy + np.sin(angle) * dx
    v = -np.sin(angle) * dy + np.cos(angle) * dx
    q2 = (dz / semi_axes_nm[0]) ** 2 + (u / semi_axes_nm[1]) ** 2 + (v / semi_axes_nm[2]) ** 2
    return np.sqrt(q2).astype(np.float32)
