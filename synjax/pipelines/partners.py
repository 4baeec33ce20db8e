"""Synaptic partner detection end to end (Parag et al., MICCAI 2018).

train:    signed-proximity targets -> U-Net -> proximity of the training
          volume -> candidates -> labels -> pruning CNN; the pruner's score
          threshold is chosen on the training volume (never on the test one).
predict:  proximity of the test volume (block-wise, resumable zarr) ->
          candidates on the segmentation -> pruner scores -> synapse table.
          With `config.predict.input`: the proximity of that volume, of any
          size, into `config.predict.output` (`partner_volume.py`).
evaluate: CREMI partner metric, the paper's criterion (detection in a true
          cleft, right cells, right direction) and the looser "same ids,
          midpoints within 400 nm" at the chosen threshold; every candidate
          without pruning; precision-recall over all thresholds, plots.

Workdir outputs: `checkpoints/`, `predictions/*.zarr`, `candidates.csv`
(every candidate, before duplicate suppression, with its pruner score),
`detections.csv` (candidates left after duplicate suppression, with pruner
scores), `synapses.csv` and `synapses.h5` (CREMI annotations) of the kept
ones, `pruner_threshold.json`, `metrics.json`, `precision_recall.png`,
`example_slices.png`.

Nothing stale is reused: the proximity outputs' manifests record the U-Net
(checkpoint step, parameter hash) and the input (path, shape, dtype, content
fingerprint) and are predicted afresh when either changed
(`config.predict.resume`); `pruner_threshold.json` records the models it was
chosen with, and predict refuses it for others.
"""

from __future__ import annotations

import pathlib

import numpy as np
from absl import logging

from synjax.data.intensity import TrainedParams
from synjax.errors import ConfigError, DataError
from synjax.evaluation import partners as partner_metrics
from synjax.evaluation.rand_voi import adapted_rand_error
from synjax.io import CremiVolume, SynapseTable, create_volume, layout, open_volume, write_cremi
from synjax.io.cremi import RAW
from synjax.io.layout import CANDIDATES_FILE, DETECTIONS_FILE, THRESHOLD_FILE
from synjax.io.provenance import describe_model, differences, input_fingerprint, model_provenance
from synjax.io.voxels import inside_volume, segment_ids_at, world_to_voxel
from synjax.pipelines import neurons, partner_data
from synjax.pipelines.partner_data import PartnerVolume
from synjax.postprocess.candidates import Candidates, generate_candidates, site_components
from synjax.postprocess.partner_nms import suppress_duplicates
from synjax.postprocess.pruning_windows import label_candidates
from synjax.report import files, slices
from synjax.report.precision_recall import plot_precision_recall
from synjax.stages import proximity, pruner
from synjax.stages.proximity import ProximityStage
from synjax.stages.pruner import PrunerStage
from synjax.train import checkpoint


def _segmentation(
    config, workdir: pathlib.Path, volume: PartnerVolume, predicted: np.ndarray | None = None
) -> np.ndarray:
    """The neuron segmentation candidates are built on.

    "groundtruth" is the volume's own neuron_ids; "predicted" is the DeepEM3D
    ensemble and watershed of `config.neurons`, trained in this workdir on
    the training volume (see `_train_segmenter`), or `predicted` when given
    (the training volume's, made while tuning). A predicted segmentation is
    written to `predictions/<volume>_segmentation.zarr`.
    """
    source = config.segmentation.source
    if source == "groundtruth":
        return volume.neuron_ids
    if source == "predicted":
        seg = predicted
        if seg is None:
            seg = neurons.segment_with_trained_models(config.neurons, workdir, volume.raw)
        path = workdir / layout.volume_segmentation(volume.name)
        out = create_volume(str(path), seg.shape, np.uint64, volume.resolution, overwrite=True)
        out[...] = seg
        logging.info(
            "%s volume: predicted segmentation with %d segments", volume.name, len(np.unique(seg))
        )
        return seg
    raise ConfigError(
        f"config.segmentation.source={source!r}; expected 'groundtruth' or 'predicted'"
    )


