"""Volumes, ground truth and training targets of the partner pipeline.

One `PartnerVolume` per volume (train or test), whether it was generated
(`config.data.source == "synthetic"`) or read from a CREMI-layout file.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from absl import logging

from synjax.data import synthetic
from synjax.errors import ConfigError
from synjax.evaluation.partners import NO_CLEFT, PartnerPairs
from synjax.io import cleft_instance_ids, cleft_instances, partner_table, read_cremi
from synjax.io.checks import require_file, require_finite
from synjax.io.cremi import synapse_pairs, synapse_summary
from synjax.io.cremi_volume import CremiVolume
from synjax.targets import signed_proximity
from synjax.targets.signed_proximity import PAIR_CLEFT

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
        ground-truth partner, cleft ids those of `clefts` (the training
        targets' rows).
      truth: the ground-truth partner pairs, locations in nm from voxel 0.
      truth_clefts: [len(truth)] int64 cleft of each `truth` pair in `clefts`
        (the cleft nearest its presynaptic site), `NO_CLEFT` where the volume
        has none.
      n_polyadic: synapses with more than one postsynaptic partner.
    """

    name: str
    raw: np.ndarray
    neuron_ids: np.ndarray
    clefts: np.ndarray
    resolution: tuple[float, float, float]
    pairs: np.ndarray
    truth: PartnerPairs
    truth_clefts: np.ndarray
    n_polyadic: int


def _from_cremi(name: str, volume: CremiVolume) -> PartnerVolume:
    summary = synapse_summary(volume)
    table = partner_table(volume)
    # Pipeline coordinates start at voxel 0; CREMI locations are world nm.
    offset = np.asarray(volume.offset, np.float64)
    truth = PartnerPairs(
        table["pre_segment"],
        table["post_segment"],
        np.asarray(table["pre_location"]) - offset,
        np.asarray(table["post_location"]) - offset,
    )
    # Cleft ids as in `cleft_instances`: a CREMI cleft 0 is renumbered there,
    # and its pairs must follow or they would point at the background.
    pairs = synapse_pairs(summary)
    pairs[:, PAIR_CLEFT] = _instance_ids(pairs[:, PAIR_CLEFT], volume.clefts)
    cleft_of_pre = {s.pre_annotation: s.cleft_id for s in summary}
    truth_clefts = _instance_ids(
        np.array([cleft_of_pre[a] for a in table["pre_id"].tolist()], np.int64), volume.clefts
    )
    return PartnerVolume(
        name=name,
        raw=volume.raw,
        neuron_ids=volume.neuron_ids,
        clefts=cleft_instances(volume.clefts),
        resolution=tuple(float(r) for r in volume.resolution),
        pairs=pairs,
        truth=truth,
        truth_clefts=truth_clefts,
        n_polyadic=sum(s.polyadic for s in summary),
    )


def _instance_ids(cleft_ids: np.ndarray, cremi_clefts: np.ndarray) -> np.ndarray:
    """CREMI cleft ids (-1 = none, from `synapse_summary`) in `cleft_instances` numbering."""
    cleft_ids = np.asarray(cleft_ids, np.int64)
    known = cleft_ids >= 0
    out = np.full(cleft_ids.shape, NO_CLEFT, np.int64)
    out[known] = cleft_instance_ids(cleft_ids[known], cremi_clefts)
    return out


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
        path = require_file(data[f"{name}_path"], key, "CREMI sample", CREMI_PUBLISHED_AT)
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
