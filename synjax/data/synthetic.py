"""Synthetic volumes with known ground truth: EM with synapses, fluorescence puncta.

`make_em_volume` draws an anisotropic ssTEM-like volume (default 40 x 4 x 4 nm,
z-y-x) of touching neurons with dark membranes, textured cytoplasm,
mitochondria, and dyadic and polyadic synapses. Each synapse shows the cues a
partner detector needs to tell direction from the image alone: a dark cleft on
the interface, a cloud of dark vesicles on the presynaptic side only, and a dark
postsynaptic density (PSD) band on the postsynaptic side(s) only.

Ground truth comes as a `CremiVolume` exactly as a CREMI file would hold it:
dense `neuron_ids` (every voxel labelled 1..N, membranes included),
`clefts` (ids 1..n, background `CREMI_BACKGROUND`), `annotations` (one
presynaptic site per synapse, one postsynaptic site per post neuron, 50-150 nm
from the cleft, locations in nm in the world frame), and
`labels["mitochondria"]` (instances, 0 = none). See `synthetic_em` for the
precise cleft definition.

All randomness comes from `np.random.default_rng(seed)`: equal arguments give
identical arrays.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import edt
import numpy as np
import scipy.ndimage
from scipy.spatial import cKDTree

from synjax.data import synthetic_em as em
from synjax.data.synthetic_em import EMSyntheticSettings
from synjax.data.synthetic_fluorescence import (
    FluorescenceSyntheticSettings,
    make_fluorescence_volume,
)
from synjax.errors import ConfigError
from synjax.geometry import voxel_size
from synjax.io.cremi_volume import (
    CREMI_BACKGROUND,
    POSTSYNAPTIC_SITE,
    PRESYNAPTIC_SITE,
    Annotations,
    CremiVolume,
)

__all__ = [
    "EMSyntheticSettings",
    "FluorescenceSyntheticSettings",
    "make_em_volume",
    "make_fluorescence_volume",
    "save_em_volume",
]

_log = logging.getLogger(__name__)

# Vesicle centres sit at least this many vesicle radii from the cleft, so that
# vesicles do not merge with the dark cleft band.
_VESICLE_CLEARANCE_RADII = 1.5
# Mitochondria keep this far from synapse centres so they never hide the cues.
_MITO_SYNAPSE_CLEARANCE_NM = 300.0
# Annotation sites prefer voxels this deep inside their neuron.
_SITE_DEPTH_CAP_NM = 40.0
_MITO_RIM_Q = 0.8
_MITO_TRIES = 50


def _settings_from(settings: EMSyntheticSettings | None, overrides: dict) -> EMSyntheticSettings:
    settings = settings or EMSyntheticSettings()
    known = {f.name for f in dataclasses.fields(EMSyntheticSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(
            f"make_em_volume got unknown settings {unknown}; expected fields of EMSyntheticSettings"
        )
    return dataclasses.replace(settings, **overrides)


def _check_geometry(shape: Sequence[int], resolution: Sequence[float]) -> None:
    if len(shape) != 3 or min(shape) < 2:
        raise ConfigError(f"shape {tuple(shape)}: expected 3 sizes (z, y, x), each >= 2")
    voxel_size(resolution)


def _texture(rng, labels, resolution, s: EMSyntheticSettings) -> np.ndarray:
    """[z, y, x] float32 cytoplasm: per-neuron brightness plus smooth texture."""
    offsets = rng.normal(0.0, s.neuron_intensity_jitter, size=int(labels.max()) + 1)
    texture = em.smooth_noise(rng, labels.shape, resolution, s.texture_scale_nm)
    return (s.cytoplasm_intensity + offsets[labels] + s.texture_amplitude * texture).astype(
        np.float32
    )


def _membranes(labels: np.ndarray, resolution: np.ndarray, s: EMSyntheticSettings) -> np.ndarray:
    """[z, y, x] float32 in [0, 1]: membrane darkness from in-plane boundary distance."""
    # A huge z spacing makes the multi-label EDT two-dimensional per section:
    # sections show the membranes that cross them.
    flat_z = (float(np.prod(labels.shape) * resolution.max()), *resolution[1:])
    dist = edt.edt(labels, anisotropy=flat_z, black_border=False)
    # Voxels touching another label sit at one voxel; measure from there.
    excess = np.maximum(dist - resolution[1:].min(), 0.0) / (s.membrane_thickness_nm / 2.0)
    return np.exp(-0.5 * excess**2).astype(np.float32)


def _add_mitochondria(rng, image, labels, resolution, centres_nm, s: EMSyntheticSettings):
    """Draws mitochondria into `image` in place; returns [z, y, x] uint64 instances."""
    mito = np.zeros(labels.shape, np.uint64)
    depth = edt.edt(labels, anisotropy=tuple(resolution), black_border=True)
    room = np.flatnonzero(depth.ravel() >= s.mitochondrion_radius_nm[1] + resolution[1:].max())
    placed = 0
    for _ in range(_MITO_TRIES * max(s.n_mitochondria, 1)):
        if placed == s.n_mitochondria or room.size == 0:
            break
        centre = np.array(np.unravel_index(room[rng.integers(room.size)], labels.shape))
        axes = np.array(
            [
                rng.uniform(*s.mitochondrion_length_nm),
                rng.uniform(*s.mitochondrion_radius_nm),
                rng.uniform(*s.mitochondrion_radius_nm),
            ]
        )
        angle = rng.uniform(0.0, np.pi)
        if (
            centres_nm.size
            and np.min(np.linalg.norm(centres_nm - centre * resolution, axis=1))
            < _MITO_SYNAPSE_CLEARANCE_NM
        ):
            continue
        box = em.local_box(centre, axes.max(), resolution, labels.shape)
        lo = np.array([b.start for b in box])
        q = em.ellipsoid_mask(
            tuple(b.stop - b.start for b in box), centre - lo, axes, angle, resolution
        )
        inside = (q < 1.0) & (labels[box] == labels[tuple(centre)])
        if (mito[box][inside] != 0).any() or not inside.any():
            continue
        placed += 1
        mito[box][inside] = placed
        value = np.where(q < _MITO_RIM_Q, s.mitochondrion_intensity, s.mitochondrion_rim_intensity)
        image[box][inside] = value[inside] + (image[box][inside] - s.cytoplasm_intensity)
    return mito


def _vesicle_darkness(rng, region, cloud, resolution, s: EMSyntheticSettings) -> np.ndarray:
    """[z, y, x] vesicle darkness in [0, 1] over a box.

    Args:
      region: [z, y, x] bool, where vesicle centres may go.
      cloud: [z, y, x] bool, where vesicles are drawn (the pre neuron near the cleft).
    """
    out = np.zeros(region.shape, np.float32)
    radius = s.vesicle_diameter_nm / 2.0
    volume = region.sum() * np.prod(resolution)
    n = int(s.vesicle_fill_fraction * volume / (4.0 / 3.0 * np.pi * radius**3))
    where = np.flatnonzero(region)
    if n == 0 or where.size == 0:
        return out
    centres = np.stack(
        np.unravel_index(rng.choice(where, size=min(n, where.size)), region.shape), 1
    )
    # In-plane jitter only: a vesicle stays centred in its section and shows there.
    jitter = rng.uniform(-0.5, 0.5, size=centres.shape) * resolution * np.array([0.0, 1.0, 1.0])
    centres_nm = centres * resolution + jitter
    # Thin overlapping pairs (drop the later one) so vesicles read as separate dots.
    pairs = cKDTree(centres_nm).query_pairs(1.6 * radius, output_type="ndarray")
    keep = np.ones(len(centres_nm), bool)
    keep[pairs.max(axis=1)] = False
    cloud_idx = np.stack(np.nonzero(cloud), axis=1)
    dist, _ = cKDTree(centres_nm[keep]).query(cloud_idx * resolution, k=1)
    # Disk of the vesicle radius with a one-voxel soft edge.
    out[cloud] = np.clip((radius - dist) / resolution[1:].min() + 0.5, 0.0, 1.0)
    return out


def _synapse_cues(rng, image, labels, resolution, synapse: em.Synapse, s: EMSyntheticSettings):
    """Draws one synapse's cleft, PSDs and vesicles; returns its site voxels.

    Returns:
      [1 + n_posts, 3] voxel indices (pre site first, then one per post in
      `synapse.posts` order), or None where a site does not fit (the synapse
      is then dropped and nothing is drawn).
    """
    reach = max(s.site_distance_nm[1], s.vesicle_cloud_depth_nm + s.vesicle_diameter_nm)
    cleft_voxels = np.stack(np.unravel_index(synapse.cleft_index, labels.shape), axis=1)
    box = em.box_around(cleft_voxels, reach, resolution, labels.shape)
    lo = np.array([b.start for b in box])
    lab = labels[box]
    cleft_zyx = cleft_voxels - lo
    own = labels.ravel()[synapse.cleft_index]

    def cleft_part(keep: np.ndarray) -> np.ndarray:
        mask = np.zeros(lab.shape, bool)
        mask[tuple(cleft_zyx[keep].T)] = True
        return mask

    # Multi-label EDT: each voxel's distance to the boundary of its own neuron.
    depth = edt.edt(lab, anisotropy=tuple(resolution), black_border=False)
    dist_all = em.distance_to(cleft_part(np.ones(len(own), bool)), resolution, reach)
    pre_mask = lab == synapse.pre
    site = em.pick_site(pre_mask, dist_all, depth, s.site_distance_nm, _SITE_DEPTH_CAP_NM)
    if site is None:
        return None
    sites, psd = [site], np.zeros(lab.shape, np.float32)
    for post in synapse.posts:
        # The post's share of the cleft: its own interface voxels and the pre
        # voxels facing it.
        part = cleft_part((own == post) | (synapse.cleft_toward == post))
        dist = em.distance_to(part, resolution, s.site_distance_nm[1])
        site = em.pick_site(lab == post, dist, depth, s.site_distance_nm, _SITE_DEPTH_CAP_NM)
        if site is None:
            return None
        sites.append(site)
        band = np.clip((s.psd_thickness_nm - dist) / (0.25 * s.psd_thickness_nm), 0.0, 1.0)
        psd = np.maximum(psd, np.where(lab == post, band, 0.0))

    partners = pre_mask | np.isin(lab, synapse.posts)
    cleft = np.where(partners, np.exp(-0.5 * (dist_all / s.cleft_halfwidth_nm) ** 2), 0.0)
    radius = s.vesicle_diameter_nm / 2.0
    region = (
        pre_mask
        & (dist_all >= _VESICLE_CLEARANCE_RADII * radius)
        & (dist_all <= s.vesicle_cloud_depth_nm)
        & (depth >= radius)
    )
    vesicles = _vesicle_darkness(rng, region, pre_mask & (dist_all <= reach), resolution, s)
    image[box] *= (
        (1.0 - s.cleft_contrast * cleft)
        * (1.0 - s.psd_contrast * psd)
        * (1.0 - s.vesicle_contrast * vesicles)
    ).astype(np.float32)
    return np.stack(sites) + lo


def make_em_volume(
    shape: Sequence[int] = (32, 256, 256),
    resolution: Sequence[float] = (40.0, 4.0, 4.0),
    seed: int = 0,
    n_synapses: int | None = None,
    polyadic_fraction: float | None = None,
    offset: Sequence[float] = (0.0, 0.0, 0.0),
    settings: EMSyntheticSettings | None = None,
    **overrides,
) -> CremiVolume:
    """A synthetic anisotropic EM volume with neurons, mitochondria and synapses.

    Args:
      shape: volume size in voxels, z-y-x.
      resolution: voxel size in nm, z-y-x.
      seed: seed of `np.random.default_rng`; equal arguments give equal volumes.
      n_synapses: synapses to place (default `settings.n_synapses`); fewer are
        placed, with a log line, where they do not fit.
      polyadic_fraction: share of polyadic synapses (default from settings).
      offset: world position of voxel (0, 0, 0) in nm; annotation locations
        are `voxel * resolution + offset`.
      settings: base look; `overrides` replace its fields by name.

    Returns:
      `CremiVolume` with raw [z, y, x] uint8, neuron_ids [z, y, x] uint64 (1..N,
      every voxel), clefts [z, y, x] uint64 (1..n, `CREMI_BACKGROUND` elsewhere),
      annotations, and labels["mitochondria"] [z, y, x] uint64 (0 = none).

    Raises:
      ConfigError: bad shape, resolution, fraction or unknown setting name.
    """
    if n_synapses is not None:
        overrides["n_synapses"] = n_synapses
    if polyadic_fraction is not None:
        overrides["polyadic_fraction"] = polyadic_fraction
    s = _settings_from(settings, overrides)
    _check_geometry(shape, resolution)
    if not 0.0 <= s.polyadic_fraction <= 1.0 or s.n_synapses < 0:
        raise ConfigError(
            f"n_synapses={s.n_synapses}, polyadic_fraction={s.polyadic_fraction}: expected "
            "n_synapses >= 0 and a fraction in [0, 1]"
        )
    shape = tuple(int(n) for n in shape)
    res = np.asarray(resolution, np.float64)
    rng = np.random.default_rng(seed)

    labels = em.tessellate_neurons(
        rng,
        shape,
        res,
        s.neuron_diameter_nm,
        s.neuron_elongation_z,
        s.boundary_warp_nm,
        s.boundary_warp_scale_nm,
    )
    n_polyadic = round(s.n_synapses * s.polyadic_fraction)
    synapses = em.place_synapses(
        rng,
        labels,
        res,
        s.n_synapses - n_polyadic,
        n_polyadic,
        cleft_diameter_nm=s.cleft_diameter_nm,
        max_posts=s.max_posts,
        min_contact_voxels=s.min_contact_voxels,
        gap_nm=s.synapse_gap_nm,
        border_nm=s.synapse_border_nm,
        max_tries_per_synapse=s.max_tries_per_synapse,
    )
    image = _texture(rng, labels, res, s)
    centres_nm = np.array([syn.center * res for syn in synapses]).reshape(-1, 3)
    mito = _add_mitochondria(rng, image, labels, res, centres_nm, s)
    image *= 1.0 - s.membrane_contrast * _membranes(labels, res, s)

    clefts = np.full(shape, CREMI_BACKGROUND, np.uint64)
    ids, locations, types, partners = [], [], [], []
    n_placed = 0
    for synapse in synapses:
        sites = _synapse_cues(rng, image, labels, res, synapse, s)
        if sites is None:
            continue
        n_placed += 1
        clefts.ravel()[synapse.cleft_index] = n_placed
        first = len(ids) + 1
        ids.extend(range(first, first + len(sites)))
        locations.extend(sites * res + np.asarray(offset, np.float64))
        types.extend([PRESYNAPTIC_SITE] + [POSTSYNAPTIC_SITE] * (len(sites) - 1))
        partners.extend((first, first + k) for k in range(1, len(sites)))
    if n_placed < s.n_synapses:
        _log.info("placed %d of %d synthetic synapses (no room for more)", n_placed, s.n_synapses)

    sigma = np.array([0.0, s.blur_nm / res[1], s.blur_nm / res[2]])
    image = scipy.ndimage.gaussian_filter(image, sigma)
    image += s.noise_std * rng.standard_normal(shape, dtype=np.float32)
    raw = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    annotations = Annotations(
        ids=np.asarray(ids, np.uint64),
        locations=np.asarray(locations, np.float64).reshape(-1, 3),
        types=np.asarray(types, dtype=object),
        partners=np.asarray(partners, np.uint64).reshape(-1, 2),
    )
    return CremiVolume(
        raw=raw,
        resolution=tuple(float(r) for r in res),
        offset=tuple(float(o) for o in offset),
        neuron_ids=labels,
        clefts=clefts,
        annotations=annotations,
        labels={"mitochondria": mito},
    )


def save_em_volume(path, volume: CremiVolume) -> None:
    """Writes a synthetic volume as a CREMI-layout HDF5 file (`synjax.io.cremi`)."""
    # Imported here so that generating volumes never needs the IO stack.
    from synjax.io.cremi import write_cremi

    write_cremi(path, volume)