def _train_segmenter(config, workdir: pathlib.Path, volume: PartnerVolume) -> np.ndarray | None:
    """Trains the neuron segmentation that "predicted" candidates are built on.

    Returns:
      The training volume's predicted segmentation, or None for "groundtruth".
    """
    if config.segmentation.source != "predicted":
        return None
    return neurons.train_segmenter(config.neurons, workdir, volume.raw, volume.neuron_ids)


def _candidates(config, prox: np.ndarray, segmentation: np.ndarray, volume) -> Candidates:
    c = config.candidates
    found = generate_candidates(
        prox, segmentation, volume.resolution, tau=c.tau, omega=c.omega, max_gap_nm=c.max_gap_nm
    )
    logging.info("%s volume: %d candidates", volume.name, len(found))
    return found


def _in_truth_ids(pairs: partner_metrics.PartnerPairs, volume) -> partner_metrics.PartnerPairs:
    """Pairs whose ids are the ground-truth neurons under their pre and post sites.

    As in the CREMI challenge, a detection is judged by where it points: its
    own ids belong to the segmentation it was built on (a predicted one need
    not share the ground truth's ids).
    """
    ids = [
        segment_ids_at(volume.neuron_ids, loc, volume.resolution)
        for loc in (pairs.pre_locations, pairs.post_locations)
    ]
    return partner_metrics.PartnerPairs(
        *ids, pairs.pre_locations, pairs.post_locations, pairs.scores
    )


def candidate_pairs(
    candidates: Candidates,
    resolution,
    offset=(0.0, 0.0, 0.0),
    scores: np.ndarray | None = None,
) -> partner_metrics.PartnerPairs:
    """Candidates as partner pairs: their closest points in nm, shifted by `offset`.

    `scores` (e.g. pruning probabilities) default to the candidates' own.
    """
    pre, post = candidates.points_nm(resolution, offset)
    return partner_metrics.PartnerPairs(
        candidates.pre_segment,
        candidates.post_segment,
        pre,
        post,
        candidates.score if scores is None else scores,
    )


def _pairs(candidates: Candidates, scores: np.ndarray, volume) -> partner_metrics.PartnerPairs:
    return _in_truth_ids(candidate_pairs(candidates, volume.resolution, scores=scores), volume)


def _table_pairs(table: SynapseTable, volume) -> partner_metrics.PartnerPairs:
    """A synapse table's rows as pairs in ground-truth ids."""
    return _in_truth_ids(
        partner_metrics.PartnerPairs(
            table.pre_segment,
            table.post_segment,
            table.pre_location,
            table.post_location,
            table.score,
        ),
        volume,
    )


def _synapse_table(
    candidates: Candidates, scores: np.ndarray, resolution, offset=(0.0, 0.0, 0.0)
) -> SynapseTable:
    """The candidates as synapse rows, in nm with voxel (0, 0, 0) at `offset`."""
    pre, post = candidates.points_nm(resolution, offset)
    return SynapseTable.build(
        candidates.pre_segment,
        candidates.post_segment,
        candidates.location + np.asarray(offset, np.float64),
        pre_location=pre,
        post_location=post,
        score=scores,
        size=candidates.pre_overlap + candidates.post_overlap,
        kind="partner",
    )


def _best_of_duplicates(config, candidates: Candidates, scores: np.ndarray):
    """Candidates and scores left after NMS of same-pair duplicates."""
    keep = suppress_duplicates(
        candidates.pre_segment,
        candidates.post_segment,
        candidates.location,
        scores,
        config.candidates.nms_radius_nm,
    )
    return candidates.select(keep), scores[keep]


def _curve(pairs: partner_metrics.PartnerPairs, truth, config):
    distance = config.evaluation.cremi_distance_nm

    def at(threshold: float):
        return partner_metrics.cremi_partner_scores(
            pairs.select(pairs.scores >= threshold), truth, distance
        )

    # Threshold 0 keeps every detection left after duplicate suppression.
    thresholds = np.unique(np.concatenate([[0.0], pairs.scores]))
    return partner_metrics.precision_recall_curve(pairs.scores, at, thresholds)


def _input_source(config, name: str) -> dict:
    """Where the `name` volume's raw was read from (None for generated volumes).

    Keyword arguments of `ProximityStage.predict`, recorded with outputs.
    """
    if config.data.source == "cremi":
        return {"input_path": config.data[f"{name}_path"], "input_dataset": RAW}
    return {"input_path": None, "input_dataset": None}


