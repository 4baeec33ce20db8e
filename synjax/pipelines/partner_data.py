"""Volumes, ground truth and training targets of the partner pipeline.

One `PartnerVolume` per volume (train or test), whether it was generated
(`config.data.source == "synthetic"`) or read from a CREMI-layout file.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from absl import logging

from synjax import configlib
from synjax.data import synthetic
from synjax.errors import ConfigError
from synjax.evaluation.partners import PartnerPairs
from synjax.io import cleft_instances, partner_table, read_cremi
from synjax.io.checks import require_finite
from synjax.io.cremi_volume import CremiVolume
from synjax.targets import signed_proximity

SPLITS = ("train", "test")
CREMI_PUBLISHED_AT = "https://cremi.org/data/ (padded or unpadded samples A, B, C)"


@dataclasses.dataclass
class PartnerVolume:
    """A volume with what the partner pipeline needs of its ground truth.

    Attributes:
      name: "train" or "test".
      raw: [z, y, x] uint8 EM intensities.
      neuron_ids: [z, y, x] uint64 ground-truth neurons.
      clefts: [z, y, x] uint64 cleft instances, 0 = background.
      resolution: voxel size in nm, z-y-x.
      pairs: [m, 3] int64 (cleft id, pre segment, post segment), one row per
        ground-truth partner.
      truth: the ground-truth partner pairs, locations in nm from voxel 0.
      n_polyadic: synapses with more than one postsynaptic partner.
    """

    name: str
    raw: np.ndarray
    neuron_ids: np.ndarray
    clefts: np.ndarray
    resolution: tuple[float, float, float]
    pairs: np.ndarray
    truth: PartnerPairs
    n_polyadic: int


def _from_cremi(name: str, volume: CremiVolume) -> PartnerVolume:
    summary = synthetic.synapse_summary(volume)
    table = partner_table(volume)
    # Pipeline coordinates start at voxel 0; CREMI locations are world nm.
    offset = np.asarray(volume.offset, np.float64)
    truth = PartnerPairs(
        table["pre_segment"],
        table["post_segment"],
        np.asarray(table["pre_location"]) - offset,
        np.asarray(table["post_location"]) - offset,
    )
    return PartnerVolume(
        name=name,
        raw=volume.raw,
        neuron_ids=volume.neuron_ids,
        clefts=cleft_instances(volume.clefts),
        resolution=tuple(float(r) for r in volume.resolution),
        pairs=synthetic.synapse_pairs(summary),
        truth=truth,
        n_polyadic=sum(s.polyadic for s in summary),
    )


def load_volume(config, name: str) -> PartnerVolume:
    """Generates or reads the `name` ("train" or "test") volume of `config.data`."""
    data = config.data
    if data.source == "synthetic":
        seed = data.train_seed if name == "train" else data.test_seed
        logging.info("Generating synthetic %s volume %s (seed %d)", name, data.shape, seed)
        volume = synthetic.make_em_volume(
            shape=tuple(data.shape),
            resolution=tuple(data.resolution),
            seed=seed,
            n_synapses=data.n_synapses,
            polyadic_fraction=data.polyadic_fraction,
        )
    elif data.source == "cremi":
        key = f"config.data.{name}_path"
        path = configlib.require_file(data[f"{name}_path"], key, "CREMI sample", CREMI_PUBLISHED_AT)
        volume = read_cremi(path)
        require_finite(volume.raw, f"{path}:/volumes/raw")
    else:
        raise ConfigError(f"config.data.source={data.source!r}; expected 'synthetic' or 'cremi'")
    result = _from_cremi(name, volume)
    logging.info(
        "%s volume: %s voxels, %d partner pairs, %d polyadic synapses",
        name,
        result.raw.shape,
        len(result.truth),
        result.n_polyadic,
    )
    return result


def proximity_targets(volume: PartnerVolume, config) -> dict[str, np.ndarray]:
    """Training arrays: raw, signed-proximity target, loss weights, synaptic mask.

    Returns:
      {"raw": uint8, "target": float32, "weight": float32, "synaptic": bool},
      each [z, y, x].
    """
    t = config.targets
    pre, post = signed_proximity.partner_masks(
        volume.clefts, volume.neuron_ids, volume.pairs, volume.resolution, t.radius_nm
    )
    target = signed_proximity.signed_proximity_target(
        pre, post, volume.resolution, alpha=t.alpha, sigma=t.sigma, contact=volume.clefts > 0
    )
    return {
        "raw": volume.raw,
        "target": target,
        "weight": signed_proximity.balanced_weights(target),
        "synaptic": pre | post,
    }
