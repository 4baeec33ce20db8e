"""The partner pipeline on a user's volume, block by block: proximity, candidates, synapse table.

`config.predict.input` (`volume_input.py`) is predicted with the U-Net trained
in the workdir into `<config.predict.output>/proximity.zarr`. With
`config.predict.segmentation`, a neuron segmentation of that volume (for
example the neuron pipeline's segmentation of it, or one made by another
tool), the run goes on as the test volume's prediction does
(`partners.predict`), block by block:

- candidates: components of the thresholded proximity, their overlaps with
  the segmentation and the segments' adjacency, per block
  (`synjax.postprocess.blockwise_candidates`; the component labels go to
  `pre_sites.zarr` and `post_sites.zarr` beside the proximity);
- the pruning CNN's scores, its windows read from the on-disk raw,
  proximity and segmentation one batch of candidates at a time (when the
  run's training chose the pruner; otherwise the candidates' proximity
  scores);
- duplicate suppression and the score threshold tuned in the workdir
  (`pruner_threshold.json`, checked to belong to these models);
- the tables `candidates.csv`, `detections.csv` and `synapses.csv`, in nm in
  the input's frame (its offset plus the roi's start).

Each step resumes after a kill: the proximity by its done-state, the
candidates by `candidates.state` and the pruner's scores by
`pruner_scores.state` (parts of whole batches) beside the outputs, keyed by
what the proximity and the segmentation are and by the parameters; both
states are removed once the tables are written.

Without a segmentation the run stops at the proximity, and says so: the
candidates pair sites on segments, and a volume of one's own has no ground
truth to stand for them (the test path's `config.segmentation.source`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import numpy as np
from absl import logging

from synjax.errors import DataError
from synjax.geometry import Box
from synjax.inference import done_blocks
from synjax.inference.block_grid import BlockGrid
from synjax.io import SynapseTable, create_volume, layout, open_volume
from synjax.io.provenance import describe_model, input_fingerprint
from synjax.io.volume_base import DEFAULT_RESOLUTION
from synjax.pipelines import volume_input
from synjax.pipelines.partners import (
    _best_of_duplicates,
    _check_threshold,
    _model,
    _read_threshold,
    _synapse_table,
)
from synjax.postprocess.blockwise_candidates import generate_candidates_blockwise
from synjax.postprocess.blockwise_pass_state import (
    HEADER_FILE,
    PassState,
    each_block_result,
    remove_pass_state,
)
from synjax.postprocess.candidates import Candidates
from synjax.report.progress import progress_bar
from synjax.stages import proximity, pruner
from synjax.stages.proximity import ProximityStage
from synjax.stages.pruner import PrunerStage

# The outputs in `config.predict.output`.
PROXIMITY_OUTPUT = "proximity.zarr"
PRE_SITES_OUTPUT, POST_SITES_OUTPUT = layout.VOLUME_PRE_SITES, layout.VOLUME_POST_SITES
SEGMENTATION_KEY = "config.predict.segmentation"
# Chunks of the site labels within a candidate block: small enough that the
# closest-point search, which reads a site's neighbourhood, decompresses little.
_SITE_CHUNKS = (16, 128, 128)
# What the candidates' and the pruner scores' passes keep to resume, beside the outputs.
CANDIDATES_STATE, SCORES_STATE = "candidates.state", "pruner_scores.state"
# Pruner batches scored, and kept, together.
SCORE_BATCHES = 32


def predict_volume(config, workdir: pathlib.Path) -> pathlib.Path:
    """Predicts `config.predict.input` with the models of `workdir`: proximity, then synapses.

    The input is read block by block (any size; `config.predict.roi` limits it
    to a region) and the proximity is written to
    `<config.predict.output>/proximity.zarr`, resumable like the test volume's
    (its done-state beside it records the model and the input). With
    `config.predict.segmentation` the synapse tables follow (module docstring).

    Returns:
      The path of the proximity output.

    Raises:
      DataError: no trained U-Net (or, with a segmentation, no tuned threshold
        for these models) in `workdir`, or a bad input or segmentation (named).
    """
    raw, roi = volume_input.open_input(config)
    out_dir = volume_input.output_dir(config)
    out = out_dir / PROXIMITY_OUTPUT
    unet_stage = ProximityStage.from_config(config)
    trained = unet_stage.load(workdir)
    unet = _model(workdir, proximity.MODEL_NAME, trained)
    # Checked before the long prediction: a bad segmentation or a threshold
    # chosen for other models is an error now rather than in an hour.
    segmentation = open_segmentation(config, raw, roi)
    if segmentation is not None:
        choice = _read_threshold(workdir)
        pruner_stage = PrunerStage.from_config(config)
        trained_pruner = pruner_stage.load(workdir) if choice["pruner"] else None
        _check_threshold(workdir, choice, unet, trained_pruner)
    logging.info(
        "Predicting %s (region %s..%s of %s) with %s into %s",
        config.predict.input,
        roi.start,
        roi.stop,
        raw.shape,
        describe_model(unet),
        out,
    )
    prox = unet_stage.predict_volume(
        trained,
        raw,
        out,
        raw.resolution,
        step=unet["step"],
        input_path=config.predict.input,
        roi=roi,
        offset=raw.offset,
        workdir=workdir,
    )
    if segmentation is None:
        why = (
            "the segmenter trained in the workdir is not applied to a volume of your own here"
            if config.segmentation.source == "predicted"
            else "a volume of your own has no ground-truth neurons"
        )
        logging.warning(
            "No synapse table: %s is empty (%s); give a neuron segmentation of %s to pair "
            "the proximity's sites on, e.g. the neuron pipeline's: run it with the same "
            "input and roi and --config.predict.output=DIR, then pass %s=DIR/%s. "
            "Stopping at %s.",
            SEGMENTATION_KEY,
            why,
            config.predict.input,
            SEGMENTATION_KEY,
            layout.VOLUME_SEGMENTATION,
            out,
        )
        return out
    block = unet_stage.prediction.candidate_block
    made_from = candidates_provenance(config, out, prox, segmentation)
    candidates = find_candidates(config, block, prox, segmentation, out_dir, made_from)
    scores = candidates.score
    if trained_pruner is not None and len(candidates):
        logging.info("Scoring %d candidates with the pruner", len(candidates))
        scores = score_candidates(
            pruner_stage,
            trained_pruner,
            volume_input.RegionVolume(raw, roi),
            prox,
            segmentation,
            candidates,
            config.predict.input,
            out_dir / SCORES_STATE,
            {"candidates": made_from, "pruner": _model(workdir, pruner.MODEL_NAME, trained_pruner)},
        )
    write_tables(config, candidates, scores, choice["threshold"], prox, out_dir)
    # The tables are written: what the steps kept to resume is no longer needed.
    for state in (SCORES_STATE, CANDIDATES_STATE):
        remove_pass_state(out_dir / state)
    return out


def open_segmentation(config, raw, roi: Box):
    """`config.predict.segmentation` as a lazy `[z, y, x]` volume of the roi's shape.

    A segmentation of the input's shape is cut to the roi; one of the roi's
    shape (e.g. the neuron pipeline's `segmentation.zarr` of that region) is
    used as it is. Either is read in the input's voxels: where it records
    its own place (a voxel size, or an offset other than zero, as the
    neuron pipeline's outputs do), that must be the input's, or the region's
    for one of the region's shape, so that a segmentation of another region
    or scale is an error rather than a table of wrong pairs. One that
    records nothing (e.g. a plain zarr from another tool) is taken as placed.

    Args:
      config: the run's config (`config.predict.segmentation`).
      raw: the opened input (its shape, voxel size and offset).
      roi: the predicted region of the input.

    Returns:
      The volume, or None when the key is empty.

    Raises:
      DataError: it cannot be opened, holds no integer labels, has neither
        shape, or records another voxel size or place (named in one line).
    """
    path = config.predict.get("segmentation") or ""
    if not path:
        return None
    where = f"{SEGMENTATION_KEY}={path!r}"
    try:
        volume = open_volume(path)
    except DataError as error:
        raise DataError(f"{where}: {error}") from error
    if not np.issubdtype(volume.dtype, np.integer):
        raise DataError(f"{where}: dtype {volume.dtype}; expected integer neuron labels")
    shape = tuple(volume.shape)
    input_shape = tuple(int(s) for s in raw.shape)
    resolution = np.asarray(raw.resolution, np.float64)
    if shape == input_shape:
        expected, what = np.asarray(raw.offset, np.float64), "the input's"
    elif shape == roi.shape:
        expected = np.asarray(raw.offset, np.float64) + np.asarray(roi.start) * resolution
        what = f"the {volume_input.ROI_KEY} region's"
    else:
        raise DataError(
            f"{where}: shape {shape}; expected the input's {input_shape} or the "
            f"{volume_input.ROI_KEY} region's {roi.shape}"
        )
    stored_resolution = np.asarray(volume.resolution, np.float64)
    stored_offset = np.asarray(volume.offset, np.float64)
    if not np.allclose(stored_resolution, DEFAULT_RESOLUTION) and not np.allclose(
        stored_resolution, resolution
    ):
        raise DataError(
            f"{where}: voxel size {tuple(stored_resolution.tolist())} nm; expected the "
            f"input's {tuple(resolution.tolist())} nm"
        )
    if np.any(stored_offset != 0) and not np.allclose(stored_offset, expected):
        raise DataError(
            f"{where}: offset {tuple(stored_offset.tolist())} nm; expected {what} "
            f"{tuple(expected.tolist())} nm (a segmentation of another region?)"
        )
    return volume_input.RegionVolume(volume, roi) if shape == input_shape else volume


def candidates_provenance(config, out: pathlib.Path, prox, segmentation) -> dict:
    """What the candidates are made from: the proximity and the segmentation (JSON-able).

    The proximity by what its done-state records (the U-Net and the input)
    and a fingerprint of its content; the segmentation by its path, the roi
    and a fingerprint of its content (`io.provenance.input_fingerprint`,
    sampled boxes for a large volume).
    """
    header = layout.blocks_manifest(out) / done_blocks.HEADER_FILE
    try:
        predicted = json.loads(header.read_text()).get("provenance")
    except (FileNotFoundError, json.JSONDecodeError):
        predicted = None
    made_from = input_fingerprint(segmentation, path=config.predict.get("segmentation") or None)
    roi = getattr(segmentation, "roi", None)  # a region cut from a larger segmentation
    if roi is not None:
        made_from["roi"] = [list(roi.start), list(roi.stop)]
    return {
        "proximity": {"made_from": predicted, "content": input_fingerprint(prox)},
        "segmentation": made_from,
    }


def _site_volumes(out_dir: pathlib.Path, shape, chunks, prox, state: pathlib.Path) -> list:
    """The site label volumes: those a killed run left (with its state), else new ones.

    A resumed run must relabel the very volumes the killed one wrote; when
    they are missing or of another shape or chunking, the state is removed
    with them and both are made afresh.
    """
    if (state / HEADER_FILE).exists():
        try:
            found = [
                open_volume(str(out_dir / name), mode="r+")
                for name in (PRE_SITES_OUTPUT, POST_SITES_OUTPUT)
            ]
        except DataError:
            found = []
        if len(found) == 2 and all(
            tuple(v.shape) == shape and tuple(getattr(v, "chunks", ())) == chunks for v in found
        ):
            return found
        logging.warning("%s: the site volumes it was kept for are gone; starting afresh", state)
    remove_pass_state(state)
    return [
        create_volume(
            out_dir / name,
            shape,
            np.uint64,
            prox.resolution,
            prox.offset,
            chunks=chunks,
            overwrite=True,
        )
        for name in (PRE_SITES_OUTPUT, POST_SITES_OUTPUT)
    ]


def find_candidates(
    config, block_shape, prox, segmentation, out_dir: pathlib.Path, provenance=None
) -> Candidates:
    """The candidates of an on-disk proximity and segmentation, block by block, resumable.

    What the passes finish is kept in `<out_dir>/candidates.state`
    (`blockwise_candidates.generate_candidates_blockwise`'s state, keyed by
    `provenance`, the block shape and `config.candidates`), so a run killed
    part-way goes on from there; `predict_volume` removes it once the tables
    are written.

    Args:
      config: the run's config (`config.candidates`).
      block_shape: `(z, y, x)` blocks (`config.predict.candidate_block`), cut
        to the volume.
      prox: the proximity output `Volume` (`[z, y, x]`).
      segmentation: `[z, y, x]` lazy segmentation of the same shape.
      out_dir: where the site labels are written (afresh unless a killed
        run's state is resumed).
      provenance: what `prox` and `segmentation` are (`candidates_provenance`).
    """
    shape = tuple(prox.shape)
    block = tuple(min(int(b), s) for b, s in zip(block_shape, shape, strict=True))
    # A chunk that divides the block, so that each block writes whole chunks.
    chunks = tuple(n if b % n == 0 else b for n, b in zip(_SITE_CHUNKS, block, strict=True))
    state = out_dir / CANDIDATES_STATE
    sites = _site_volumes(out_dir, shape, chunks, prox, state)
    logging.info("Candidates of %s in blocks of %s", shape, block)
    found = generate_candidates_blockwise(
        prox,
        segmentation,
        prox.resolution,
        *sites,
        block,
        tau=config.candidates.tau,
        omega=config.candidates.omega,
        max_gap_nm=config.candidates.max_gap_nm,
        progress=True,
        report=logging.info,
        state=state,
        provenance=provenance,
        remove_state=False,
    )
    logging.info("%s: %d candidates", config.predict.input, len(found))
    return found


def _candidates_fingerprint(candidates: Candidates) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for field in dataclasses.fields(candidates):
        digest.update(np.ascontiguousarray(getattr(candidates, field.name)).tobytes())
    return digest.hexdigest()


def score_candidates(
    stage: PrunerStage,
    trained,
    raw,
    prox,
    segmentation,
    candidates: Candidates,
    name: str,
    state: pathlib.Path,
    provenance: dict,
) -> np.ndarray:
    """`stage.score` of the candidates in parts of whole batches, each kept in `state`.

    Each part is `SCORE_BATCHES` of the pruner's batches, so the batches the
    network sees, and thus the scores, are those of one call over all the
    candidates; a run killed part-way scores again only the parts not kept.

    Returns:
      `[n]` float64 scores.
    """
    part = stage.settings.train.batch_size * SCORE_BATCHES
    parts = BlockGrid((1, 1, len(candidates)), (1, 1, part))
    keyed = {
        "made_from": provenance,
        "candidates": _candidates_fingerprint(candidates),
        "part": part,
    }
    passes = PassState(state, parts, keyed)
    scores = []

    def part_scores(index: int) -> dict[str, np.ndarray]:
        rows = np.arange(index * part, min((index + 1) * part, len(candidates)))
        found = stage.score(trained, raw, prox, segmentation, candidates.select(rows), name=name)
        return {"scores": found}

    def each(ids):
        return progress_bar(ids, total=len(ids), desc="pruner parts", unit="part")

    for found in each_block_result(passes, "scores", parts.block_ids(), part_scores, each):
        scores.append(found["scores"])
    return np.concatenate(scores).astype(np.float64, copy=False)


def write_tables(
    config, candidates: Candidates, scores: np.ndarray, threshold: float, prox, out_dir
) -> SynapseTable:
    """Writes `candidates.csv`, `detections.csv` and `synapses.csv` as the test path does.

    Locations are in nm in the input's frame: the proximity output's offset
    (the input's, plus the roi's start) plus voxel times resolution.

    Returns:
      The kept synapses (`synapses.csv`).
    """
    resolution, offset = prox.resolution, prox.offset
    # Every candidate, before duplicate suppression.
    _synapse_table(candidates, scores, resolution, offset).to_csv(out_dir / layout.CANDIDATES_FILE)
    candidates, scores = _best_of_duplicates(config, candidates, scores)
    table = _synapse_table(candidates, scores, resolution, offset)
    table.to_csv(out_dir / layout.DETECTIONS_FILE)
    kept = table.filter_by_score(threshold)
    kept.to_csv(out_dir / layout.SYNAPSES_CSV_FILE)
    logging.info(
        "Kept %d of %d candidates (score >= %.3f): %s",
        len(kept),
        len(table),
        threshold,
        out_dir / layout.SYNAPSES_CSV_FILE,
    )
    return kept