def _model(workdir: pathlib.Path, name: str, trained: TrainedParams) -> dict:
    """Provenance of a trained model: its newest checkpoint's step, the hash of
    its parameters and the intensity normalisation it was trained with."""
    step = checkpoint.latest_step(workdir, name)
    return model_provenance(name, step, trained.params) | {"intensity": trained.intensity.to_dict()}


def _read_threshold(workdir: pathlib.Path) -> dict:
    """The saved pruner threshold choice (`THRESHOLD_FILE`)."""
    path = workdir / THRESHOLD_FILE
    if not path.exists():
        raise DataError(f"{path} is absent: run the partner pipeline's train mode first")
    return files.read_json(path)


def _check_threshold(workdir: pathlib.Path, choice: dict, unet: dict, trained_pruner) -> None:
    """Checks that the saved threshold was chosen with the models in use.

    Args:
      choice: the content of `THRESHOLD_FILE`.
      unet: provenance of the U-Net parameters in use (`_model`).
      trained_pruner: the pruner's parameters in use (None when the threshold
        applies to proximity scores).

    Raises:
      DataError: it was chosen with other parameters (e.g. a training run
        killed after the U-Net was trained further), or records none.
    """
    path = workdir / THRESHOLD_FILE
    recorded = choice.get("provenance")
    if recorded is None:
        raise DataError(f"{path} records no model provenance; retrain (mode=train)")
    current = {
        "proximity": unet,
        "pruner": None
        if trained_pruner is None
        else _model(workdir, pruner.MODEL_NAME, trained_pruner),
    }
    models = {key: recorded.get(key) for key in current}
    if differences(models, current):
        raise DataError(
            f"{path} was chosen for "
            + ", ".join(describe_model(m) for m in models.values() if m)
            + "; the checkpoints are now "
            + ", ".join(describe_model(m) for m in current.values() if m)
            + "; retrain (mode=train)"
        )


def train(config, workdir: pathlib.Path) -> None:
    """Trains the U-Net and the pruner on the training volume; chooses the score threshold."""
    _train(config, workdir, partner_data.load_volume(config, "train"))


def _train(config, workdir: pathlib.Path, volume: PartnerVolume) -> None:
    unet_stage, pruner_stage = ProximityStage.from_config(config), PrunerStage.from_config(config)
    targets = partner_data.proximity_targets(volume, config)
    trained = unet_stage.train([targets], workdir)
    unet = _model(workdir, proximity.MODEL_NAME, trained)
    source = _input_source(config, "train")
    prox = unet_stage.predict(
        trained,
        volume.raw,
        workdir / layout.TRAIN_PROXIMITY,
        volume.resolution,
        step=unet["step"],
        workdir=workdir,
        **source,
    )
    predicted = _train_segmenter(config, workdir, volume)
    segmentation = _segmentation(config, workdir, volume, predicted)
    candidates = _candidates(config, prox, segmentation, volume)
    labels = label_candidates(
        candidates,
        segmentation,
        volume.neuron_ids,
        volume.truth,
        volume.resolution,
        pruner_stage.settings.train.label_distance_nm,
    )
    if len(candidates) == 0 or labels.all() or not labels.any():
        # Nothing to tell apart (e.g. a very short run): rank candidates by
        # their proximity score instead of a pruner, and say so.
        logging.warning(
            "Pruner not trained: %d training candidates, %d positive; using proximity scores",
            len(candidates),
            int(labels.sum()),
        )
        scores, use_pruner, pruner_model = candidates.score, False, None
    else:
        trained_pruner = pruner_stage.train(
            volume.raw, prox, segmentation, candidates, labels, workdir
        )
        scores = pruner_stage.score(trained_pruner, volume.raw, prox, segmentation, candidates)
        use_pruner, pruner_model = True, _model(workdir, pruner.MODEL_NAME, trained_pruner)
    candidates, scores = _best_of_duplicates(config, candidates, scores)
    threshold, train_fscore = 0.0, 0.0
    if len(candidates):
        curve = _curve(_pairs(candidates, scores, volume), volume.truth, config)
        threshold, train_fscore = curve.best_threshold, curve.best_fscore
    files.write_json(
        workdir / THRESHOLD_FILE,
        {
            "pruner": use_pruner,
            "threshold": threshold,
            "train_fscore": train_fscore,
            "train_candidates": len(candidates),
            "train_positive_candidates": int(labels.sum()),
            # What the threshold was chosen with; `predict` refuses other models.
            "provenance": {
                "proximity": unet,
                "pruner": pruner_model,
                "input": input_fingerprint(
                    volume.raw, path=source["input_path"], dataset=source["input_dataset"]
                ),
            },
        },
    )
    logging.info("Score threshold %.3f (training F %.3f)", threshold, train_fscore)


def load_test(config) -> PartnerVolume:
    """The test volume that predict and evaluate read."""
    return partner_data.load_volume(config, "test")


def predict(config, workdir: pathlib.Path, volume: PartnerVolume) -> SynapseTable:
    """Detects partners in the test volume; writes the candidate and synapse tables."""
    unet_stage, pruner_stage = ProximityStage.from_config(config), PrunerStage.from_config(config)
    trained = unet_stage.load(workdir)
    unet = _model(workdir, proximity.MODEL_NAME, trained)
    # Checked before the long prediction: a threshold chosen for other models is an error.
    choice = _read_threshold(workdir)
    trained_pruner = pruner_stage.load(workdir) if choice["pruner"] else None
    _check_threshold(workdir, choice, unet, trained_pruner)
    prox = unet_stage.predict(
        trained,
        volume.raw,
        workdir / layout.PROXIMITY,
        volume.resolution,
        step=unet["step"],
        workdir=workdir,
        **_input_source(config, "test"),
    )
    segmentation = _segmentation(config, workdir, volume)
    candidates = _candidates(config, prox, segmentation, volume)
    scores = candidates.score
    if choice["pruner"] and len(candidates):
        scores = pruner_stage.score(trained_pruner, volume.raw, prox, segmentation, candidates)
    # Every candidate, before duplicate suppression: the "no pruning" row.
    _synapse_table(candidates, scores, volume.resolution).to_csv(workdir / CANDIDATES_FILE)
    candidates, scores = _best_of_duplicates(config, candidates, scores)
    table = _synapse_table(candidates, scores, volume.resolution)
    table.to_csv(workdir / DETECTIONS_FILE)
    threshold = choice["threshold"]
    kept = table.filter_by_score(threshold)
    kept.to_csv(workdir / layout.SYNAPSES_CSV_FILE)
    if len(kept):
        write_cremi(
            workdir / layout.SYNAPSES_CREMI_FILE,
            CremiVolume(raw=None, resolution=volume.resolution, annotations=kept.to_annotations()),
            overwrite=True,
        )
    slices.plot_slices(
        volume.raw,
        {"proximity": prox, "clefts (truth)": volume.clefts},
        workdir / layout.EXAMPLE_SLICES_FILE,
        slices.pick_slices(volume.raw.shape, weights=(volume.clefts > 0).sum(axis=(1, 2))),
        title="test volume: predicted signed proximity (red pre, blue post)",
    )
    logging.info("Kept %d of %d candidates (score >= %.3f)", len(kept), len(table), threshold)
    return table


def _saved_prediction(workdir: pathlib.Path, name: str) -> np.ndarray:
    """A volume that `predict` wrote (`name` relative to the workdir)."""
    path = workdir / name
    if not path.exists():
        raise DataError(f"{path} not found: run the predict step before evaluate")
    return open_volume(str(path)).read()


def _detection_clefts(
    table: SynapseTable, sites: tuple[np.ndarray, np.ndarray], segmentation, volume, source: str
) -> np.ndarray:
    """[n, k] ground-truth clefts each row's pre or post site touches (`NO_CLEFT` padded).

    A row's pre site is the proximity component (p > tau) that holds its
    presynaptic point, cut by its presynaptic segment; likewise post. See
    `partner_metrics.clefts_under_sites` for what touching a cleft means.
    """
    found = []
    for components, points, segments in (
        (sites[0], table.pre_location, table.pre_segment),
        (sites[1], table.post_location, table.post_segment),
    ):
        voxels = world_to_voxel(points, volume.resolution)
        if not np.all(inside_volume(voxels, components.shape)):
            raise DataError(f"{source}: a site lies outside the test volume")
        component_ids = components[tuple(voxels.T)]
        if np.any(component_ids == 0) or np.any(segmentation[tuple(voxels.T)] != segments):
            raise DataError(
                f"{source}: a site point is not in its proximity component and segment; "
                "was predict run with another config.candidates.tau or segmentation?"
            )
        found.append(
            partner_metrics.clefts_under_sites(
                components, segmentation, volume.clefts, component_ids, segments
            )
        )
    return np.concatenate(found, axis=1)


def evaluate(config, workdir: pathlib.Path, volume: PartnerVolume) -> dict:
    """Scores the detections of the test volume; writes the metrics and the PR curve."""
    detections = SynapseTable.from_csv(workdir / DETECTIONS_FILE)
    every = SynapseTable.from_csv(workdir / CANDIDATES_FILE)
    threshold = files.read_json(workdir / THRESHOLD_FILE)["threshold"]
    # The sites of the candidates, as `predict` found them, for the paper's criterion.
    sites = site_components(_saved_prediction(workdir, layout.PROXIMITY), config.candidates.tau)
    segmentation = volume.neuron_ids
    if config.segmentation.source == "predicted":
        segmentation = _saved_prediction(workdir, layout.volume_segmentation(volume.name))

    pairs = _table_pairs(detections, volume)
    kept_rows = pairs.scores >= threshold
    kept = pairs.select(kept_rows)
    detection_clefts = _detection_clefts(
        detections, sites, segmentation, volume, str(workdir / DETECTIONS_FILE)
    )
    all_pairs = _table_pairs(every, volume)
    all_clefts = _detection_clefts(
        every, sites, segmentation, volume, str(workdir / CANDIDATES_FILE)
    )

    cremi_nm = config.evaluation.cremi_distance_nm
    same_ids_nm = config.evaluation.same_ids_distance_nm
    cremi = partner_metrics.cremi_partner_scores(kept, volume.truth, cremi_nm)
    paper = partner_metrics.paper_partner_scores(
        kept, volume.truth, detection_clefts[kept_rows], volume.truth_clefts
    )
    same_ids = partner_metrics.ids_within_distance_scores(kept, volume.truth, same_ids_nm)
    unpruned = partner_metrics.cremi_partner_scores(all_pairs, volume.truth, cremi_nm)
    unpruned_paper = partner_metrics.paper_partner_scores(
        all_pairs, volume.truth, all_clefts, volume.truth_clefts
    )
    curve = _curve(pairs, volume.truth, config)
    plot_precision_recall(
        curve, workdir / layout.PRECISION_RECALL_FILE, "test volume, CREMI partner metric"
    )

    def scores(s):
        return {k: getattr(s, k) for k in ("tp", "fp", "fn", "precision", "recall", "fscore")} | {
            "reversed": s.reversed
        }

    metrics = {
        "pruner_threshold": threshold,
        "cremi_partners": scores(cremi),
        "paper_criterion": scores(paper),
        f"same_ids_within_{same_ids_nm:g}nm": scores(same_ids),
        "without_pruning": scores(unpruned),
        "without_pruning_paper_criterion": scores(unpruned_paper),
        "best_fscore_over_thresholds": curve.best_fscore,
        "truth_pairs": len(volume.truth),
        "truth_pairs_without_cleft": int(np.sum(volume.truth_clefts == partner_metrics.NO_CLEFT)),
        "truth_polyadic_synapses": volume.n_polyadic,
        "candidates": len(all_pairs),
        "detections": len(pairs),
    }
    if config.segmentation.source == "predicted":
        rand = adapted_rand_error(segmentation, volume.neuron_ids)
        metrics["segmentation_adapted_rand"] = {
            "error": rand.error,
            "precision": rand.precision,
            "recall": rand.recall,
        }
    files.write_json(workdir / layout.METRICS_FILE, metrics)
    logging.info(
        "Test partners: CREMI F %.3f (P %.3f R %.3f), paper criterion F %.3f, same ids within "
        "%g nm F %.3f, no pruning (%d candidates) CREMI F %.3f, paper F %.3f",
        cremi.fscore,
        cremi.precision,
        cremi.recall,
        paper.fscore,
        same_ids_nm,
        same_ids.fscore,
        len(all_pairs),
        unpruned.fscore,
        unpruned_paper.fscore,
    )
    return metrics
